"""The export: two training runs -> one SavedModel in TF Serving's layout, whose graph does the whole localization.

A tiny-preset model with random weights (two landmarks); small synthetic NIfTI scans with oblique, flipped,
permuted and anisotropic affines. The reference is the in-memory :class:`TwoStageLocalizer` on the NumPy
path (``mdgru_keras.io.read_volume``); the export is reloaded in a fresh process through ``predict``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from scipy import ndimage

from mdgru_keras.cli import main as cli
from mdgru_keras.config import load_preset
from mdgru_keras.errors import InputError
from mdgru_keras.export import (
    MODEL_INFO_FILE,
    OUTPUTS,
    ExportedLocalizer,
    combine_configs,
    existing_versions,
    export_localizer,
    max_grid_size,
    next_version,
    read_model_info,
)
from mdgru_keras.geometry import affine_maps
from mdgru_keras.geometry.resampling import central_grid_crop, central_grid_crop_tf
from mdgru_keras.geometry.windows import centered_window_origin
from mdgru_keras.io import read_volume
from mdgru_keras.localizer import TwoStageLocalizer
from mdgru_keras.networks import load_model
from mdgru_keras.serving import ServingError
from mdgru_keras.serving.grpc_client import GrpcLocalizationClient
from mdgru_keras.serving.grpc_server import GrpcServer
from mdgru_keras.serving.servable import Servable
from mdgru_keras.serving.testing import model_server, save_training_run

ROOT = Path(__file__).resolve().parents[1]
LANDMARKS = ("A", "B")
CONFIG = load_preset("tiny").replace(landmarks=LANDMARKS)
DATASET = {"landmarks": list(LANDMARKS), "spacing_mm": 1.0, "counts": {"train": 3}, "created_by": "test"}
MODEL = "mdgru"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("runs")
    # The fine run may differ in settings that do not fix the grid or the decoding (here: its training).
    fine_config = CONFIG.replace(training=dataclasses.replace(CONFIG.training, epochs=3, seed=7))
    coarse = save_training_run(directory / "coarse", "coarse", CONFIG, seed=1, dataset=DATASET)
    fine = save_training_run(directory / "fine", "fine", fine_config, seed=2)
    return coarse, fine


@pytest.fixture(scope="module")
def base_dir(runs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("export")
    result = CliRunner().invoke(
        cli, ["export", "--coarse", str(runs[0]), "--fine", str(runs[1]), "--out", str(base), "--name", MODEL]
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].startswith(f"Wrote SavedModel {base / MODEL / '1'}")
    return base


@pytest.fixture(scope="module")
def servable(base_dir: Path) -> Servable:
    """The export loaded once for the in-process tests (loading and the first call of a signature take seconds)."""
    return Servable(base_dir / MODEL, MODEL)


@pytest.fixture(scope="module")
def localizer(runs: tuple[Path, Path]) -> TwoStageLocalizer:
    """The in-memory reference, from the same run directories."""
    return TwoStageLocalizer(load_model(str(runs[0] / "model.keras")), load_model(str(runs[1] / "model.keras")), CONFIG)


def affine(linear: np.ndarray, origin_mm: tuple[float, float, float]) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = origin_mm
    return matrix


def rotation(axis: int, degrees: float) -> np.ndarray:
    """Rotation by ``degrees`` about world axis ``axis`` (0, 1, 2)."""
    angles_rad = np.zeros(3)
    angles_rad[axis] = np.deg2rad(degrees)
    return affine_maps.rotation_matrix(angles_rad)


# name -> (shape, voxel_to_world, stored dtype)
SCANS = {
    "oblique_anisotropic": ((18, 22, 12), affine(rotation(2, 17) @ np.diag([1.3, 0.9, 2.2]), (-20.5, 14.0, 3.0)), "f4"),
    "flipped_permuted": ((20, 16, 24), affine(np.array([[0, 0, -1.0], [-1.2, 0, 0], [0, 0.8, 0]]), (30, 9, -40)), "f4"),
    "lps_int16": ((26, 20, 18), affine(np.diag([-1.0, -1.0, 1.1]), (12.0, 30.0, -5.0)), "i2"),
    "oversized": ((70, 58, 64), affine(rotation(0, -9) @ np.diag([1.0, 1.0, 1.0]), (-35, -29, -32)), "f4"),
    "two_voxels_thin": ((2, 3, 2), affine(np.diag([0.4, 0.3, 0.5]), (0, 0, 0)), "f4"),
}


def make_volume(shape: tuple[int, int, int], dtype: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    volume = ndimage.gaussian_filter(rng.normal(size=shape), 1.5) * 400 + 100
    return np.round(volume).astype(np.int16) if dtype == "i2" else volume.astype(np.float32)


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("scans")
    paths = {}
    for seed, (name, (shape, voxel_to_world, dtype)) in enumerate(SCANS.items()):
        paths[name] = directory / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(make_volume(shape, dtype, seed), voxel_to_world), str(paths[name]))
    return paths


def reference(localizer: TwoStageLocalizer, path: Path) -> dict[str, np.ndarray]:
    """The NumPy path: read_volume (RAS, model spacing), the central (P+W)^3 region, the in-memory localizer."""
    volume = read_volume(path, CONFIG.spacing_mm)
    shape, cropped_to_file, origin = central_grid_crop(
        volume.shape, volume.array_to_file_voxel, max_grid_size(CONFIG)
    )
    data = volume.data[tuple(slice(o, o + n) for o, n in zip(origin, shape))]
    result = {key: value.numpy() for key, value in localizer(tf.constant(data)).items()}
    out = {}
    for key in ("voxel", "coarse_voxel"):
        file_voxel = affine_maps.voxel_to_world(result[key], cropped_to_file)
        out[key] = file_voxel
        out[key.replace("voxel", "world_mm")] = affine_maps.voxel_to_world(file_voxel, volume.file_voxel_to_world)
        # the same point through the array's own affine: the bookkeeping of read_volume agrees
        np.testing.assert_allclose(
            affine_maps.voxel_to_world(result[key] + origin, volume.voxel_to_world),
            out[key.replace("voxel", "world_mm")],
            atol=1e-6,
        )
    out["confidence"] = result["confidence"]
    return out


# ---------------------------------------------------------------------------------------------------------
# the SavedModel agrees with the in-memory localizer


@pytest.mark.slow
def test_reloaded_export_in_a_fresh_process_equals_the_in_memory_localizer(
    base_dir: Path, scans: dict[str, Path], localizer: TwoStageLocalizer, tmp_path: Path
) -> None:
    out = tmp_path / "predictions.json"
    command = [sys.executable, "-m", "mdgru_keras.cli", "predict", *map(str, scans.values())]
    command += ["--model", str(base_dir / MODEL), "--format", "json", "--out", str(out)]
    process = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**_env(), "PYTHONPATH": str(ROOT)}
    )
    assert process.returncode == 0, process.stderr[-3000:]
    document = json.loads(out.read_text())
    assert document["failed"] == []
    by_file = {scan["file"]: scan["landmarks"] for scan in document["scans"]}
    for name, path in scans.items():
        expected = reference(localizer, path)
        landmarks = by_file[str(path)]
        assert list(landmarks) == list(LANDMARKS)
        for k, landmark in enumerate(LANDMARKS):
            for key in ("world_mm", "voxel", "coarse_world_mm", "coarse_voxel"):
                np.testing.assert_allclose(
                    landmarks[landmark][key], expected[key][k], atol=1e-4, err_msg=f"{name} {landmark} {key}"
                )
            assert landmarks[landmark]["confidence"] == pytest.approx(float(expected["confidence"][k]), abs=1e-5)


@pytest.mark.slow
def test_stage_models_rebuilt_from_an_export_are_the_exported_ones(base_dir: Path, runs: tuple[Path, Path]) -> None:
    """stage_models_from_export gives back the trained weights (so they can be exported again with other
    inference options) and refuses a folder that is no export."""
    from mdgru_keras.export import stage_models_from_export

    def weights(model):  # DropConnect's random-seed states differ from one loading to the next
        return {re.sub(r"_\d+/", "/", v.path): v.numpy() for v in model.variables if "seed_generator" not in v.path}

    coarse, fine, config, info = stage_models_from_export(base_dir / MODEL / "1")
    assert config.landmarks == CONFIG.landmarks and info["landmarks"] == list(CONFIG.landmarks)
    for rebuilt, run in ((coarse, runs[0]), (fine, runs[1])):
        rebuilt_weights, trained_weights = weights(rebuilt), weights(load_model(str(run / "model.keras")))
        assert list(rebuilt_weights) == list(trained_weights)
        for path, value in rebuilt_weights.items():
            np.testing.assert_array_equal(value, trained_weights[path], err_msg=path)
    with pytest.raises(InputError, match="not an mdgru-keras export"):
        stage_models_from_export(runs[0])


def _env() -> dict[str, str]:
    import os

    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


@pytest.mark.slow
def test_int16_signature_equals_float_signature(servable: Servable) -> None:
    model = servable.model
    shape, voxel_to_world, _ = SCANS["lps_int16"]
    volume = make_volume(shape, "i2", seed=3)
    as_int16 = model.signatures["localize_int16"](
        volume=tf.constant(volume), voxel_to_world=tf.constant(voxel_to_world)
    )
    as_float = model.signatures["serving_default"](
        volume=tf.constant(volume.astype(np.float32)), voxel_to_world=tf.constant(voxel_to_world)
    )
    coarse = model.signatures["coarse"](
        volume=tf.constant(volume.astype(np.float32)), voxel_to_world=tf.constant(voxel_to_world)
    )
    for key in OUTPUTS["serving_default"]:
        np.testing.assert_array_equal(as_int16[key].numpy(), as_float[key].numpy(), err_msg=key)
    assert set(coarse) == set(OUTPUTS["coarse"])
    np.testing.assert_allclose(coarse["coarse_world_mm"].numpy(), as_float["coarse_world_mm"].numpy(), atol=1e-6)
    assert [name.decode() for name in coarse["landmark_names"].numpy()] == list(LANDMARKS)


@pytest.mark.slow
def test_decodings_signature_agrees_with_serving_default(servable: Servable) -> None:
    """The Table-1a decodings: the model's own n with parabola (tiny preset: parabola on) is serving_default's
    answer, coarse is its coarse answer; every decoding is in the given array and its world mm alike."""
    shape, voxel_to_world, _ = SCANS["oblique_anisotropic"]
    inputs = {"volume": make_volume(shape, "f4", 5), "voxel_to_world": voxel_to_world}
    decodings = servable.predict("decodings", inputs)
    default = servable.predict("serving_default", inputs)
    assert set(decodings) == set(OUTPUTS["decodings"])
    assert CONFIG.parabola
    np.testing.assert_allclose(decodings["fine_parabola_world_mm"], default["world_mm"], atol=1e-9)
    np.testing.assert_allclose(decodings["coarse_voxel"], default["coarse_voxel"], atol=1e-9)
    for name in ("coarse", "fine_n1_argmax", "fine_n1_parabola", "fine_argmax", "fine_parabola"):
        np.testing.assert_allclose(
            affine_maps.voxel_to_world(decodings[f"{name}_voxel"], voxel_to_world), decodings[f"{name}_world_mm"],
            atol=1e-9, err_msg=name,
        )  # fmt: skip


@pytest.mark.slow
def test_oversized_scans_are_cropped_to_the_central_region_not_refused(servable: Servable) -> None:
    """A scan several times the coarse field of view: an answer inside the central (P+W)^3 region."""
    shape = (150, 40, 130)
    voxel_to_world = affine(np.diag([1.0, 1.0, 1.0]), (0, 0, 0))
    outputs = servable.predict(
        "serving_default", {"volume": make_volume(shape, "f4", 9), "voxel_to_world": voxel_to_world}
    )
    # The rule: the model grid is cut to its central (P+W)^3 voxels; the coarse stage sees the central P^3 of
    # that; each fine window (W^3) is centred on the coarse estimate.
    limit, size, window = max_grid_size(CONFIG), CONFIG.coarse.padded_size, CONFIG.fine.window_size
    kept_origin = np.maximum((np.array(shape) - limit) // 2, 0)
    coarse_origin = kept_origin + (np.minimum(shape, limit) - size) // 2
    coarse_voxel = outputs["coarse_voxel"]
    assert np.all(coarse_voxel >= coarse_origin - 0.5) and np.all(coarse_voxel <= coarse_origin + size - 0.5)
    assert np.all(np.abs(outputs["voxel"] - coarse_voxel) <= window / 2 + 1)
    assert np.all(np.isfinite(outputs["world_mm"]))


# ---------------------------------------------------------------------------------------------------------
# layout, signatures, model_info


@pytest.mark.slow
def test_saved_model_cli_lists_the_signatures_with_dtypes_and_shapes(base_dir: Path) -> None:
    # The one installed next to the running interpreter (the project's .venv under `make test`).
    binary = Path(sys.executable).parent / "saved_model_cli"
    if not binary.exists():
        binary = Path(shutil.which("saved_model_cli") or "saved_model_cli")
    text = subprocess.run(
        [str(binary), "show", "--all", "--dir", str(base_dir / MODEL / "1")],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout  # fmt: skip
    blocks = dict(re.findall(r"signature_def\['(\w+)'\]:\n(.*?)Method name is: (?:\S*)", text, flags=re.S))
    assert set(blocks) == {"__saved_model_init_op", "serving_default", "localize_int16", "coarse", "decodings"}

    def tensors(block: str, kind: str) -> dict[str, tuple[str, str]]:
        part = block.split("output(s):")[0 if kind == "inputs" else 1]
        return {
            name: (dtype, shape)
            for name, dtype, shape in re.findall(
                rf"{kind}\['(\w+)'\] tensor_info:\s+dtype: (\w+)\s+shape: (\([^)]*\))", part
            )
        }

    k = len(LANDMARKS)
    full = {
        "landmark_names": ("DT_STRING", f"({k})"),
        "world_mm": ("DT_DOUBLE", f"({k}, 3)"),
        "voxel": ("DT_DOUBLE", f"({k}, 3)"),
        "coarse_world_mm": ("DT_DOUBLE", f"({k}, 3)"),
        "coarse_voxel": ("DT_DOUBLE", f"({k}, 3)"),
        "confidence": ("DT_FLOAT", f"({k})"),
        "flip_disagreement_mm": ("DT_DOUBLE", f"({k})"),
    }
    for name in ("coarse", "fine_n1_argmax", "fine_n1_parabola", "fine_argmax", "fine_parabola"):
        full[f"{name}_world_mm"] = full[f"{name}_voxel"] = ("DT_DOUBLE", f"({k}, 3)")
    for signature, volume_dtype in (
        ("serving_default", "DT_FLOAT"),
        ("localize_int16", "DT_INT16"),
        ("coarse", "DT_FLOAT"),
        ("decodings", "DT_FLOAT"),
    ):
        block = blocks[signature]
        assert tensors(block, "inputs") == {
            "volume": (volume_dtype, "(-1, -1, -1)"),
            "voxel_to_world": ("DT_DOUBLE", "(4, 4)"),
        }, signature
        assert tensors(block, "outputs") == {name: full[name] for name in OUTPUTS[signature]}, signature
        assert "tensorflow/serving/predict" in text


@pytest.mark.slow
def test_model_info_records_configs_landmarks_dataset_and_version(
    base_dir: Path, runs: tuple[Path, Path], servable: Servable
) -> None:
    version_dir = base_dir / MODEL / "1"
    assert (version_dir / "assets" / MODEL_INFO_FILE).is_file()
    info = read_model_info(version_dir)
    assert info["version"] == 1 and info["name"] == MODEL
    assert info["landmarks"] == list(LANDMARKS)
    assert info["config"]["coarse"] == CONFIG.to_dict()["coarse"]
    assert info["runs"]["coarse"]["config"] == CONFIG.to_dict()
    assert info["runs"]["fine"]["config"]["training"]["epochs"] == 3
    assert info["runs"]["fine"]["path"] == str(runs[1].resolve())
    assert info["dataset"]["coarse"] == DATASET
    assert info["max_grid_voxels"] == CONFIG.coarse.padded_size + CONFIG.fine.window_size
    # the asset is part of the SavedModel: it travels with it and is found through the loaded object
    assert Path(servable.model.model_info.asset_path.numpy().decode()).name == MODEL_INFO_FILE


@pytest.mark.slow
def test_versions_count_up_and_are_never_overwritten(base_dir: Path, localizer: TwoStageLocalizer) -> None:
    model_dir = base_dir / MODEL
    assert existing_versions(model_dir) == [1] and next_version(model_dir) == 2
    before = sorted(p.name for p in model_dir.iterdir())
    with pytest.raises(FileExistsError, match="version 1 exists"):
        export_localizer(localizer, base_dir, MODEL, version=1)
    assert sorted(p.name for p in model_dir.iterdir()) == before
    assert next_version(base_dir / "new_model") == 1


@pytest.mark.slow
def test_a_failed_export_leaves_nothing_behind(
    base_dir: Path, localizer: TwoStageLocalizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(module: tf.Module, export_dir: str, signatures: dict) -> None:
        (Path(export_dir) / "saved_model.pb").write_bytes(b"half")
        raise OSError("disk full")

    model_dir = base_dir / MODEL
    before = sorted(p.name for p in model_dir.iterdir())
    monkeypatch.setattr(tf.saved_model, "save", crash)  # a crash half-way through writing
    monkeypatch.setattr(ExportedLocalizer, "signatures", lambda self: {})  # (skips the seconds of tracing)
    with pytest.raises(OSError, match="disk full"):
        export_localizer(localizer, base_dir, MODEL, version=7)
    assert sorted(p.name for p in model_dir.iterdir()) == before  # no 7/, no hidden partial folder


def test_export_refuses_runs_that_do_not_fit(runs: tuple[Path, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    swapped = runner.invoke(cli, ["export", "--coarse", str(runs[1]), "--fine", str(runs[0]), "--out", str(tmp_path)])
    assert swapped.exit_code == 1
    assert "a fine run (run.json), but a coarse run is needed" in swapped.output
    assert str(runs[1]) in swapped.output
    with pytest.raises(InputError, match="disagree on landmarks"):
        combine_configs(CONFIG, CONFIG.replace(landmarks=("A", "C")))
    not_a_run = runner.invoke(
        cli, ["export", "--coarse", str(tmp_path), "--fine", str(runs[1]), "--out", str(tmp_path)]
    )
    assert not_a_run.exit_code == 1 and "config.json is missing" in not_a_run.output
    assert not any(tmp_path.glob("mdgru/*"))
    # an --out that cannot be written is refused before the runs are loaded (not_a_run would fail first)
    regular = tmp_path / "regular"
    regular.write_text("not a folder")
    unwritable = runner.invoke(
        cli, ["export", "--coarse", str(tmp_path), "--fine", str(runs[1]), "--out", str(regular / "export")]
    )
    assert unwritable.exit_code == 1
    assert unwritable.output.strip().splitlines()[-1] == (
        f"Error: {regular / 'export' / 'mdgru'}: cannot write here: {regular} is not a directory"
    )


# ---------------------------------------------------------------------------------------------------------
# malformed requests: INVALID_ARGUMENT with a message, and the server keeps serving

BAD_REQUESTS = {
    "float64 volume": (lambda v, a: (v.astype(np.float64), a), "dtype"),
    "rank 2 volume": (lambda v, a: (v[:, :, 0], a), "rank 2"),
    "NaN volume": (lambda v, a: (np.where(v > v.mean(), np.nan, v).astype(np.float32), a), "NaN"),
    "singular affine": (lambda v, a: (v, np.diag([1.0, 0.0, 1.0, 1.0])), "singular"),
    "infinite affine": (lambda v, a: (v, np.where(np.eye(4) > 0, np.inf, 0.0)), "NaN or Inf"),
    "bad last row": (lambda v, a: (v, a + np.array([[0, 0, 0, 0]] * 3 + [[0, 0, 1, 0]])), "last row"),
    "one voxel thick": (lambda v, a: (v[:, :1, :], a), "at least 2 voxels"),
}


@pytest.fixture(scope="module")
def grpc_endpoint(servable: Servable):
    with GrpcServer(servable=servable) as server:
        yield server.address, servable


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_malformed_requests_are_invalid_argument(grpc_endpoint: tuple[str, Servable], case: str) -> None:
    address, servable = grpc_endpoint
    make, message = BAD_REQUESTS[case]
    shape, voxel_to_world, _ = SCANS["oblique_anisotropic"]
    volume, bad_affine = make(make_volume(shape, "f4", 0), voxel_to_world)
    inputs = {"volume": volume, "voxel_to_world": np.asarray(bad_affine, dtype=np.float64)}
    with GrpcLocalizationClient(address, MODEL, timeout_s=120) as client:
        with pytest.raises(ServingError) as caught:
            client.predict(inputs, "serving_default")
        assert caught.value.code == "INVALID_ARGUMENT"
        assert message in str(caught.value) and "\n" not in str(caught.value)
        good = client.predict({"volume": make_volume(shape, "f4", 0), "voxel_to_world": voxel_to_world})
    assert good["world_mm"].shape == (len(LANDMARKS), 3)


@pytest.mark.slow
def test_graph_asserts_fire_without_any_server_checks(servable: Servable) -> None:
    """The SavedModel itself refuses bad scans (what tensorflow_model_server relies on)."""
    function = servable.model.signatures["serving_default"]
    volume = np.ones((5, 6, 7), np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="volume contains NaN or Inf"):
        function(volume=tf.constant(np.where(volume > 0, np.nan, volume)), voxel_to_world=tf.constant(np.eye(4)))
    with pytest.raises(tf.errors.InvalidArgumentError, match="singular"):
        function(volume=tf.constant(volume), voxel_to_world=tf.constant(np.diag([1.0, 1.0, 0.0, 1.0])))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tensorflow_model_server") is None, reason="tensorflow_model_server is not on PATH")
def test_tensorflow_model_server_serves_the_export(base_dir: Path, tmp_path: Path) -> None:
    shape, voxel_to_world, _ = SCANS["flipped_permuted"]
    volume = make_volume(shape, "f4", 4)
    local = Servable(base_dir / MODEL).predict("serving_default", {"volume": volume, "voxel_to_world": voxel_to_world})
    with model_server(base_dir / MODEL, MODEL, tmp_path / "tfs.log") as (address, _):
        with GrpcLocalizationClient(address, MODEL, timeout_s=120) as client:
            remote = client.localize(volume, voxel_to_world, signature="serving_default")
            with pytest.raises(ServingError) as caught:
                client.localize(np.full(shape, np.nan, np.float32), voxel_to_world, signature="serving_default")
    assert caught.value.code == "INVALID_ARGUMENT"
    np.testing.assert_allclose(remote["world_mm"], local["world_mm"], atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# the grid crop behind the oversized-input rule


def test_central_grid_crop_keeps_the_coarse_region_and_matches_its_tf_form(rng: np.random.Generator) -> None:
    size, window = CONFIG.coarse.padded_size, CONFIG.fine.window_size
    limit = size + window
    for _ in range(50):
        shape = tuple(int(n) for n in rng.integers(2, 3 * limit, size=3))
        new_to_old = affine(np.diag(rng.uniform(0.5, 2.0, size=3)), tuple(rng.uniform(-5, 5, size=3)))
        cropped_shape, cropped_to_old, origin = central_grid_crop(shape, new_to_old, limit)
        assert cropped_shape == tuple(min(n, limit) for n in shape)
        # the coarse region (central P^3) is the same voxels of the uncropped grid, cropped or not
        np.testing.assert_array_equal(
            origin + centered_window_origin(cropped_shape, size), centered_window_origin(shape, size)
        )
        np.testing.assert_allclose(cropped_to_old, new_to_old @ affine_maps.translation_affine(origin))
        tf_shape, tf_to_old, tf_origin = central_grid_crop_tf(
            tf.constant(shape), tf.constant(new_to_old), limit
        )
        assert tuple(tf_shape.numpy()) == cropped_shape
        np.testing.assert_array_equal(tf_origin.numpy(), origin)
        np.testing.assert_allclose(tf_to_old.numpy(), cropped_to_old)
