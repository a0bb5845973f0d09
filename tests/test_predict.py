"""``mdgru-localize predict``: a real (tiny, random-weight) export, run locally and behind gRPC/REST servers.

Local predict loads the SavedModel in this process; ``--server`` goes through the in-process gRPC and REST
servers of :mod:`mdgru_keras.serving` on 127.0.0.1 (and ``tensorflow_model_server`` when installed). All must agree; a
broken file is reported on one line and does not stop the others; .fcsv files round-trip.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image
from scipy import ndimage

from mdgru_keras.cli import main as cli
from mdgru_keras.commands import predict as predict_command
from mdgru_keras.config import load_preset
from mdgru_keras.export import export_runs
from mdgru_keras.figures import landmark_figure_size_px
from mdgru_keras.geometry import affine_maps
from mdgru_keras.io import read_landmarks
from mdgru_keras.prediction import (
    LOST_FLAGGED_FRACTION,
    LOST_MIN_LANDMARKS,
    MAX_COARSE_SHIFT_MM,
    MAX_FLIP_DISAGREEMENT_MM,
    MIN_CONFIDENCE,
    MIN_SCAN_VOXELS,
    QualityThresholds,
    ScanPrediction,
    predictions_csv,
    predictions_json,
)
from mdgru_keras.serving.grpc_server import GrpcServer
from mdgru_keras.serving.rest_server import RestServer
from mdgru_keras.serving.servable import Servable
from mdgru_keras.serving.testing import model_server, save_training_run

LANDMARKS = ("A", "B")
CONFIG = load_preset("tiny").replace(landmarks=LANDMARKS)
MODEL = "mdgru"


@pytest.fixture(scope="module")
def model_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("predict")
    coarse = save_training_run(directory / "coarse", "coarse", CONFIG, seed=3)
    fine = save_training_run(directory / "fine", "fine", CONFIG, seed=4)
    export_runs(coarse, fine, directory / "export", MODEL)
    return directory / "export" / MODEL


def save_scan(path: Path, shape: tuple[int, int, int], voxel_to_world: np.ndarray, seed: int, dtype: str) -> Path:
    rng = np.random.default_rng(seed)
    volume = ndimage.gaussian_filter(rng.normal(size=shape), 1.2) * 300 + 50
    nib.save(nib.Nifti1Image(volume.astype(dtype), voxel_to_world), str(path))
    return path


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three good scans (float32 oblique, int16 flipped, float32 in another folder with a repeated name)."""
    directory = tmp_path_factory.mktemp("scans")
    (directory / "other").mkdir()
    oblique = np.eye(4)
    angle = np.deg2rad(12)
    oblique[:3, :3] = affine_maps.rotation_matrix([0.0, 0.0, angle])
    oblique[:3, :3] = oblique[:3, :3] @ np.diag([1.1, 0.9, 1.6])
    oblique[:3, 3] = [-10.0, 5.0, 2.5]
    flipped = np.diag([-1.0, 1.2, -0.8, 1.0])
    flipped[:3, 3] = [15.0, -3.0, 9.0]
    return {
        "oblique": save_scan(directory / "subject.nii.gz", (20, 24, 14), oblique, 0, "float32"),
        "int16": save_scan(directory / "flipped.nii", (22, 18, 26), flipped, 1, "int16"),
        "repeated_name": save_scan(directory / "other" / "subject.nii.gz", (16, 20, 18), np.eye(4), 2, "float32"),
    }


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory, scans: dict[str, Path]) -> Path:
    """A truncated .nii.gz (a download cut short)."""
    path = tmp_path_factory.mktemp("broken") / "truncated.nii.gz"
    data = scans["oblique"].read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture(scope="module")
def servers(model_base: Path) -> Iterator[tuple[str, str]]:
    servable = Servable(model_base, MODEL)
    with GrpcServer(servable=servable) as grpc_server, RestServer(servable=servable) as rest_server:
        yield grpc_server.address, rest_server.url


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, ["predict", *args])


def landmarks_by_file(document: dict) -> dict[str, dict]:
    return {scan["file"]: scan["landmarks"] for scan in document["scans"]}


@pytest.fixture(scope="module")
def local_json(model_base: Path, scans: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Local predict of all good scans as JSON (the reference of the tests below), with figures."""
    directory = tmp_path_factory.mktemp("local")
    result = run(
        *map(str, scans.values()), "--model", str(model_base), "--out", str(directory / "out.json"),
        "--figure", str(directory / "figures"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1].startswith(f"Wrote {directory / 'out.json'} (3 of 3 scans")
    document = json.loads((directory / "out.json").read_text())
    document["figure_dir"] = directory / "figures"
    return document


def assert_same_landmarks(actual: dict, expected: dict, atol: float = 1e-5) -> None:
    """The same landmarks, positions equal to float32 rounding (``atol`` mm / voxels): the coarse input
    convolution is a float32 matrix product whose summation order can differ between calls on other threads
    (a server's against the local run: 1.9e-6 mm seen on a 15 mm coordinate)."""
    assert set(actual) == set(expected)
    for path, landmarks in expected.items():
        assert list(actual[path]) == list(landmarks), path
        for name, values in landmarks.items():
            for key in ("world_mm", "voxel", "coarse_world_mm", "coarse_voxel"):
                np.testing.assert_allclose(actual[path][name][key], values[key], atol=atol, err_msg=f"{path} {key}")
            assert actual[path][name]["confidence"] == pytest.approx(values["confidence"], abs=1e-6)
            assert actual[path][name]["status"] == values["status"]


def expected_status(
    values: dict, shape: tuple[int, ...], min_confidence: float, max_coarse_shift_mm: float = MAX_COARSE_SHIFT_MM
) -> str:
    """The status predict should give to a landmark (its JSON ``values``), computed here from the file's shape
    (models exported without flip averaging, as here, are never unstable)."""
    outside = any(v < -0.5 or v > n - 0.5 for v, n in zip(values["voxel"], shape))
    shift_mm = np.linalg.norm(np.subtract(values["world_mm"], values["coarse_world_mm"]))
    assert values["coarse_shift_mm"] == pytest.approx(shift_mm, abs=1e-9)
    problems = (["outside_image"] * outside + ["low_confidence"] * (values["confidence"] < min_confidence)
                + ["coarse_fine_disagree"] * bool(max_coarse_shift_mm and shift_mm > max_coarse_shift_mm))
    return ";".join(problems) or "ok"


@pytest.mark.slow
def test_local_json_reports_every_landmark_in_world_mm_and_file_voxels(local_json: dict, scans: dict) -> None:
    assert local_json["failed"] == []
    by_file = landmarks_by_file(local_json)
    assert list(by_file) == [str(path) for path in scans.values()]
    for path, landmarks in by_file.items():
        assert list(landmarks) == list(LANDMARKS)
        voxel_to_world = nib.load(path).affine
        for values in landmarks.values():
            # world_mm is the file's voxel through the file's own affine
            world_mm = voxel_to_world[:3, :3] @ np.array(values["voxel"]) + voxel_to_world[:3, 3]
            np.testing.assert_allclose(values["world_mm"], world_mm, atol=1e-6)
            assert 0.0 <= values["confidence"] <= 1.0
            shape = nib.load(path).shape
            assert values["status"] == expected_status(values, shape, MIN_CONFIDENCE)
    assert local_json["min_confidence"] == MIN_CONFIDENCE
    assert local_json["max_coarse_shift_mm"] == MAX_COARSE_SHIFT_MM


@pytest.mark.slow
def test_figures_one_png_per_scan_with_a_row_per_landmark(local_json: dict) -> None:
    figures = sorted(p.name for p in local_json["figure_dir"].iterdir())
    assert figures == ["flipped.png", "subject-2.png", "subject.png"]
    with Image.open(local_json["figure_dir"] / "subject.png") as image:
        assert image.size == landmark_figure_size_px(len(LANDMARKS))


@pytest.mark.slow
def test_grpc_and_rest_servers_give_the_local_results(local_json: dict, scans: dict, servers: tuple[str, str]) -> None:
    expected = landmarks_by_file(local_json)
    for server in servers:  # "127.0.0.1:PORT" (gRPC) and "http://127.0.0.1:PORT" (REST)
        result = run(*map(str, scans.values()), "--server", server, "--model-name", MODEL)
        assert result.exit_code == 0, result.output
        document = json.loads(result.stdout)
        assert document["model"] == server
        assert_same_landmarks(landmarks_by_file(document), expected)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tensorflow_model_server") is None, reason="tensorflow_model_server is not on PATH")
def test_tensorflow_model_server_gives_the_local_results(
    local_json: dict, scans: dict, model_base: Path, tmp_path: Path
) -> None:
    with model_server(model_base, MODEL, tmp_path / "tfs.log") as (address, rest_url):
        for server in (address, rest_url):
            result = run(*map(str, scans.values()), "--server", server)
            assert result.exit_code == 0, result.output
            assert_same_landmarks(landmarks_by_file(json.loads(result.stdout)), landmarks_by_file(local_json), 1e-6)


@pytest.mark.slow
def test_csv_has_one_row_per_scan_and_landmark(local_json: dict, scans: dict, servers: tuple[str, str]) -> None:
    result = run(*map(str, scans.values()), "--server", servers[0], "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(row["file"], row["landmark"]) for row in rows] == [
        (str(path), name) for path in scans.values() for name in LANDMARKS
    ]
    expected = landmarks_by_file(local_json)
    for row in rows:
        values = expected[row["file"]][row["landmark"]]
        assert [float(row[c]) for c in ("x_mm", "y_mm", "z_mm")] == pytest.approx(values["world_mm"], abs=1e-9)
        assert [float(row[c]) for c in ("voxel_i", "voxel_j", "voxel_k")] == pytest.approx(values["voxel"], abs=1e-9)
        assert row["status"] == values["status"]


@pytest.mark.slow
def test_landmark_subset_and_unknown_names(local_json: dict, scans: dict, servers: tuple[str, str], model_base: Path):
    subset = run(str(scans["oblique"]), "--server", servers[0], "--landmarks", "B")
    assert subset.exit_code == 0, subset.output
    landmarks = landmarks_by_file(json.loads(subset.stdout))[str(scans["oblique"])]
    assert list(landmarks) == ["B"]
    assert landmarks["B"] == landmarks_by_file(local_json)[str(scans["oblique"])]["B"]
    every = run(str(scans["oblique"]), "--server", servers[0], "--landmarks", "all")
    assert every.exit_code == 0, every.output
    assert landmarks_by_file(json.loads(every.stdout)) == {str(scans["oblique"]): landmarks_by_file(local_json)[
        str(scans["oblique"])]}  # fmt: skip
    for source in (["--server", servers[0]], ["--model", str(model_base)]):
        for names in ("B,PMJ", "b,PMJ"):  # case-sensitive: b is not B
            unknown = run(str(scans["oblique"]), *source, "--landmarks", names)
            assert unknown.exit_code == 2
            bad = "PMJ" if names == "B,PMJ" else "b, PMJ"
            assert unknown.stderr.strip().splitlines()[-1] == (
                f"Error: Invalid value for '--landmarks': unknown landmark{'s' if ',' in bad else ''} {bad}; "
                "the model knows 2: A, B"
            )


@pytest.mark.slow
def test_a_broken_file_does_not_stop_the_others(
    model_base: Path, scans: dict, broken: Path, local_json: dict, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.nii.gz"
    images = [str(scans["oblique"]), str(broken), str(missing), str(scans["int16"])]
    out = tmp_path / "fcsv"
    result = run(*images, "--model", str(model_base / "1"), "--format", "fcsv", "--out", str(out))
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2
    assert errors[0].startswith(f"error: {broken}: cannot read voxel data")
    assert errors[1] == f"error: {missing}: no such file"
    good = landmarks_by_file(local_json)
    flagged = sum(any(v["status"] != "ok" for v in good[str(scans[key])].values()) for key in ("oblique", "int16"))
    flagged_part = f"; {flagged} scan{'s' if flagged != 1 else ''} with flagged landmarks (see warnings)"
    assert result.stdout.strip().splitlines()[-1] == (
        f"Wrote 2 .fcsv files to {out} (2 of 4 scans, 4 landmarks{flagged_part * bool(flagged)}; "
        f"2 failed: {broken}, {missing})"
    )
    # the good scans are written, and their .fcsv files read back to the same RAS coordinates
    assert sorted(p.name for p in out.iterdir()) == ["flipped.fcsv", "subject.fcsv"]
    expected = landmarks_by_file(local_json)
    for name, scan in (("subject.fcsv", scans["oblique"]), ("flipped.fcsv", scans["int16"])):
        landmarks = read_landmarks(out / name)
        assert list(landmarks) == list(LANDMARKS)
        for landmark, world_mm in landmarks.items():
            np.testing.assert_array_equal(world_mm, expected[str(scan)][landmark]["world_mm"])


@pytest.mark.slow
def test_debug_shows_the_traceback_of_each_failed_scan(model_base: Path, scans: dict, tmp_path: Path) -> None:
    missing = tmp_path / "missing.nii.gz"
    images = [str(scans["oblique"]), str(missing)]
    plain = run(*images, "--model", str(model_base))
    assert plain.exit_code == 1 and "Traceback" not in plain.stderr
    for result in (CliRunner().invoke(cli, ["--debug", "predict", *images, "--model", str(model_base)]),
                   CliRunner().invoke(cli, ["predict", *images, "--model", str(model_base)], env={"MDGRU_DEBUG": "1"})):
        assert result.exit_code == 1  # as without --debug: the scan is skipped, the other written
        stderr = result.stderr
        assert "Traceback (most recent call last):" in stderr
        assert f"mdgru_keras.errors.InputError: {missing}: no such file" in stderr
        assert stderr.index("Traceback") < stderr.index(f"error: {missing}: no such file")
        assert json.loads(result.stdout)["scans"][0]["file"] == str(scans["oblique"])


@pytest.mark.slow
def test_scans_too_small_for_the_model_are_refused(
    model_base: Path, servers: tuple[str, str], scans: dict, tmp_path: Path
) -> None:
    # fewer than MIN_SCAN_VOXELS along an axis: refused by the client, with --model and --server alike
    small = {
        save_scan(tmp_path / "thin.nii.gz", (12, 1, 10), np.eye(4), 5, "float32"): "12 x 1 x 10 voxels (12 x 1 x 10",
        save_scan(tmp_path / "flat.nii.gz", (1, 3, 3), np.diag([0.9, 1.0, 1.0, 1.0]), 6, "int16"): (
            "1 x 3 x 3 voxels (0.9 x 3 x 3"
        ),
    }
    tiny_but_enough = save_scan(tmp_path / "cube.nii.gz", (2, 2, 2), np.eye(4), 7, "float32")
    for source in (["--model", str(model_base)], ["--server", servers[0]]):
        out = tmp_path / "out.json"
        result = run(*map(str, small), str(tiny_but_enough), *source, "--out", str(out))
        assert result.exit_code == 1
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert errors == [
            f"error: {path}: too small for landmark localization: {size} mm); the model needs at least "
            f"{MIN_SCAN_VOXELS} voxels along each axis"
            for path, size in small.items()
        ]
        document = json.loads(out.read_text())
        assert [entry["file"] for entry in document["failed"]] == [str(path) for path in small]
        # 2 voxels per axis is the model's own minimum: localized (its answers carry a status)
        assert [scan["file"] for scan in document["scans"]] == [str(tiny_but_enough)]


@pytest.mark.slow
def test_landmarks_are_flagged_by_position_and_confidence(model_base: Path, scans: dict, local_json: dict):
    images = [str(path) for path in scans.values()]
    for min_confidence in (0.0, 1.0):
        result = run(*images, "--model", str(model_base), "--min-confidence", str(min_confidence),
                     "--max-coarse-shift", "0")  # the coarse-fine flag off: tested on its own below
        assert result.exit_code == 0, result.output  # flagged landmarks are written, the exit status stays 0
        document = json.loads(result.stdout)
        assert document["min_confidence"] == min_confidence
        warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
        expected_warnings = []
        for path, landmarks in landmarks_by_file(document).items():
            shape = nib.load(path).shape
            statuses = {}
            for name, values in landmarks.items():
                status = expected_status(values, shape, min_confidence, 0.0)
                assert values["status"] == status
                statuses[name] = status
            outside = [name for name, status in statuses.items() if "outside_image" in status]
            low = [f"{name} ({landmarks[name]['confidence']:.2g})" for name, s in statuses.items() if "low" in s]
            parts = ([f"outside the image: {', '.join(outside)}"] if outside else []) + (
                [f"confidence below {min_confidence:g}: {', '.join(low)}"] if low else []
            )
            if parts:
                expected_warnings.append(f"warning: {path}: {'; '.join(parts)}")
        assert warnings == expected_warnings
        if min_confidence == 1.0:  # no confidence reaches 1: every landmark is flagged, one line per scan
            assert len(warnings) == len(images)
            assert all("low_confidence" in v["status"] for s in document["scans"] for v in s["landmarks"].values())
        else:
            assert not any("low_confidence" in line for line in warnings)
        assert_same_landmarks(  # the answers themselves do not depend on the threshold
            {k: {n: {**v, "status": None} for n, v in lm.items()} for k, lm in landmarks_by_file(document).items()},
            {k: {n: {**v, "status": None} for n, v in lm.items()} for k, lm in landmarks_by_file(local_json).items()},
        )


def test_status_of_a_prediction() -> None:
    """Half a voxel beyond the array is still inside; NaN positions and confidences are flagged."""
    shape = (10, 20, 30)
    voxel = np.array([
        [-0.5, 0.0, 29.5],  # on the outer faces of the first and last voxels: inside
        [-0.51, 5.0, 5.0],  # beyond the first voxel's outer face
        [4.0, 19.51, 5.0],  # beyond the last voxel's outer face
        [np.nan, 1.0, 1.0],
        [9.0, 19.0, 29.0],
    ])  # fmt: skip
    names = ("A", "B", "C", "D", "E")
    prediction = ScanPrediction(
        path="scan.nii.gz",
        landmark_names=names,
        world_mm=voxel,
        voxel=voxel,
        coarse_world_mm=voxel,
        coarse_voxel=voxel,
        confidence=np.array([0.5, 0.5, 0.001, 0.5, np.nan], dtype=np.float32),
        shape=shape,
    )
    assert prediction.outside().tolist() == [False, True, True, True, False]
    # D's NaN position is also no distance from its coarse estimate: coarse_fine_disagree
    assert prediction.statuses(QualityThresholds(0.01)) == ["ok", "outside_image", "outside_image;low_confidence",
                                         "outside_image;coarse_fine_disagree", "low_confidence"]  # fmt: skip
    assert prediction.statuses(QualityThresholds(0.0, max_coarse_shift_mm=0.0)) == [
        "ok", "outside_image", "outside_image", "outside_image", "low_confidence"
    ]  # fmt: skip
    assert prediction.warning(QualityThresholds(0.01, max_coarse_shift_mm=0.0)) == (
        "scan.nii.gz: outside the image: B, C, D; confidence below 0.01: C (0.001), E (nan)"
    )
    subset = prediction.select(["A", "E"])
    assert subset.shape == shape and subset.statuses(QualityThresholds(0.01)) == ["ok", "low_confidence"]
    assert prediction.select(["A"]).warning(QualityThresholds(0.01)) is None
    unknown_shape = dataclasses.replace(prediction, shape=None)
    assert not unknown_shape.outside().any()


def test_unstable_landmarks_are_flagged_by_their_flip_disagreement() -> None:
    voxel = np.zeros((3, 3))
    prediction = ScanPrediction(
        path="scan.nii.gz", landmark_names=("A", "B", "C"), world_mm=voxel, voxel=voxel, coarse_world_mm=voxel,
        coarse_voxel=voxel, confidence=np.full(3, 0.5, np.float32), shape=(10, 10, 10),
        flip_disagreement_mm=np.array([1.0, 9.0, np.nan]),
    )  # fmt: skip
    assert prediction.statuses(QualityThresholds(0.01, 8.0)) == ["ok", "unstable", "unstable"]
    assert prediction.statuses(QualityThresholds(0.01, 10.0)) == ["ok", "ok", "unstable"]
    assert prediction.warning(QualityThresholds(0.01, 8.0)) == (
        "scan.nii.gz: mirror-image estimates over 8 mm apart: B (9.0 mm), C (nan mm)"
    )
    row = prediction.to_json(QualityThresholds(0.01, 8.0))["landmarks"]["B"]
    assert row["flip_disagreement_mm"] == 9.0 and row["status"] == "unstable"
    # exports without flip averaging answer without the output: zeros, never unstable
    outputs = {"landmark_names": np.array(["A"]), "world_mm": voxel[:1], "voxel": voxel[:1],
               "coarse_world_mm": voxel[:1], "coarse_voxel": voxel[:1], "confidence": np.ones(1)}  # fmt: skip
    assert ScanPrediction.from_outputs("old.nii", outputs).statuses() == ["ok"]


def test_landmarks_far_from_their_coarse_estimate_are_flagged() -> None:
    world_mm = np.zeros((3, 3))
    coarse_world_mm = np.array([[3.0, 4.0, 0.0], [0.0, 12.0, 0.0], [np.nan, 0.0, 0.0]])
    prediction = ScanPrediction(
        path="scan.nii.gz", landmark_names=("A", "B", "C"), world_mm=world_mm, voxel=world_mm,
        coarse_world_mm=coarse_world_mm, coarse_voxel=coarse_world_mm, confidence=np.full(3, 0.5, np.float32),
        shape=(10, 10, 10), flip_disagreement_mm=np.array([0.0, 9.0, 0.0]),
    )  # fmt: skip
    assert prediction.coarse_shift_mm()[:2].tolist() == [5.0, 12.0]
    assert prediction.statuses(QualityThresholds(0.01, 8.0, 10.0)) == [
        "ok", "unstable;coarse_fine_disagree", "coarse_fine_disagree"
    ]  # fmt: skip
    # NaN: flagged
    assert prediction.statuses(QualityThresholds(0.01, 10.0, 12.0)) == ["ok", "ok", "coarse_fine_disagree"]
    for off in (0.0, None):
        assert prediction.statuses(QualityThresholds(0.01, 10.0, off)) == ["ok", "ok", "ok"]
    assert prediction.warning(QualityThresholds(0.01, 10.0, 4.0)) == (
        "scan.nii.gz: fine estimate over 4 mm from the coarse one: A (5.0 mm), B (12.0 mm), C (nan mm)"
    )
    row = prediction.to_json(QualityThresholds(0.01, 10.0, 10.0))["landmarks"]["B"]
    assert row["coarse_shift_mm"] == 12.0 and row["status"] == "coarse_fine_disagree"
    rows = list(csv.DictReader(io.StringIO(predictions_csv([prediction], QualityThresholds(0.01, 10.0, 10.0)))))
    assert [(r["coarse_shift_mm"], r["status"]) for r in rows[:2]] == [("5.0", "ok"), ("12.0", "coarse_fine_disagree")]
    document = json.loads(predictions_json([prediction], [], "model", QualityThresholds(0.01, 10.0, 0.0)))
    assert document["max_coarse_shift_mm"] is None  # switched off
    assert {v["status"] for v in document["scans"][0]["landmarks"].values()} == {"ok"}


def test_a_scan_with_most_landmarks_flagged_is_called_probably_lost() -> None:
    """Three quarters or more of 12 landmarks flagged: the warning starts by saying the model is probably lost;
    fewer, or a model of fewer than LOST_MIN_LANDMARKS landmarks, and it only names them."""
    assert LOST_FLAGGED_FRACTION == 0.75 and LOST_MIN_LANDMARKS == 8
    names = tuple(f"L{k}" for k in range(12))

    def scan(unstable: int, count: int = 12) -> ScanPrediction:
        zeros = np.zeros((count, 3))
        disagreement = np.where(np.arange(count) < unstable, 20.0, 0.0)
        return ScanPrediction(path="scan.nii.gz", landmark_names=names[:count], world_mm=zeros, voxel=zeros,
                              coarse_world_mm=zeros, coarse_voxel=zeros, confidence=np.full(count, 0.5, np.float32),
                              shape=(10, 10, 10), flip_disagreement_mm=disagreement)  # fmt: skip

    thresholds = QualityThresholds(0.01, 8.0)
    lost = scan(9)  # 9 of 12 = 0.75
    assert lost.probably_lost(thresholds)
    assert lost.warning(thresholds).startswith(
        "scan.nii.gz: 9 of 12 landmarks flagged, the model is probably lost in this scan (check it by eye: "
        "--figure or --report); mirror-image estimates over 8 mm apart: L0 (20.0 mm), "
    )
    assert not lost.probably_lost(QualityThresholds(0.01, 30.0)) and lost.warning(QualityThresholds(0.01, 30.0)) is None
    not_lost = scan(8)
    assert not not_lost.probably_lost(thresholds)
    assert not_lost.warning(thresholds).startswith("scan.nii.gz: mirror-image estimates over 8 mm apart: L0 ")
    small = scan(7, count=7)  # every landmark flagged, but too few landmarks to judge the scan
    assert not small.probably_lost(thresholds)
    assert "probably lost" not in small.warning(thresholds)


@pytest.mark.slow
def test_coarse_fine_disagreement_through_predict(model_base: Path, scans: dict, tmp_path: Path) -> None:
    images = [str(path) for path in scans.values()]
    threshold = 1e-6  # the fine stage moves every landmark off its coarse estimate: all are flagged
    result = run(*images, "--model", str(model_base), "--max-coarse-shift", str(threshold), "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == len(images) * len(LANDMARKS)
    for row in rows:
        shift_mm = np.linalg.norm([float(row[f"{axis}_mm"]) - float(row[f"coarse_{axis}_mm"]) for axis in "xyz"])
        assert float(row["coarse_shift_mm"]) == pytest.approx(shift_mm) and shift_mm > threshold
        assert "coarse_fine_disagree" in row["status"].split(";")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == len(images)
    assert all(f"fine estimate over {threshold:g} mm from the coarse one: A (" in line for line in warnings)
    summary = result.stderr.strip().splitlines()[-1]
    assert summary.endswith(f"; {len(images)} scans with flagged landmarks (see warnings))")
    out = tmp_path / "scan.fcsv"
    result = run(images[0], "--model", str(model_base), "--max-coarse-shift", str(threshold), "--format", "fcsv",
                 "--out", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    descriptions = [line.split(",")[12] for line in out.read_text().splitlines() if not line.startswith("#")]
    assert all(d.startswith("status ") and "coarse_fine_disagree" in d and " mm; coarse shift " in d
               for d in descriptions)  # fmt: skip


def test_an_ambiguous_world_space_gets_a_warning(model_base: Path, scans: dict, local_json: dict, tmp_path: Path):
    """The oblique scan with a qform 6 mm off its sform: a warning line saying so, the landmarks of the sform (as
    nibabel reads the file), exit status 0, and no flagged-scan count for it."""
    image = nib.load(scans["oblique"])
    qform = image.affine.copy()
    qform[:3, 3] += [6.0, 0.0, 0.0]
    image.set_qform(qform, code=1)
    ambiguous = tmp_path / "subject.nii.gz"
    nib.save(image, str(ambiguous))
    result = run(str(ambiguous), "--model", str(model_base), "--out", str(tmp_path / "out.json"))
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings[0] == (f"warning: {ambiguous}: sform and qform differ by up to 6 mm (codes 2 and 1): this "
                           "program, nibabel, FSL and FreeSurfer use the sform, 3D Slicer and ANTs (ITK) the qform, "
                           "so points placed or shown there may be off by as much; make the two agree (e.g. "
                           "fslorient -copysform2qform)")  # fmt: skip
    # the toy model's own landmark flags may follow on a line of their own; only they count as flagged
    assert len(warnings) <= 2 and "sform" not in "".join(warnings[1:])
    assert ("1 scan with flagged landmarks" in result.stdout.strip().splitlines()[-1]) == (len(warnings) == 2)
    document = json.loads((tmp_path / "out.json").read_text())
    assert_same_landmarks({"scan": landmarks_by_file(document)[str(ambiguous)]},
                          {"scan": landmarks_by_file(local_json)[str(scans["oblique"])]})  # fmt: skip


@pytest.mark.slow
def test_slicer_point_lists_carry_each_landmark_status(model_base: Path, scans: dict, local_json: dict, tmp_path):
    import json as json_module

    expected = landmarks_by_file(local_json)[str(scans["oblique"])]
    for fmt in ("mrk.json", "fcsv"):
        out = tmp_path / f"scan.{fmt}"
        result = run(str(scans["oblique"]), "--model", str(model_base / "1"), "--format", fmt, "--out", str(out))
        assert result.exit_code == 0, result.output
        landmarks = read_landmarks(out)
        for landmark, world_mm in landmarks.items():
            np.testing.assert_allclose(world_mm, expected[landmark]["world_mm"], atol=1e-6)
        if fmt == "mrk.json":
            points = json_module.loads(out.read_text())["markups"][0]["controlPoints"]
            descriptions = {point["label"]: point["description"] for point in points}
        else:
            rows = [line.split(",") for line in out.read_text().splitlines() if not line.startswith("#")]
            descriptions = {row[11]: row[12] for row in rows}
        for landmark, values in expected.items():
            assert descriptions[landmark].startswith(f"status {values['status']}; confidence ")


def test_the_help_states_the_library_thresholds() -> None:
    assert predict_command.MIN_CONFIDENCE == MIN_CONFIDENCE
    assert predict_command.MAX_FLIP_DISAGREEMENT_MM == MAX_FLIP_DISAGREEMENT_MM
    assert predict_command.MAX_COARSE_SHIFT_MM == MAX_COARSE_SHIFT_MM
    help_text = " ".join(CliRunner().invoke(cli, ["predict", "--help"]).output.split())
    assert f"smaller than {MIN_SCAN_VOXELS} voxels along an axis" in help_text
    assert f"[default: {MIN_CONFIDENCE:g};" in help_text


@pytest.mark.slow
def test_usage_errors(scans: dict, model_base: Path, tmp_path: Path) -> None:
    both = run(str(scans["oblique"]), "--model", str(model_base), "--server", "127.0.0.1:1")
    assert both.exit_code == 2 and "at most one of --model" in both.output
    fcsv_without_out = run(str(scans["oblique"]), "--model", str(model_base), "--format", "fcsv")
    assert fcsv_without_out.exit_code == 2 and "give --out" in fcsv_without_out.output
    not_a_model = run(str(scans["oblique"]), "--model", str(tmp_path))
    assert not_a_model.exit_code == 1 and f"{tmp_path}: no saved_model.pb" in not_a_model.output


def last_error_line(result: Result) -> str:
    """The one error line of a run that stopped (the CLI's error boundary): the last line on standard error."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.lower().startswith("error")] == lines[-1:], lines
    return lines[-1]


@pytest.mark.slow
def test_an_unwritable_out_is_one_line(model_base: Path, scans: dict, tmp_path: Path) -> None:
    # (a read-only folder would not stop root, who may run the tests: a regular file where a folder should be)
    regular = tmp_path / "regular"
    regular.write_text("not a folder")
    out = regular / "out.json"
    result = run(str(scans["oblique"]), "--model", str(model_base), "--out", str(out))
    assert last_error_line(result) == f"Error: {out}: cannot write here: {regular} is not a directory"
    folder = tmp_path / "folder"
    folder.mkdir()
    result = run(str(scans["oblique"]), "--model", str(model_base), "--format", "csv", "--out", str(folder))
    assert last_error_line(result) == f"Error: {folder}: Is a directory"
    assert list(folder.iterdir()) == []


def test_unwritable_outputs_are_refused_before_any_work(tmp_path: Path) -> None:
    # (as root, a read-only folder does not stop writing: a regular file in the way, or /proc, which root
    # cannot write either). A folder that is not a model and a scan that does not exist: an error about
    # either would show that the work had begun before the outputs were checked.
    regular = tmp_path / "regular"
    regular.write_text("not a folder")
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    before = sorted(tmp_path.iterdir())
    scan = str(tmp_path / "missing.nii.gz")
    in_the_way = f"cannot write here: {regular} is not a directory"
    cases = {
        "json under a file": (["--out", str(regular / "out.json")], f"{regular / 'out.json'}: {in_the_way}"),
        "csv in a new folder under a file": (["--format", "csv", "--out", str(regular / "new" / "out.csv")],
                                             f"{regular / 'new' / 'out.csv'}: {in_the_way}"),
        "json onto a folder": (["--out", str(tmp_path)], f"{tmp_path}: Is a directory"),
        "fcsv folder under a file": (["--format", "fcsv", "--out", str(regular / "points")],
                                     f"{regular / 'points'}: {in_the_way}"),
        "mrk.json file under a file": (["--format", "mrk.json", "--out", str(regular / "scan.mrk.json")],
                                       f"{regular / 'scan.mrk.json'}: {in_the_way}"),
        "figures under a file": (["--figure", str(regular / "figures")], f"{regular / 'figures'}: {in_the_way}"),
        "under a file in /proc": (["--out", "/proc/version/out.json"],
                                  "/proc/version/out.json: cannot write here: /proc/version is not a directory"),
        "in /proc": (["--format", "csv", "--out", "/proc/out.csv"], "/proc/out.csv: cannot write in /proc: "),
    }
    for case, (options, expected) in cases.items():
        result = run(scan, "--model", str(not_a_model), *options)
        assert last_error_line(result).startswith(f"Error: {expected}"), case
        assert "predict" not in result.stderr  # no progress bar: not one scan was tried
    assert sorted(tmp_path.iterdir()) == before  # the checks leave nothing behind


@pytest.mark.slow
def test_a_corrupt_saved_model_is_one_line(model_base: Path, scans: dict, tmp_path: Path) -> None:
    pb_damaged = tmp_path / "pb" / "1"
    shutil.copytree(model_base / "1", pb_damaged)
    saved_model_pb = pb_damaged / "saved_model.pb"
    saved_model_pb.write_bytes(saved_model_pb.read_bytes()[: saved_model_pb.stat().st_size // 2])  # cut short
    result = run(str(scans["oblique"]), "--model", str(pb_damaged))
    assert last_error_line(result).startswith(f"Error: {saved_model_pb}: not a readable SavedModel (")
    variables_damaged = tmp_path / "variables" / "1"
    shutil.copytree(model_base / "1", variables_damaged)
    for path in (variables_damaged / "variables").glob("variables.data-*"):
        path.write_bytes(path.read_bytes()[:100])
    result = run(str(scans["oblique"]), "--model", str(variables_damaged))
    assert last_error_line(result).startswith(f"Error: {variables_damaged}: cannot load the SavedModel (")
