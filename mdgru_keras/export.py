"""Export of the whole two-stage localization as ONE SavedModel, in TF Serving's layout ``BASE/NAME/VERSION/``.

The graph takes a scan as its file stores it and does everything else itself (the contract in
``docs/ARCHITECTURE.md``, "The exported SavedModel"):

1. validate: a finite volume with at least 2 voxels per axis, a finite, non-singular ``voxel_to_world`` whose
   last row is ``[0, 0, 0, 1]`` (``tf.debugging`` asserts: ``INVALID_ARGUMENT`` with a one-line message);
2. clip the scan's intensity outliers (``preprocessing.clip_outliers_tf``), reorient to the closest RAS-canonical
   axis order and resample to the model spacing
   (``resampling.canonical_resampling_grid_tf`` + ``resample_axis_aligned_tf``: the same grid and values as
   ``mdgru_keras.io.read_volume``), keeping only the central ``(P + W)^3`` voxels of that grid (the
   oversized-input rule, ``resampling.central_grid_crop_tf``);
3. run :class:`mdgru_keras.localizer.TwoStageLocalizer` (preprocessing, coarse, fine windows, decoding);
4. map the model-grid voxels back to the given array (``new_to_old``) and to RAS millimetres (the given affine).

Signatures (``serving_default``, ``localize_int16``, ``coarse``, ``decodings``) and outputs are listed in
:data:`OUTPUTS`. ``decodings`` gives every row of the paper's Table 1a that one model can give (:data:`DECODINGS`:
coarse; fine with ``n = 1`` classes per voxel, pooled from the model's ``n`` (``coordinate_classes.pool_classes``), and
with the model's ``n``; each by argmax and by parabola), for ``mdgru-localize evaluate``.
``assets/model_info.json`` records both stages' configs, the landmark names, the training data description
and the version.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from mdgru_keras.config import Config, ConfigError, config_from_dict
from mdgru_keras.errors import InputError, one_line
from mdgru_keras.geometry import affine_maps
from mdgru_keras.geometry.protocol_planes import PLANE_ANCHORS, plane_constraints
from mdgru_keras.geometry.resampling import canonical_resampling_grid_tf, central_grid_crop_tf, resample_axis_aligned_tf
from mdgru_keras.geometry.shape_prior import MIN_SHAPE_PRIOR_LANDMARKS, TOLERANCE_MM
from mdgru_keras.geometry.windows import largest_share_margin
from mdgru_keras.io.atomic import check_writable
from mdgru_keras.io.landmarks import read_landmarks, require_landmarks
from mdgru_keras.localizer import TwoStageLocalizer
from mdgru_keras.preprocessing import clip_outliers_tf
from mdgru_keras.serving import (
    COARSE_SIGNATURE,
    DECODINGS_SIGNATURE,
    DEFAULT_MODEL_NAME,
    DEFAULT_SIGNATURE,
    INT16_SIGNATURE,
)
from mdgru_keras.version import package_version

MODEL_INFO_FILE = "model_info.json"
RUN_CONFIG_FILE = "config.json"
RUN_MODEL_FILE = "model.keras"
RUN_DATASET_FILE = "dataset.json"
RUN_INFO_FILE = "run.json"
RUN_SUMMARY_FILE = "summary.json"
EXPORT_FORMAT = "mdgru-keras localizer export 1"

# Config keys both stages must agree on: they fix the model grid, the preprocessing and the class decoding.
SHARED_CONFIG_KEYS = ("landmarks", "spacing_mm", "highpass_sigma_mm", "superresolution", "parabola")

# The decodings of the ``decodings`` signature (Table 1a's rows): each gives ``{name}_world_mm`` and ``{name}_voxel``.
# coarse: the coarse stage as used (parabola per the config); fine_n1_*: the fine probabilities pooled to one
# class per voxel (coordinate_classes.pool_classes), as a model trained with n = 1; fine_*: the model's own n classes.
DECODINGS: tuple[str, ...] = ("coarse", "fine_n1_argmax", "fine_n1_parabola", "fine_argmax", "fine_parabola")

# signature -> its outputs (all share the inputs volume [X,Y,Z] and voxel_to_world float64 [4,4])
OUTPUTS: dict[str, tuple[str, ...]] = {
    DEFAULT_SIGNATURE: ("landmark_names", "world_mm", "voxel", "coarse_world_mm", "coarse_voxel", "confidence",
                        "flip_disagreement_mm"),
    INT16_SIGNATURE: ("landmark_names", "world_mm", "voxel", "coarse_world_mm", "coarse_voxel", "confidence",
                      "flip_disagreement_mm"),
    COARSE_SIGNATURE: ("landmark_names", "coarse_world_mm", "coarse_voxel", "confidence"),
    DECODINGS_SIGNATURE: ("landmark_names",)
    + tuple(f"{decoding}_{space}" for decoding in DECODINGS for space in ("world_mm", "voxel")),
}


def max_grid_size(config: Config) -> int:
    """Voxels per axis of the model grid the export looks at: ``P + W`` (see ``resampling.central_grid_crop``)."""
    return config.coarse.padded_size + config.fine.window_size


def _volume_spec(dtype: tf.DType) -> tf.TensorSpec:
    return tf.TensorSpec([None, None, None], dtype, name="volume")


AFFINE_SPEC = tf.TensorSpec([4, 4], tf.float64, name="voxel_to_world")


class LocalizationGraph:
    """The served computation: input validation, model grid, :class:`TwoStageLocalizer`, and the way back.

    A plain object, not a ``tf.Module``: :class:`ExportedLocalizer` saves only its signatures (see there).
    """

    def __init__(self, localizer: TwoStageLocalizer) -> None:
        self.localizer = localizer
        config = localizer.config
        self._spacing_mm = float(config.spacing_mm)
        self._max_grid_size = max_grid_size(config)
        self._num_landmarks = config.num_landmarks

    # -- the graph ------------------------------------------------------------------------------------------

    @staticmethod
    def _validate(volume: tf.Tensor, voxel_to_world: tf.Tensor) -> tf.Operation:
        """Chained asserts (the first problem found is the one reported)."""
        checks = [
            lambda: tf.debugging.assert_greater_equal(
                tf.shape(volume), 2, message="volume must have at least 2 voxels along each axis"
            ),
            lambda: tf.debugging.assert_all_finite(volume, "volume contains NaN or Inf values"),
            lambda: tf.debugging.assert_all_finite(voxel_to_world, "voxel_to_world contains NaN or Inf values"),
            lambda: tf.debugging.assert_near(
                voxel_to_world[3],
                tf.constant([0.0, 0.0, 0.0, 1.0], tf.float64),
                atol=1e-6,
                rtol=0.0,
                message="voxel_to_world's last row must be [0, 0, 0, 1]",
            ),
            lambda: tf.debugging.assert_greater(
                tf.abs(tf.linalg.det(voxel_to_world[:3, :3])),
                tf.constant(1e-12, tf.float64),
                message="voxel_to_world is singular (its 3x3 linear part has determinant 0)",
            ),
        ]
        done = tf.no_op()
        for check in checks:
            with tf.control_dependencies([done]):
                done = check()
        return done

    def _model_grid(self, volume: tf.Tensor, voxel_to_world: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``(model_volume float32 [x,y,z], model_to_given float64 [4,4])`` after validating the inputs; the scan's
        intensity outliers are clipped on its own voxels first, as :func:`mdgru_keras.io.read_volume` does."""
        with tf.control_dependencies([self._validate(volume, voxel_to_world)]):
            volume = tf.identity(volume)
            voxel_to_world = tf.identity(voxel_to_world)
        new_shape, _, new_to_old = canonical_resampling_grid_tf(
            tf.shape(volume), voxel_to_world, self._spacing_mm
        )
        new_shape, new_to_old, _ = central_grid_crop_tf(new_shape, new_to_old, self._max_grid_size)
        return resample_axis_aligned_tf(clip_outliers_tf(volume), new_to_old, new_shape), new_to_old

    def _report(
        self, model_voxel: tf.Tensor, model_to_given: tf.Tensor, voxel_to_world: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Model-grid voxels ``[K, 3]`` -> ``(voxel, world_mm)`` float64 ``[K, 3]`` in the given array."""
        voxel = tf.ensure_shape(affine_maps.voxel_to_world_tf(model_voxel, model_to_given), [self._num_landmarks, 3])
        return voxel, tf.ensure_shape(affine_maps.voxel_to_world_tf(voxel, voxel_to_world), [self._num_landmarks, 3])

    @tf.function(input_signature=[_volume_spec(tf.float32), AFFINE_SPEC])
    def _localize(self, volume: tf.Tensor, voxel_to_world: tf.Tensor) -> dict[str, tf.Tensor]:
        """The whole localization with every decoding; one traced graph that all localizing signatures call
        (each returns its subset of these outputs)."""
        model_volume, model_to_given = self._model_grid(volume, voxel_to_world)
        result = self.localizer.localize(model_volume)
        outputs = {
            "landmark_names": tf.identity(self.localizer.landmark_names),
            "confidence": tf.ensure_shape(result["confidence"], [self._num_landmarks]),
            # the model grid is isotropic: voxels times its spacing are millimetres
            "flip_disagreement_mm": tf.ensure_shape(
                tf.cast(result["flip_disagreement_voxel"], tf.float64) * self._spacing_mm, [self._num_landmarks]
            ),
        }
        model_voxels = {
            "": result["voxel"],
            "coarse_": result["coarse_voxel"],
            "fine_n1_argmax_": result["voxel_n1_argmax"],
            "fine_n1_parabola_": result["voxel_n1_parabola"],
            "fine_argmax_": result["voxel_argmax"],
            "fine_parabola_": result["voxel_parabola"],
        }
        for prefix, model_voxel in model_voxels.items():
            voxel, world_mm = self._report(model_voxel, model_to_given, voxel_to_world)
            outputs[f"{prefix}voxel"], outputs[f"{prefix}world_mm"] = voxel, world_mm
        return outputs

    # -- the signatures -------------------------------------------------------------------------------------

    @tf.function(input_signature=[_volume_spec(tf.float32), AFFINE_SPEC])
    def serving_default(self, volume: tf.Tensor, voxel_to_world: tf.Tensor) -> dict[str, tf.Tensor]:
        """The whole localization of a float32 scan (the file's array and affine, any orientation)."""
        outputs = self._localize(volume, voxel_to_world)
        return {name: outputs[name] for name in OUTPUTS[DEFAULT_SIGNATURE]}

    @tf.function(input_signature=[_volume_spec(tf.int16), AFFINE_SPEC])
    def localize_int16(self, volume: tf.Tensor, voxel_to_world: tf.Tensor) -> dict[str, tf.Tensor]:
        """:meth:`serving_default` for an int16 scan (half the bytes on the wire, lossless)."""
        outputs = self._localize(tf.cast(volume, tf.float32), voxel_to_world)
        return {name: outputs[name] for name in OUTPUTS[INT16_SIGNATURE]}

    @tf.function(input_signature=[_volume_spec(tf.float32), AFFINE_SPEC])
    def coarse(self, volume: tf.Tensor, voxel_to_world: tf.Tensor) -> dict[str, tf.Tensor]:
        """The coarse stage only: ``coarse_world_mm``, ``coarse_voxel`` and the coarse ``confidence``."""
        model_volume, model_to_given = self._model_grid(volume, voxel_to_world)
        result = self.localizer.coarse(model_volume)
        coarse_voxel, coarse_world_mm = self._report(result["coarse_voxel"], model_to_given, voxel_to_world)
        return {
            "landmark_names": tf.identity(self.localizer.landmark_names),
            "coarse_world_mm": coarse_world_mm,
            "coarse_voxel": coarse_voxel,
            "confidence": tf.ensure_shape(result["coarse_confidence"], [self._num_landmarks]),
        }

    @tf.function(input_signature=[_volume_spec(tf.float32), AFFINE_SPEC])
    def decodings(self, volume: tf.Tensor, voxel_to_world: tf.Tensor) -> dict[str, tf.Tensor]:
        """Every decoding of :data:`DECODINGS` (Table 1a's rows): ``{name}_world_mm`` and ``{name}_voxel``
        ``[K, 3]`` float64 in the given array, for a float32 scan."""
        outputs = self._localize(volume, voxel_to_world)
        return {name: outputs[name] for name in OUTPUTS[DECODINGS_SIGNATURE]}

    def signatures(self) -> dict[str, Any]:
        """The four signatures as concrete functions (each traced once; the localizing ones share one graph)."""
        return {
            DEFAULT_SIGNATURE: self.serving_default.get_concrete_function(),
            INT16_SIGNATURE: self.localize_int16.get_concrete_function(),
            COARSE_SIGNATURE: self.coarse.get_concrete_function(),
            DECODINGS_SIGNATURE: self.decodings.get_concrete_function(),
        }


class _Untracked:
    """Holds an object out of TensorFlow's object tracking (attributes of plain objects are not followed)."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ExportedLocalizer(tf.Module):
    """What is saved: the stage models' variables, ``assets/model_info.json`` and the four signatures.

    Only variables and the asset are tracked (as Keras' own ``ExportArchive`` does). Tracking the localizer,
    the Keras models or tf.functions would make ``tf.saved_model.save`` retrace each of their functions in
    its save context and store them next to the signatures: three times the graph and the export time.

    Args:
        localizer: the two-stage localizer.
        model_info_path: a JSON file, saved as ``assets/model_info.json``.
    """

    def __init__(self, localizer: TwoStageLocalizer, model_info_path: str | Path) -> None:
        super().__init__(name="mdgru_localizer")
        self._graph = _Untracked(LocalizationGraph(localizer))
        self.model_variables = list(localizer.coarse_model.variables) + list(localizer.fine_model.variables)
        # The localizer's own state (e.g. its landmark names) is captured by the signatures too.
        model_ids = {id(variable) for variable in self.model_variables}
        self.localizer_variables = [v for v in localizer.variables if id(v) not in model_ids]
        self.model_info = tf.saved_model.Asset(str(model_info_path))

    @property
    def graph(self) -> LocalizationGraph:
        return self._graph.value

    def signatures(self) -> dict[str, Any]:
        return self.graph.signatures()


# ---------------------------------------------------------------------------------------------------------
# training runs


@dataclass(frozen=True)
class TrainingRun:
    """A training run directory (written by ``mdgru-localize train``).

    ``config.json`` (the resolved config) and ``model.keras`` (the trained stage model) are required;
    ``run.json`` (stage, dataset path, ...), ``summary.json`` (final validation) and the dataset's
    ``dataset.json`` are recorded when present.
    """

    path: Path
    stage: str
    config: Config
    model: keras.Model
    run_info: dict | None
    summary: dict | None
    dataset: dict | None


def model_stage(model: keras.Model) -> str | None:
    """``coarse`` or ``fine`` from a stage model's inputs (``volume`` / ``window``), else None."""
    names = {tensor.name.split(":")[0] for tensor in model.inputs}
    if "window" in names:
        return "fine"
    if "volume" in names:
        return "coarse"
    return None


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(path, f"not valid JSON ({error})") from None
    return value if isinstance(value, dict) else {"value": value}


def _dataset_description(run_dir: Path, run_info: dict | None) -> dict | None:
    """The run's ``dataset.json``: in the run directory, or in the dataset directory named by ``run.json``."""
    candidates = [run_dir / RUN_DATASET_FILE]
    recorded = (run_info or {}).get("dataset")
    if isinstance(recorded, str) and recorded:
        where = Path(recorded) if Path(recorded).is_absolute() else run_dir / recorded
        candidates += [Path(recorded) / RUN_DATASET_FILE, where / RUN_DATASET_FILE, Path(recorded)]
    for candidate in candidates:
        if candidate.is_file() and candidate.suffix == ".json":
            return _read_json(candidate)
    return {"path": recorded} if recorded else None


def load_run(run_dir: str | Path, stage: str) -> TrainingRun:
    """Load the ``stage`` model of a training run, checking it is that stage's and fits the run's config."""
    from mdgru_keras.networks import load_model, stage_classes

    path = Path(run_dir)
    if not path.is_dir():
        raise InputError(path, "no such training run directory")
    config_path, model_path = path / RUN_CONFIG_FILE, path / RUN_MODEL_FILE
    for required in (config_path, model_path):
        if not required.is_file():
            raise InputError(path, f"not a finished training run: {required.name} is missing")
    try:
        config = config_from_dict(_read_json(config_path) or {}, str(config_path))
    except ConfigError as error:
        raise InputError(None, str(error)) from None
    run_info = _read_json(path / RUN_INFO_FILE)
    recorded_stage = (run_info or {}).get("stage")
    if recorded_stage is not None and recorded_stage != stage:
        raise InputError(path, f"a {recorded_stage} run (run.json), but a {stage} run is needed here")
    try:
        model = load_model(str(model_path))
    except Exception as error:  # Keras raises many kinds for corrupt or foreign files
        problem = f"cannot load the model ({type(error).__name__}: {one_line(str(error))})"
        raise InputError(model_path, problem) from None
    found = model_stage(model)
    if found != stage:
        raise InputError(model_path, f"a {found or 'unknown'}-stage model, but a {stage} run is needed here")
    classes = tuple(int(output.shape[-1]) for output in model.outputs)
    expected = stage_classes(config, stage)
    if sorted(classes) != sorted(expected):
        raise InputError(model_path, f"outputs {classes} classes per axis, but its config.json says {expected}")
    return TrainingRun(
        path=path,
        stage=stage,
        config=config,
        model=model,
        run_info=run_info,
        summary=_read_json(path / RUN_SUMMARY_FILE),
        dataset=_dataset_description(path, run_info),
    )


def combine_configs(coarse: Config, fine: Config, coarse_source: str = "coarse", fine_source: str = "fine") -> Config:
    """One config for both stages: the coarse run's, with the fine run's ``fine`` section.

    The keys that fix the model grid, preprocessing and decoding (:data:`SHARED_CONFIG_KEYS`) must agree.
    """
    differences = [
        f"{key} ({getattr(coarse, key)!r} in {coarse_source}, {getattr(fine, key)!r} in {fine_source})"
        for key in SHARED_CONFIG_KEYS
        if getattr(coarse, key) != getattr(fine, key)
    ]
    if differences:
        raise InputError(None, "the coarse and fine runs disagree on " + "; ".join(differences))
    combined = coarse.replace(fine=fine.fine)
    if fine.fine.window_size > coarse.coarse.padded_size:
        raise InputError(None, f"the fine window ({fine.fine.window_size}) exceeds the coarse region")
    return combined


# ---------------------------------------------------------------------------------------------------------
# writing the SavedModel


def existing_versions(model_dir: str | Path) -> list[int]:
    """Numbered version folders under ``BASE/NAME`` (TF Serving's layout), ascending."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(int(child.name) for child in model_dir.iterdir() if child.name.isdigit() and child.is_dir())


def next_version(model_dir: str | Path) -> int:
    """One more than the newest version in ``model_dir`` (1 for a new model)."""
    versions = existing_versions(model_dir)
    return versions[-1] + 1 if versions else 1


def _make_readable(path: Path) -> None:
    """mkdtemp makes 0o700 folders; a server running as another user must read the export (umask applies)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(path):
        os.chmod(root, 0o777 & ~umask)
        for name in dirs:
            os.chmod(Path(root) / name, 0o777 & ~umask)
        for name in files:
            os.chmod(Path(root) / name, 0o666 & ~umask)


def check_export_dir(base_dir: str | Path, name: str) -> Path:
    """``BASE/NAME`` after checking, before any work, that ``name`` is a plain folder name and that versions can
    be written there (:func:`mdgru_keras.io.atomic.check_writable`; nothing is left behind)."""
    if not name or name.isdigit() or "/" in name or name.startswith("."):
        raise InputError(None, f"model name must be a plain, non-numeric folder name, got {name!r}")
    model_dir = Path(base_dir) / name
    check_writable(model_dir, directory=True)
    return model_dir


def export_localizer(
    localizer: TwoStageLocalizer,
    base_dir: str | Path,
    name: str = DEFAULT_MODEL_NAME,
    version: int | None = None,
    model_info: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``localizer`` as ``BASE/NAME/VERSION/`` (default version: the next integer); returns that folder.

    The SavedModel is written into a hidden temporary folder next to the version folder (TF Serving ignores
    names that are not numbers) and moved into place with one ``os.replace``: a server watching ``BASE/NAME``
    never sees half an export. An existing version is never overwritten.
    ``model_info`` (JSON-able) is stored as ``assets/model_info.json`` with ``version``, ``name``,
    ``landmarks``, ``config`` and ``signatures`` added.
    """
    model_dir = check_export_dir(base_dir, name)
    model_dir.mkdir(parents=True, exist_ok=True)
    version = next_version(model_dir) if version is None else int(version)
    if version < 1:
        raise InputError(None, f"version must be a positive integer, got {version}")
    version_dir = model_dir / str(version)
    if version_dir.exists():
        raise FileExistsError(f"{version_dir}: version {version} exists already; choose another --version")
    config = localizer.config
    info = dict(model_info or {})
    info.update(
        {
            "format": EXPORT_FORMAT,
            "name": name,
            "version": version,
            "landmarks": list(config.landmarks),
            "spacing_mm": config.spacing_mm,
            "max_grid_voxels": max_grid_size(config),
            "config": config.to_dict(),
            "signatures": {key: list(outputs) for key, outputs in OUTPUTS.items()},
            "created_by": f"mdgru-keras {package_version()}",
            "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
    )
    temporary = Path(tempfile.mkdtemp(prefix=f".{version}.partial-", dir=model_dir))
    try:
        with tempfile.TemporaryDirectory(prefix=".model_info-", dir=model_dir) as info_dir:
            info_path = Path(info_dir) / MODEL_INFO_FILE
            info_path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            module = ExportedLocalizer(localizer, info_path)
            tf.saved_model.save(module, str(temporary), signatures=module.signatures())
        _make_readable(temporary)
        os.replace(temporary, version_dir)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    return version_dir


# The inference options of an export (keyword arguments of TwoStageLocalizer), recorded under "inference"
INFERENCE_DEFAULTS: dict[str, Any] = {"fine_passes": 1, "flip_average": False, "average_passes": False,
                                      "protocol_planes": False, "pass_views": None,
                                      "refine_share_margin_voxel": None, "pooled_decoding": False,
                                      "shape_prior": None, "shape_prior_tolerance_mm": TOLERANCE_MM,
                                      "aligned_windows": None}


def export_runs(
    coarse_run: str | Path,
    fine_run: str | Path,
    base_dir: str | Path,
    name: str = DEFAULT_MODEL_NAME,
    version: int | None = None,
    fine_batch_size: int | None = None,
    **inference: Any,
) -> Path:
    """Export the coarse model of ``coarse_run`` and the fine model of ``fine_run`` as one SavedModel;
    ``inference``: options of :class:`mdgru_keras.localizer.TwoStageLocalizer` (:data:`INFERENCE_DEFAULTS`),
    recorded in ``model_info.json``."""
    check_export_dir(base_dir, name)  # before loading the runs
    coarse = load_run(coarse_run, "coarse")
    fine = load_run(fine_run, "fine")
    config = combine_configs(coarse.config, fine.config, str(coarse.path), str(fine.path))
    info = {
        "runs": {
            run.stage: {
                "path": str(run.path.resolve()),
                "config": run.config.to_dict(),
                "run": run.run_info,
                "summary": run.summary,
            }
            for run in (coarse, fine)
        },
        "dataset": {"coarse": coarse.dataset, "fine": fine.dataset},
    }
    return _export_models(coarse.model, fine.model, config, fine.path, base_dir, name, version, fine_batch_size,
                          info, inference)


def export_again(
    source_dir: str | Path,
    base_dir: str | Path,
    name: str = DEFAULT_MODEL_NAME,
    version: int | None = None,
    fine_batch_size: int | None = None,
    **inference: Any,
) -> Path:
    """The trained weights of the export ``source_dir`` (a version folder) as a new SavedModel with other
    inference options (as :func:`export_runs`); the source's record of its training runs is kept."""
    check_export_dir(base_dir, name)
    coarse, fine, config, source_info = stage_models_from_export(source_dir)
    info = {key: source_info[key] for key in ("runs", "dataset") if key in source_info}
    info["exported_again_from"] = {"path": str(Path(source_dir).resolve()),
                                   "created_at": source_info.get("created_at"),
                                   "inference": source_info.get("inference")}  # fmt: skip
    return _export_models(coarse, fine, config, Path(source_dir), base_dir, name, version, fine_batch_size, info,
                          inference)


def _export_models(coarse_model: keras.Model, fine_model: keras.Model, config: Config, source: Path,
                   base_dir: str | Path, name: str, version: int | None, fine_batch_size: int | None,
                   info: dict, inference: Mapping[str, Any]) -> Path:
    inference = {**INFERENCE_DEFAULTS, **inference}  # an unknown option: TwoStageLocalizer's TypeError
    if inference["protocol_planes"] and not plane_constraints(config.landmarks):
        raise InputError(source, f"--protocol-planes needs AC, PC and one of {', '.join(PLANE_ANCHORS)} among "
                                 f"the landmarks (has: {', '.join(config.landmarks)})")
    largest_margin = largest_share_margin(config.fine.window_size)
    margin = inference["refine_share_margin_voxel"]
    if margin is not None and margin > largest_margin:
        raise InputError(source, f"--share-refined-windows {margin} leaves no room in its "
                                 f"{config.fine.window_size}^3 windows (at most {largest_margin})")
    views = inference["pass_views"]
    if views is not None:
        views = inference["pass_views"] = list(views)  # recorded in model_info.json
        if len(views) != inference["fine_passes"]:
            raise InputError(source, f"--pass-views names {len(views)} passes, --fine-passes is "
                                     f"{inference['fine_passes']}")
        if views[-1] == "mirror":
            raise InputError(source, "--pass-views must end with a pass that sees the scan (scan or both)")
    prior = inference["shape_prior"]
    if prior is not None:
        if inference["fine_passes"] < 2:
            raise InputError(source, "--shape-prior needs --fine-passes 2 or more (it re-centres the later passes)")
        if config.num_landmarks < MIN_SHAPE_PRIOR_LANDMARKS:
            raise InputError(source, f"--shape-prior needs a model of at least {MIN_SHAPE_PRIOR_LANDMARKS} landmarks "
                                     f"(this one has {config.num_landmarks})")
        if isinstance(prior, str | os.PathLike):  # a landmark file: the reference positions of the model's landmarks
            prior = list(require_landmarks(read_landmarks(prior), config.landmarks, prior).values())
        inference["shape_prior"] = np.asarray(prior, dtype=np.float64).tolist()  # recorded in model_info.json
    elif inference["aligned_windows"] is not None:
        raise InputError(source, "--aligned-windows needs --shape-prior (the windows take the axes of its fit)")
    localizer = TwoStageLocalizer(coarse_model, fine_model, config, fine_batch_size=fine_batch_size, **inference)
    info = {"fine_passes": inference["fine_passes"], "inference": inference, **info}
    return export_localizer(localizer, base_dir, name, version, info)


def stage_models_from_export(version_dir: str | Path) -> tuple[keras.Model, keras.Model, Config, dict]:
    """The coarse and the fine Keras model inside an export, with its config and ``model_info``: both built
    from the recorded config and given the SavedModel's ``model_variables`` (saved in build order, coarse then
    fine). For exporting trained weights again with other inference options, without their training runs."""
    from mdgru_keras.networks import build_coarse_model, build_fine_model

    version_dir = Path(version_dir)
    info = read_model_info(version_dir)
    if "config" not in info:
        raise InputError(version_dir, "not an mdgru-keras export (no assets/model_info.json with a config)")
    config = config_from_dict(info["config"], str(version_dir / "assets" / MODEL_INFO_FILE))
    saved = tf.saved_model.load(str(version_dir))
    coarse, fine = build_coarse_model(config), build_fine_model(config)
    built = list(coarse.variables) + list(fine.variables)
    stored = list(saved.model_variables)
    if [tuple(v.shape) for v in built] != [tuple(v.shape) for v in stored]:
        raise InputError(version_dir, "its variables do not fit the models its config builds (another version of "
                                      "mdgru-keras made it?)")
    for variable, value in zip(built, stored):
        variable.assign(value)
    return coarse, fine, config, info


def read_model_info(version_dir: str | Path) -> dict:
    """``assets/model_info.json`` of an export (empty dict for SavedModels without one)."""
    path = Path(version_dir) / "assets" / MODEL_INFO_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))
