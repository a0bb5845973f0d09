"""``mdgru-localize evaluate`` (and ``train-unet``) end to end, with a tiny random-weight export.

Subjects are exact copies of one phantom "head" (translated, flipped to LPS, axes permuted: no interpolation),
so their true landmarks are known exactly and the registration baseline can find them. The reference for
every number is computed here independently: the in-memory :class:`TwoStageLocalizer` on ``read_volume``'s
grid, n = 1 pooling by reshape-and-sum, errors and statistics with NumPy.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner, Result
from PIL import Image
from scipy import ndimage

from mdgru_keras.baselines.unet import UNetLocalizer
from mdgru_keras.cli import main as cli
from mdgru_keras.config import load_preset
from mdgru_keras.data.records import prepare_dataset
from mdgru_keras.evaluation import read_json
from mdgru_keras.export import export_runs
from mdgru_keras.figures import landmark_figure_size_px
from mdgru_keras.geometry import affine_maps
from mdgru_keras.geometry.coordinate_classes import decode_axis
from mdgru_keras.io import read_volume, write_landmarks
from mdgru_keras.localizer import TwoStageLocalizer
from mdgru_keras.networks import load_model
from mdgru_keras.serving.testing import save_training_run

LANDMARKS = ("A", "B")
CONFIG = load_preset("tiny").replace(landmarks=LANDMARKS)  # superresolution 2, parabola on, P = 32, W = 16
N = CONFIG.superresolution
ROWS = ("coarse", "fine n=1 (argmax)", "fine n=1 + parabola", f"fine n={N} (argmax)", f"fine n={N} + parabola")
MAIN = f"fine n={N} + parabola"  # the export's own answer
SHAPE = (34, 38, 30)  # under P + W = 48 voxels: the export sees the whole scan, as the reference does
SUBJECTS = 4


# ---------------------------------------------------------------------------------------------------------
# data: a phantom and exact copies of it


def phantom() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """A smooth head-like volume (int16 values), its affine (1 mm, centred) and two landmarks at blob centres."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in SHAPE], indexing="ij"), axis=-1)
    centre = (np.array(SHAPE) - 1) / 2
    head = (((grid - centre) / (np.array(SHAPE) * 0.42)) ** 2).sum(-1) < 1
    volume = 120.0 * head + ndimage.gaussian_filter(rng.normal(size=SHAPE), 2.0) * 60 * head
    blobs = {"A": ((11, 14, 12), 350.0, 2.5), "B": ((22, 25, 17), 500.0, 3.0), None: ((17, 10, 20), 250.0, 2.0)}
    for voxel, intensity, sigma in blobs.values():
        volume += intensity * np.exp(-((grid - voxel) ** 2).sum(-1) / (2 * sigma**2))
    voxel_to_world = np.eye(4)
    voxel_to_world[:3, 3] = -centre
    landmarks = {name: affine_maps.voxel_to_world(np.array(v, float), voxel_to_world) for name, (v, _, _) in
                 blobs.items() if name}  # fmt: skip
    return np.round(ndimage.gaussian_filter(volume, 0.7)).astype(np.int16), voxel_to_world, landmarks


def copies(volume: np.ndarray, voxel_to_world: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """subject -> (array, affine, translation_mm): the phantom moved by a translation, stored in another
    orientation (or with every other slice: 2 mm voxels along z, which the model resamples to 1 mm). Every
    stored voxel keeps its value, so each landmark moves exactly by the translation."""

    def moved(affine: np.ndarray, shift: tuple[float, float, float]) -> np.ndarray:
        result = affine.copy()
        result[:3, 3] += shift
        return result

    nx, ny, _ = volume.shape
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])  # new index i' = n - 1 - i along x and y
    flip[:2, 3] = [nx - 1, ny - 1]
    permute = np.zeros((4, 4))  # new index (a, b, c) holds old (b, c, a)
    permute[0, 1] = permute[1, 2] = permute[2, 0] = permute[3, 3] = 1
    thick = np.diag([1.0, 1.0, 2.0, 1.0])  # new index k along z holds old 2k
    shifts = {"sub-01": (3.0, -2.0, 1.0), "sub-02": (-4.0, 2.0, 3.0), "sub-03": (1.0, 4.0, -3.0),
              "sub-04": (-2.0, -3.0, 2.0)}  # fmt: skip
    return {
        "sub-01": (volume, moved(voxel_to_world, shifts["sub-01"]), np.array(shifts["sub-01"])),
        "sub-02": (volume[::-1, ::-1, :], moved(voxel_to_world, shifts["sub-02"]) @ flip, np.array(shifts["sub-02"])),
        "sub-03": (volume.transpose(2, 0, 1), moved(voxel_to_world, shifts["sub-03"]) @ permute,
                   np.array(shifts["sub-03"])),
        "sub-04": (volume[:, :, ::2], moved(voxel_to_world, shifts["sub-04"]) @ thick, np.array(shifts["sub-04"])),
    }  # fmt: skip


def write_manifest(path: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    lines = ["subject,image,landmarks,split"] + [",".join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Template, three subjects with their exact landmarks, and a manifest of them (split test)."""
    directory = tmp_path_factory.mktemp("data")
    (directory / "images").mkdir()
    (directory / "landmarks").mkdir()
    volume, voxel_to_world, landmarks = phantom()
    nib.save(nib.Nifti1Image(volume, voxel_to_world), str(directory / "template.nii.gz"))
    write_landmarks(directory / "template.fcsv", landmarks)
    subjects = {}
    for subject, (array, affine, shift) in copies(volume, voxel_to_world).items():
        image = directory / "images" / f"{subject}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(array), affine), str(image))
        truth = {name: point + shift for name, point in landmarks.items()}
        write_landmarks(directory / "landmarks" / f"{subject}.fcsv", truth)
        subjects[subject] = {"image": image, "affine": affine, "truth": truth}
    rows = [(s, f"images/{s}.nii.gz", f"landmarks/{s}.fcsv", "test") for s in subjects]
    manifest = write_manifest(directory / "manifest.csv", rows)
    return {"dir": directory, "subjects": subjects, "manifest": manifest, "rows": rows,
            "template": directory / "template.nii.gz", "template_landmarks": directory / "template.fcsv"}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("runs")
    return (save_training_run(directory / "coarse", "coarse", CONFIG, seed=5),
            save_training_run(directory / "fine", "fine", CONFIG, seed=6))  # fmt: skip


@pytest.fixture(scope="module")
def model_base(runs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("export")
    export_runs(runs[0], runs[1], base, "mdgru")
    return base / "mdgru"


@pytest.fixture(scope="module")
def reference(runs: tuple[Path, Path], data: dict) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """subject -> row -> landmark -> world mm, from the in-memory localizer on read_volume's grid (the path
    training uses), decoded here: n = 1 by summing each voxel's N classes; plus the coarse grid voxel."""
    localizer = TwoStageLocalizer(
        load_model(str(runs[0] / "model.keras")), load_model(str(runs[1] / "model.keras")), CONFIG
    )
    result = {}
    for subject, info in data["subjects"].items():
        volume = read_volume(info["image"], CONFIG.spacing_mm)
        outputs = {key: value.numpy() for key, value in localizer(tf.constant(volume.data)).items()}
        origin = outputs["window_origin_voxel"]
        grid_voxels = {"coarse": outputs["coarse_voxel"], f"fine n={N} (argmax)": outputs["voxel_argmax"],
                       f"fine n={N} + parabola": outputs["voxel_parabola"]}  # fmt: skip
        for parabola in (False, True):
            window_voxel = np.stack(
                [decode_axis(outputs[f"probabilities_{axis}"].reshape(len(LANDMARKS), -1, N).sum(-1),
                                      1, 1, parabola) for axis in "xyz"], axis=-1,
            )  # fmt: skip
            grid_voxels[f"fine n=1 {'+ parabola' if parabola else '(argmax)'}"] = window_voxel + origin
        result[subject] = {
            row: {name: affine_maps.voxel_to_world(voxel[k], volume.voxel_to_world) for k, name in enumerate(LANDMARKS)}
            for row, voxel in grid_voxels.items()
        }
        result[subject]["coarse grid voxel"] = outputs["coarse_voxel"]
    return result


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def stats(values: list[float]) -> dict[str, float]:
    values = np.asarray(values)
    return {"median": np.median(values), "mean": values.mean(), "std": values.std(), "max": values.max()}


def assert_row(row: dict, errors_mm: dict[str, list[float]], errors_voxel: dict[str, list[float]], atol: float) -> None:
    """A JSON row against errors computed here (per landmark lists)."""
    everything_mm = [e for values in errors_mm.values() for e in values]
    everything_voxel = [e for values in errors_voxel.values() for e in values]
    for stats_json, mm, voxel in [(row["overall"], everything_mm, everything_voxel)] + [
        (row["per_landmark"][name], errors_mm[name], errors_voxel[name]) for name in errors_mm
    ]:
        assert stats_json["count"] == len(mm)
        for key, value in stats(mm).items():
            assert stats_json[f"{key}_mm"] == pytest.approx(value, abs=atol), key
        for key, value in stats(voxel).items():
            assert stats_json[f"{key}_voxel"] == pytest.approx(value, abs=atol), key


def voxel_distance(a_mm: np.ndarray, b_mm: np.ndarray, voxel_to_world: np.ndarray) -> float:
    return float(np.linalg.norm(np.linalg.solve(voxel_to_world[:3, :3], np.asarray(a_mm) - np.asarray(b_mm))))


# ---------------------------------------------------------------------------------------------------------
# known errors, all five rows, figures, the U-Net baseline


@pytest.fixture(scope="module")
def known_errors(data: dict, reference: dict) -> dict:
    """A manifest whose truth is the model's own answer moved by known offsets (0.5 to 6 mm)."""
    rng = np.random.default_rng(7)
    directory = data["dir"] / "known"
    directory.mkdir()
    offsets, rows = {}, []
    lengths = iter(rng.permutation(np.linspace(0.5, 6.0, len(data["subjects"]) * len(LANDMARKS))))
    for subject in data["subjects"]:
        truth = {}
        for name in LANDMARKS:
            direction = rng.normal(size=3)
            offsets[subject, name] = direction / np.linalg.norm(direction) * next(lengths)
            truth[name] = reference[subject][MAIN][name] + offsets[subject, name]
        write_landmarks(directory / f"{subject}.fcsv", truth)
        rows.append((subject, f"../images/{subject}.nii.gz", f"{subject}.fcsv", ""))
    return {"manifest": write_manifest(directory / "manifest.csv", rows), "offsets": offsets}


@pytest.fixture(scope="module")
def unet_model(data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``train-unet`` for a 2 s budget on the three subjects (a prepared dataset, all in train)."""
    directory = tmp_path_factory.mktemp("unet")
    rows = [(s, image, landmarks, "train") for s, image, landmarks, _ in data["rows"]]
    manifest = write_manifest(data["dir"] / "train.csv", rows)
    prepare_dataset(manifest, directory / "dataset", val_fraction=0.0, test_fraction=0.0)
    config_path = directory / "config.json"
    config_path.write_text(CONFIG.to_json(), encoding="utf-8")
    out = directory / "unet.keras"
    result = run("train-unet", "--config", str(config_path), "--data", str(directory / "dataset"), "--out", str(out),
                 "--budget-seconds", "2", "--seed", "3", "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1].startswith(f"Wrote {out} and {out.with_suffix('.json')} (")
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["steps"] >= 1 and summary["budget_seconds"] == 2.0
    assert summary["config"]["landmarks"] == list(LANDMARKS)
    return out


@pytest.fixture(scope="module")
def known_run(model_base: Path, known_errors: dict, unet_model: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("known_run")
    result = run(
        "evaluate", "--model", str(model_base), "--manifest", str(known_errors["manifest"]),
        "--json", str(out / "evaluation.json"), "--figures", str(out / "figures"),
        "--baseline", "unet", "--unet-model", str(unet_model),
    )  # fmt: skip
    return result, out


@pytest.mark.slow
def test_known_errors_are_reported_exactly(known_run, known_errors: dict, data: dict) -> None:
    result, out = known_run
    assert result.exit_code == 0, result.output
    document = json.loads((out / "evaluation.json").read_text())
    assert document["methods"] == [*ROWS, "unet"]
    assert document["failed"] == [] and document["subjects"] == sorted(data["subjects"])
    assert document["model_method"] == MAIN and document["superresolution"] == N
    errors = {(e["subject"], e["landmark"]): e for e in document["errors"] if e["method"] == MAIN}
    assert len(errors) == len(known_errors["offsets"])
    per_landmark_mm, per_landmark_voxel = {name: [] for name in LANDMARKS}, {name: [] for name in LANDMARKS}
    for (subject, name), offset in known_errors["offsets"].items():
        affine = data["subjects"][subject]["affine"]
        expected_voxel = float(np.linalg.norm(np.linalg.solve(affine[:3, :3], offset)))
        assert errors[subject, name]["error_mm"] == pytest.approx(np.linalg.norm(offset), abs=1e-4)
        assert errors[subject, name]["error_voxel"] == pytest.approx(expected_voxel, abs=1e-4)
        per_landmark_mm[name].append(float(np.linalg.norm(offset)))
        per_landmark_voxel[name].append(expected_voxel)
    assert_row(document["rows"][MAIN], per_landmark_mm, per_landmark_voxel, atol=1e-4)
    # 2 mm slices of sub-04: its voxel errors are shorter than its mm errors (the scan's voxels, not mm)
    assert all(errors["sub-04", name]["error_voxel"] < errors["sub-04", name]["error_mm"] - 1e-3 for name in LANDMARKS)
    # the Markdown table on stdout has every row; the JSON reads back as a table
    for row in ROWS:
        assert re.search(rf"^\| {re.escape(row)} \| {SUBJECTS} \| {2 * SUBJECTS} \|", result.stdout, flags=re.M), row
    assert list(read_json(out / "evaluation.json").rows) == [*ROWS, "unet"]


@pytest.mark.slow
def test_every_row_matches_errors_computed_independently(
    known_run, known_errors: dict, data: dict, reference: dict
) -> None:
    """coarse, n = 1 (pooled) and n = N, argmax and parabola: the export's decodings against the in-memory
    localizer decoded here, through the scan's own truth files."""
    result, out = known_run
    document = json.loads((out / "evaluation.json").read_text())
    for row in ROWS:
        mm, voxel = {name: [] for name in LANDMARKS}, {name: [] for name in LANDMARKS}
        for subject in data["subjects"]:
            affine = data["subjects"][subject]["affine"]
            for name in LANDMARKS:
                truth = reference[subject][MAIN][name] + known_errors["offsets"][subject, name]
                mm[name].append(float(np.linalg.norm(reference[subject][row][name] - truth)))
                voxel[name].append(voxel_distance(reference[subject][row][name], truth, affine))
        assert_row(document["rows"][row], mm, voxel, atol=1e-3)
    # the pooled n = 1 decodings really differ from the model's own n somewhere (else the rows prove little)
    differences = [
        np.linalg.norm(reference[s]["fine n=1 + parabola"][name] - reference[s][MAIN][name])
        for s in data["subjects"] for name in LANDMARKS
    ]  # fmt: skip
    assert max(differences) > 0.05


@pytest.mark.slow
def test_unet_baseline_runs_around_the_models_coarse_estimate(
    known_run, known_errors: dict, data: dict, reference: dict, unet_model: Path
) -> None:
    result, out = known_run
    document = json.loads((out / "evaluation.json").read_text())
    localizer = UNetLocalizer.load(unet_model, CONFIG)
    by_case = {(e["subject"], e["landmark"]): e for e in document["errors"] if e["method"] == "unet"}
    assert len(by_case) == len(data["subjects"]) * len(LANDMARKS)
    for subject, info in data["subjects"].items():
        volume = read_volume(info["image"], CONFIG.spacing_mm)
        grid_voxel = localizer.localize(volume.data, reference[subject]["coarse grid voxel"])
        for k, name in enumerate(LANDMARKS):
            expected_mm = affine_maps.voxel_to_world(grid_voxel[k], volume.voxel_to_world)
            np.testing.assert_allclose(by_case[subject, name]["predicted_world_mm"], expected_mm, atol=1e-3)
            # the U-Net answer lies within its window around the coarse estimate
            coarse_mm = reference[subject]["coarse"][name]
            assert np.all(np.abs(expected_mm - coarse_mm) <= CONFIG.fine.window_size / 2 + 1)


@pytest.mark.slow
def test_figures_show_the_three_best_and_worst_cases(known_run, known_errors: dict) -> None:
    result, out = known_run
    ranked = sorted(known_errors["offsets"], key=lambda case: np.linalg.norm(known_errors["offsets"][case]))
    expected = [f"best-{i + 1}_{s}_{n}.png" for i, (s, n) in enumerate(ranked[:3])]
    expected += [f"worst-{i + 1}_{s}_{n}.png" for i, (s, n) in enumerate(ranked[::-1][:3])]
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(expected)
    for name in expected:
        with Image.open(out / "figures" / name) as image:
            assert image.size == landmark_figure_size_px(1)
            pixels = np.asarray(image.convert("RGB"), dtype=int)
        # ground truth (green) and prediction (red) markers are drawn
        assert np.any((pixels[..., 1] > 200) & (pixels[..., 0] < 60) & (pixels[..., 2] < 60)), name
        assert np.any((pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)), name
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Wrote {out / 'evaluation.json'} and 6 figures")
    assert f"({SUBJECTS} of {SUBJECTS} subjects" in last


# ---------------------------------------------------------------------------------------------------------
# registration baseline, --split, bad files


@pytest.fixture(scope="module")
def registration_run(model_base: Path, data: dict, tmp_path_factory: pytest.TempPathFactory):
    directory = data["dir"]
    truncated = directory / "images" / "truncated.nii.gz"
    good = data["subjects"]["sub-01"]["image"].read_bytes()
    truncated.write_bytes(good[: len(good) // 2])
    thin = directory / "images" / "thin.nii.gz"  # one voxel thick: the model refuses it (INVALID_ARGUMENT)
    nib.save(nib.Nifti1Image(np.random.default_rng(1).normal(size=(1, 20, 20)).astype(np.float32), np.eye(4)),
             str(thin))  # fmt: skip
    write_landmarks(directory / "landmarks" / "only-A.fcsv", {"A": np.zeros(3)})
    rows = data["rows"] + [
        ("bad-truncated", "images/truncated.nii.gz", "landmarks/sub-01.fcsv", "test"),
        ("bad-missing", "images/sub-01.nii.gz", "landmarks/missing.fcsv", "test"),
        ("bad-landmarks", "images/sub-02.nii.gz", "landmarks/only-A.fcsv", "test"),
        ("bad-thin", "images/thin.nii.gz", "landmarks/sub-01.fcsv", "test"),
        ("train-only", "images/not-there.nii.gz", "landmarks/sub-01.fcsv", "train"),  # not in --split test
    ]
    manifest = write_manifest(directory / "with_bad.csv", rows)
    out = tmp_path_factory.mktemp("registration") / "evaluation.json"
    result = run(
        "evaluate", "--model", str(model_base), "--manifest", str(manifest), "--split", "test", "--json", str(out),
        "--baseline", "registration", "--template", str(data["template"]),
        "--template-landmarks", str(data["template_landmarks"]),
    )  # fmt: skip
    return result, out, directory


@pytest.mark.slow
def test_registration_baseline_finds_the_moved_landmarks(registration_run, data: dict) -> None:
    result, out, _ = registration_run
    document = json.loads(out.read_text())
    assert document["methods"] == [*ROWS, "registration"]
    registration = document["rows"]["registration"]
    assert registration["subjects"] == SUBJECTS and registration["overall"]["count"] == 2 * SUBJECTS
    assert registration["overall"]["max_mm"] < 1.0  # exact copies, pure translations
    for row in ROWS:  # every row covers the same subjects
        assert document["rows"][row]["subjects"] == SUBJECTS
    truths = {(s, n): info["truth"][n] for s, info in data["subjects"].items() for n in LANDMARKS}
    for error in document["errors"]:
        np.testing.assert_allclose(error["true_world_mm"], truths[error["subject"], error["landmark"]], atol=1e-6)


@pytest.mark.slow
def test_bad_files_are_reported_on_one_line_and_the_others_go_on(registration_run) -> None:
    result, out, directory = registration_run
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    expected = {
        "bad-truncated": directory / "images" / "truncated.nii.gz",
        "bad-missing": directory / "landmarks" / "missing.fcsv",
        "bad-landmarks": directory / "landmarks" / "only-A.fcsv",
        "bad-thin": directory / "images" / "thin.nii.gz",
    }
    assert len(errors) == len(expected)
    for subject, path in expected.items():
        assert [line for line in errors if line.startswith(f"error: {path}: ") and f"(subject {subject})" in line], (
            subject, errors,
        )  # fmt: skip
    assert "not-there" not in result.stderr  # the train row is not evaluated with --split test
    document = json.loads(out.read_text())
    assert document["subjects"] == [f"sub-0{i}" for i in range(1, SUBJECTS + 1)]
    assert {entry["file"] for entry in document["failed"]} == {str(path) for path in expected.values()}
    assert "refused" in next(e["error"] for e in document["failed"] if e["file"].endswith("thin.nii.gz"))
    assert result.stderr.strip().splitlines()[-1].endswith(f"4 failed: {', '.join(map(str, expected.values()))})")


def test_unwritable_outputs_are_refused_before_any_work(tmp_path: Path) -> None:
    regular = tmp_path / "regular"  # a regular file where a folder should be (root is not stopped by modes)
    regular.write_text("not a folder")
    not_a_model = tmp_path / "not_a_model"  # an error about it would show that the work had begun
    not_a_model.mkdir()
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("subject,image,landmarks\n")
    for option, target in (("--json", regular / "eval.json"), ("--figures", regular / "figures")):
        result = run("evaluate", "--model", str(not_a_model), "--manifest", str(manifest), option, str(target))
        assert result.exit_code == 1, result.output
        assert result.stderr.strip().splitlines()[-1] == (
            f"Error: {target}: cannot write here: {regular} is not a directory"
        )


@pytest.mark.slow
def test_usage_errors_stop_before_loading_anything(model_base: Path, data: dict, tmp_path: Path) -> None:
    manifest = str(data["manifest"])
    result = run("evaluate", "--model", str(model_base), "--manifest", manifest, "--baseline", "registration")
    assert result.exit_code == 2 and "--template" in result.output
    result = run("evaluate", "--model", str(model_base), "--manifest", manifest, "--baseline", "unet")
    assert result.exit_code == 2 and "--unet-model" in result.output
    result = run("evaluate", "--model", str(tmp_path), "--manifest", manifest)
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1].startswith(f"Error: {tmp_path}: ")
    result = run("evaluate", "--model", str(model_base), "--manifest", manifest, "--split", "val")
    assert result.exit_code == 1 and "no subject in split 'val'" in result.output


@pytest.mark.slow
def test_a_unet_trained_for_other_landmarks_is_refused(model_base: Path, data: dict, unet_model: Path,
                                                      tmp_path: Path) -> None:
    other = tmp_path / "unet.keras"
    other.write_bytes(unet_model.read_bytes())
    summary = json.loads(unet_model.with_suffix(".json").read_text())
    summary["config"]["landmarks"] = ["B", "A"]  # the heatmap channels would be swapped
    other.with_suffix(".json").write_text(json.dumps(summary))
    result = run("evaluate", "--model", str(model_base), "--manifest", str(data["manifest"]),
                 "--baseline", "unet", "--unet-model", str(other))  # fmt: skip
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: {other}: trained with another config than the export's: landmarks ['B', 'A'] (export: ['A', 'B'])"
    )


# ---------------------------------------------------------------------------------------------------------
# a separately trained n = 1 model for the n = 1 rows (as in the paper's Table 1a)


@pytest.fixture(scope="module")
def n1_model_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[Path, Path]]:
    directory = tmp_path_factory.mktemp("n1")
    config = CONFIG.replace(superresolution=1)
    runs = (save_training_run(directory / "coarse", "coarse", config, seed=15),
            save_training_run(directory / "fine", "fine", config, seed=16))  # fmt: skip
    export_runs(runs[0], runs[1], directory / "export", "mdgru")
    return directory / "export" / "mdgru", runs


@pytest.mark.slow
def test_an_n1_model_gives_the_n1_rows(model_base: Path, n1_model_base, data: dict, tmp_path: Path) -> None:
    n1_base, n1_runs = n1_model_base
    out = tmp_path / "eval.json"
    result = run("evaluate", "--model", str(model_base), "--manifest", str(data["manifest"]), "--json", str(out),
                 "--n1-model", str(n1_base))  # fmt: skip
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert document["methods"] == list(ROWS)  # the same five rows, in the table's order
    # The n = 1 rows are the n = 1 model's own answers (in-memory localizer, decoded independently here) ...
    config = CONFIG.replace(superresolution=1)
    localizer = TwoStageLocalizer(load_model(str(n1_runs[0] / "model.keras")),
                                  load_model(str(n1_runs[1] / "model.keras")), config)  # fmt: skip
    for parabola, row in ((False, "fine n=1 (argmax)"), (True, "fine n=1 + parabola")):
        errors_mm: dict[str, list[float]] = {name: [] for name in LANDMARKS}
        errors_voxel: dict[str, list[float]] = {name: [] for name in LANDMARKS}
        for info in data["subjects"].values():
            volume = read_volume(info["image"], CONFIG.spacing_mm)
            outputs = {key: value.numpy() for key, value in localizer(tf.constant(volume.data)).items()}
            grid_voxel = outputs["voxel_parabola" if parabola else "voxel_argmax"]
            for k, name in enumerate(LANDMARKS):
                predicted = affine_maps.voxel_to_world(grid_voxel[k], volume.voxel_to_world)
                errors_mm[name].append(float(np.linalg.norm(predicted - info["truth"][name])))
                errors_voxel[name].append(voxel_distance(predicted, info["truth"][name], info["affine"]))
        assert_row(document["rows"][row], errors_mm, errors_voxel, atol=1e-3)
    # ... and not the rows derived from the n = 2 model (other random weights give other answers).
    result = run("evaluate", "--model", str(model_base), "--manifest", str(data["manifest"]), "--json",
                 str(tmp_path / "derived.json"))  # fmt: skip
    assert result.exit_code == 0, result.output
    derived = json.loads((tmp_path / "derived.json").read_text())
    assert derived["rows"]["fine n=1 (argmax)"]["overall"]["mean_mm"] != pytest.approx(
        document["rows"]["fine n=1 (argmax)"]["overall"]["mean_mm"], abs=1e-3
    )
    for row in ("coarse", f"fine n={N} (argmax)", f"fine n={N} + parabola"):  # the main model's rows stay
        assert derived["rows"][row] == document["rows"][row]


@pytest.mark.slow
def test_an_export_with_pooled_decoding_answers_with_the_n1_parabola_row(
    runs, model_base: Path, data: dict, tmp_path: Path
) -> None:
    """`export --pooled-decoding` (with the cheaper refinement pass): the SavedModel's answer is the 'fine n=1 +
    parabola' decoding, evaluate names that row the model's, and model_info records the options. The same
    options on the weights of a plain export of the same runs (--weights-from) give the same SavedModel answers."""
    from mdgru_keras.serving.servable import LocalLocalizationClient

    options = ("--pass-views", "scan,both", "--average-passes",
               "--share-refined-windows", "2", "--pooled-decoding")  # fmt: skip
    result = run("export", "--coarse", str(runs[0]), "--fine", str(runs[1]), "--out", str(tmp_path), "--name", "m",
                 *options)  # fmt: skip
    assert result.exit_code == 0, result.output
    result = run("export", "--weights-from", str(model_base / "1"), "--out", str(tmp_path), "--name", "again",
                 *options)  # fmt: skip
    assert result.exit_code == 0, result.output
    again_info = json.loads((tmp_path / "again" / "1" / "assets" / "model_info.json").read_text())
    assert again_info["exported_again_from"]["path"] == str((model_base / "1").resolve())
    result = run("export", "--weights-from", str(model_base / "1"), "--coarse", str(runs[0]), "--out", str(tmp_path))
    assert result.exit_code == 2 and "not --coarse/--fine and --weights-from" in result.output
    info = json.loads((tmp_path / "m" / "1" / "assets" / "model_info.json").read_text())
    assert info["inference"] == {"fine_passes": 2, "flip_average": False, "average_passes": True,
                                 "protocol_planes": False, "pass_views": ["scan", "both"],
                                 "refine_share_margin_voxel": 2, "pooled_decoding": True,
                                 "shape_prior": None, "shape_prior_tolerance_mm": 10.0,
                                 "aligned_windows": None}  # fmt: skip
    report = tmp_path / "eval.json"
    result = run("evaluate", "--model", str(tmp_path / "m"), "--manifest", str(data["manifest"]), "--json",
                 str(report))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["model_method"] == "fine n=1 + parabola"
    subject = next(iter(data["subjects"].values()))
    image = nib.load(str(subject["image"]))
    client = LocalLocalizationClient(tmp_path / "m" / "1")
    inputs = {"volume": np.asarray(image.dataobj, np.float32), "voxel_to_world": image.affine}
    answer, decodings = client.predict(inputs), client.predict(inputs, "decodings")
    np.testing.assert_allclose(answer["world_mm"], decodings["fine_n1_parabola_world_mm"], atol=1e-4)
    assert not np.allclose(answer["world_mm"], decodings["fine_parabola_world_mm"], atol=1e-3)
    again = LocalLocalizationClient(tmp_path / "again" / "1").predict(inputs)
    for key in ("world_mm", "coarse_world_mm", "confidence", "flip_disagreement_mm"):
        np.testing.assert_allclose(again[key], answer[key], atol=1e-5, err_msg=key)
    result = run("export", "--coarse", str(runs[0]), "--fine", str(runs[1]), "--out", str(tmp_path), "--name", "x",
                 "--fine-passes", "2", "--share-refined-windows", "7")  # fmt: skip
    assert result.exit_code != 0 and "--share-refined-windows 7 leaves no room" in result.output
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


@pytest.mark.slow
def test_a_shape_prior_the_export_cannot_use_is_refused_in_one_line(runs, data: dict, tmp_path: Path) -> None:
    """`export --shape-prior`: the 2-landmark test model is too few for an affine fit, one fine pass leaves
    nothing to re-centre, and `--aligned-windows` has no axes without the prior's fit; `--pass-views` must end on
    the scan and agree with `--fine-passes`. Each is one line naming the source, and nothing is written."""
    common = ("export", "--coarse", str(runs[0]), "--fine", str(runs[1]), "--out", str(tmp_path), "--name", "p")
    prior = ("--shape-prior", str(data["template_landmarks"]))
    for extra, problem in (((*prior, "--fine-passes", "2"), "--shape-prior needs a model of at least 6 landmarks "
                                                            "(this one has 2)"),
                           (prior, "--shape-prior needs --fine-passes 2 or more"),
                           (("--fine-passes", "2", "--aligned-windows", "rotation"),
                            "--aligned-windows needs --shape-prior"),
                           (("--pass-views", "scan,mirror"),
                            "--pass-views must end with a pass that sees the scan"),
                           (("--fine-passes", "3", "--pass-views", "scan,both"),
                            "--pass-views names 2 passes, --fine-passes is 3")):
        result = run(*common, *extra)
        assert result.exit_code == 1, result.output
        last = result.output.strip().splitlines()[-1]
        assert last.startswith("Error: ") and problem in last, last
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())
    result = run(*common, "--pass-views", "scan,sideways")  # a usage error: before anything is read
    assert result.exit_code == 2 and "sideways: each view is scan, mirror or both" in result.output, result.output
    from mdgru_keras.commands.export import export
    from mdgru_keras.geometry.shape_prior import TOLERANCE_MM

    tolerance = next(option for option in export.params if option.name == "shape_prior_tolerance_mm")
    assert tolerance.default == TOLERANCE_MM  # the command's default is the library's


@pytest.mark.slow
def test_an_n1_model_with_more_classes_is_refused(model_base: Path, data: dict) -> None:
    result = run("evaluate", "--model", str(model_base), "--manifest", str(data["manifest"]),
                 "--n1-model", str(model_base))  # fmt: skip
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: ")
    assert last.endswith(f"trained with n = {N} classes per voxel; an n = 1 model is needed")


# ---------------------------------------------------------------------------------------------------------
# the ANTs baseline (optional dependency antspyx)

HAS_ANTS = importlib.util.find_spec("ants") is not None


@pytest.mark.skipif(HAS_ANTS, reason="antspyx is installed: the missing-dependency message cannot be shown")
def test_ants_baseline_without_antspyx_says_how_to_install(data: dict, tmp_path: Path) -> None:
    result = run(
        "evaluate", "--model", str(tmp_path), "--manifest", str(data["manifest"]), "--baseline", "ants",
        "--template", str(data["template"]), "--template-landmarks", str(data["template_landmarks"]),
    )  # fmt: skip
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "pip install 'mdgru-keras[ants]'" in lines[0], result.output


def test_ants_usage_errors(data: dict, tmp_path: Path) -> None:
    manifest = str(data["manifest"])
    result = run("evaluate", "--model", str(tmp_path), "--manifest", manifest, "--baseline", "ants")
    assert result.exit_code == 2 and "--baseline ants needs --template" in result.output
    result = run("evaluate", "--model", str(tmp_path), "--manifest", manifest, "--ants-transform", "Affine")
    assert result.exit_code == 2 and "--ants-transform is used only with --baseline ants" in result.output


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ANTS, reason="antspyx (ANTsPy) is not installed: pip install 'mdgru-keras[ants]'")
def test_ants_baseline_finds_the_moved_landmarks(model_base: Path, data: dict, tmp_path: Path) -> None:
    out = tmp_path / "evaluation.json"
    result = run(
        "evaluate", "--model", str(model_base), "--manifest", str(data["manifest"]), "--json", str(out),
        "--baseline", "ants", "--template", str(data["template"]),
        "--template-landmarks", str(data["template_landmarks"]),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert document["methods"] == [*ROWS, "ants-syn"]
    row = document["rows"]["ants-syn"]
    assert row["subjects"] == SUBJECTS and row["overall"]["max_mm"] < 1.0  # exact copies, pure translations
    assert "ants-syn" in document["median_seconds_per_scan"]
