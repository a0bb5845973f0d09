"""Evaluation of an exported model (and the baselines) on a labelled test set: the work behind ``evaluate``.

For every manifest row (``subject,image,landmarks[,split]``): read the scan as its file stores it
(:func:`mdgru_keras.io.read_nifti_array`) and its true landmarks (RAS mm), run the export's ``decodings``
signature (every Table-1a decoding of one model: coarse; fine with n = 1 pooled from the model's n classes;
fine with the model's n; argmax and parabola), and, when asked, the baselines on the same scan:

* ``registration`` (:class:`RegistrationBaseline`): the labelled template registered to the scan, rigid +
  affine (:func:`mdgru_keras.baselines.registration.register_landmarks`, SimpleITK);
* ``ants-syn`` (:class:`AntsBaseline`): the same template registered affine + SyN with ANTsPy
  (:func:`mdgru_keras.baselines.ants_registration.register_landmarks`, optional ``antspyx``);
* ``unet`` (:class:`UNetBaseline`): the 3D U-Net on windows around the export's own coarse estimate, on the
  scan as ``read_volume`` gives it at the model spacing (the grid the U-Net was trained on).

The result (:class:`EvaluationRun`) holds :class:`~mdgru_keras.evaluation.Prediction` s and
:class:`~mdgru_keras.evaluation.GroundTruth` s for :func:`mdgru_keras.evaluation.evaluate`. A subject enters
only when its files are readable and every method answered for it, so all rows cover the same subjects; a
failing subject is recorded as ``(file, one-line error)`` and the others go on. Ground truth carries the
scan file's affine, so ``error_voxel`` is in the file's voxels.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mdgru_keras.config import Config, config_from_dict
from mdgru_keras.errors import InputError
from mdgru_keras.evaluation import (
    COARSE,
    REGISTRATION,
    UNET,
    GroundTruth,
    LandmarkError,
    Prediction,
    method_name,
)
from mdgru_keras.geometry import affine_maps

MODEL = "model"  # key of the export's time in EvaluationRun.seconds


def decoding_methods(superresolution: int) -> dict[str, str]:
    """Export decoding (``mdgru_keras.export.DECODINGS``) -> Table-1a row name (``method_name``), in row order.
    With ``n = 1`` the pooled decodings are the model's own and are left out (the same rows twice)."""
    methods = {
        "coarse": COARSE,
        "fine_n1_argmax": method_name("fine", 1, parabola=False),
        "fine_n1_parabola": method_name("fine", 1, parabola=True),
        "fine_argmax": method_name("fine", superresolution, parabola=False),
        "fine_parabola": method_name("fine", superresolution, parabola=True),
    }
    if superresolution == 1:
        del methods["fine_n1_argmax"], methods["fine_n1_parabola"]
    return methods


# ---------------------------------------------------------------------------------------------------------
# the test set


@dataclass(frozen=True)
class EvaluationCase:
    """One manifest row: a subject's scan and its true landmark file (absolute paths)."""

    subject: str
    image: Path
    landmarks: Path
    split: str | None = None


def read_cases(manifest_csv: str | Path, split: str | None = None) -> tuple[list[EvaluationCase], str | None]:
    """The rows of a manifest to evaluate, and a note for the user (or None).

    With ``split``: if any row has a split, exactly the rows of ``split``; if no row has one (e.g. ``synth``'s
    manifests) all rows, with a note. Missing image or landmark files are *not* an error here (each is reported
    for its subject). A bad manifest, or no row of ``split``, raises :class:`InputError`.
    """
    from mdgru_keras.data.records import read_manifest

    rows = read_manifest(manifest_csv, check_files=False)
    cases = [EvaluationCase(row.subject, row.image, row.landmarks, row.split) for row in rows]
    if split is None:
        return cases, None
    if all(case.split is None for case in cases):
        return cases, f"{manifest_csv}: no row has a split; evaluating all {len(cases)} subjects"
    chosen = [case for case in cases if case.split == split]
    if not chosen:
        found = sorted({case.split for case in cases if case.split})
        raise InputError(manifest_csv, f"no subject in split {split!r} (splits found: {', '.join(found)})")
    return chosen, None


# ---------------------------------------------------------------------------------------------------------
# the export


class ExportedModel:
    """An export loaded in this process (``BASE/NAME`` or a version folder) for evaluation.

    ``decodings(volume, voxel_to_world)`` runs the ``decodings`` signature on the file's own array; ``config``
    and ``landmark_names`` come from ``assets/model_info.json``.
    """

    def __init__(self, model_dir: str | Path) -> None:
        from mdgru_keras.export import read_model_info
        from mdgru_keras.serving import DECODINGS_SIGNATURE
        from mdgru_keras.serving.servable import LocalLocalizationClient, resolve_version_dir

        version_dir, _ = resolve_version_dir(model_dir)
        info = read_model_info(version_dir)
        if "config" not in info:
            raise InputError(version_dir, "no assets/model_info.json with the model's config (not an mdgru export?)")
        self.client = LocalLocalizationClient(version_dir)
        if DECODINGS_SIGNATURE not in self.client.servable.signature_defs:
            raise InputError(
                version_dir, f"no {DECODINGS_SIGNATURE!r} signature (exported by an older version): export it again"
            )
        self.signature = DECODINGS_SIGNATURE
        self.version_dir = version_dir
        self.info = info
        self.config: Config = config_from_dict(info["config"], str(version_dir / "assets" / "model_info.json"))
        self.landmark_names: tuple[str, ...] = tuple(info.get("landmarks") or self.config.landmarks)
        self.methods = decoding_methods(self.config.superresolution)

    @property
    def main_method(self) -> str:
        """The row of the export's own answer (``serving_default``'s ``world_mm``)."""
        pooled = self.info.get("inference", {}).get("pooled_decoding", False)
        return method_name("fine", 1 if pooled else self.config.superresolution, self.config.parabola)

    def decodings(self, volume: np.ndarray, voxel_to_world: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs of the ``decodings`` signature: ``landmark_names`` and ``{decoding}_world_mm`` / ``_voxel``."""
        from mdgru_keras.serving import localize_inputs

        _, inputs = localize_inputs(volume, voxel_to_world, self.signature)
        return self.client.predict(inputs, self.signature)

    def close(self) -> None:
        self.client.close()


N1_MODEL = "model n=1"  # key of the n = 1 export's time in EvaluationRun.seconds


def use_n1_model(model: ExportedModel, n1_model: ExportedModel) -> None:
    """Let a separately trained ``n = 1`` export give Table 1a's ``n = 1`` rows (as the paper's table has them)
    instead of the rows derived from ``model`` by summing its classes per voxel.

    Afterwards ``model.methods`` has no pooled decodings and ``n1_model.methods`` maps its fine decodings to the
    ``fine n=1`` rows. Raises :class:`InputError` naming the n = 1 export if it was trained with more classes
    per voxel or lacks some of ``model``'s landmarks.
    """
    n = n1_model.config.superresolution
    if n != 1:
        raise InputError(n1_model.version_dir, f"trained with n = {n} classes per voxel; an n = 1 model is needed")
    missing = [name for name in model.landmark_names if name not in n1_model.landmark_names]
    if missing:
        raise InputError(n1_model.version_dir, f"has no landmark(s) {', '.join(missing)} of the main model")
    if model.config.superresolution == 1:
        raise InputError(model.version_dir, "is itself an n = 1 model: give the n = 1 model alone with --model")
    model.methods = {key: method for key, method in model.methods.items() if not key.startswith("fine_n1_")}
    n1_model.methods = {
        "fine_argmax": method_name("fine", 1, parabola=False),
        "fine_parabola": method_name("fine", 1, parabola=True),
    }


# ---------------------------------------------------------------------------------------------------------
# baselines


@dataclass(frozen=True)
class Scan:
    """What a baseline gets for one subject: the file's array and affine, and the export's outputs on it."""

    path: Path
    volume: np.ndarray  # the file's own array [i, j, k]
    voxel_to_world: np.ndarray  # the file's affine (RAS mm)
    decodings: dict[str, np.ndarray]  # the export's ``decodings`` outputs for this scan
    landmark_names: tuple[str, ...]


class RegistrationBaseline:
    """Atlas registration: the labelled template registered (rigid + affine, SimpleITK) to each scan.

    The metric's region of interest is the box around *every* landmark of the template file (not only the
    model's), so a one-landmark model is compared with the same registration as a 32-landmark one.
    """

    name = REGISTRATION

    def __init__(
        self, template: str | Path, template_landmarks: str | Path, landmark_names: Sequence[str], seed: int = 0,
        settings: Any = None,
    ) -> None:  # fmt: skip
        self.template_volume, self.template_voxel_to_world, self.template_landmarks_world_mm, self.roi_world_mm = (
            _read_template(template, template_landmarks, landmark_names)
        )
        self.seed = seed
        self.settings = settings

    def __call__(self, scan: Scan) -> dict[str, np.ndarray]:
        from mdgru_keras.baselines.registration import register_landmarks

        try:
            return register_landmarks(
                self.template_volume, self.template_voxel_to_world, self.template_landmarks_world_mm,
                scan.volume, scan.voxel_to_world, seed=self.seed, settings=self.settings,
                roi_world_mm=self.roi_world_mm,
            )  # fmt: skip
        except (RuntimeError, ValueError) as error:  # SimpleITK raises RuntimeError; a sheared affine ValueError
            raise InputError(scan.path, f"registration failed ({_first_line(error)})") from None


def _read_template(
    template: str | Path, template_landmarks: str | Path, landmark_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Template array and affine, its landmarks ``landmark_names`` (InputError naming the file if one is
    missing), and every landmark of the file as ``[N, 3]`` RAS mm."""
    from mdgru_keras.io import read_landmarks, read_nifti_array, require_landmarks

    volume, voxel_to_world = read_nifti_array(template)
    landmarks = read_landmarks(template_landmarks)
    chosen = dict(require_landmarks(landmarks, landmark_names, template_landmarks))
    every = np.stack([np.asarray(point, dtype=np.float64) for point in landmarks.values()])
    return volume, voxel_to_world, chosen, every


class AntsBaseline:
    """Deformable atlas registration: the labelled template registered (affine + SyN, ANTsPy) to each scan.

    ``transform``: ``"SyN"`` (row ``ants-syn``) or ``"Affine"`` (row ``ants-affine``). Raises
    :class:`InputError` with the install command if ANTsPy (``antspyx``) is missing.
    """

    def __init__(
        self, template: str | Path, template_landmarks: str | Path, landmark_names: Sequence[str], seed: int = 0,
        transform: str = "SyN",
    ) -> None:  # fmt: skip
        from mdgru_keras.baselines.ants_registration import AntsSettings, import_ants

        try:
            import_ants()
        except ImportError as error:
            raise InputError(None, str(error)) from None
        self.settings = AntsSettings(transform=transform)
        self.name = self.settings.name
        self.template_volume, self.template_voxel_to_world, self.template_landmarks_world_mm, _ = _read_template(
            template, template_landmarks, landmark_names
        )
        self.seed = seed

    def __call__(self, scan: Scan) -> dict[str, np.ndarray]:
        from mdgru_keras.baselines.ants_registration import register_landmarks

        try:
            return register_landmarks(
                self.template_volume, self.template_voxel_to_world, self.template_landmarks_world_mm,
                scan.volume, scan.voxel_to_world, seed=self.seed, settings=self.settings,
            )  # fmt: skip
        except (RuntimeError, ValueError) as error:  # ANTsPy raises RuntimeError; a sheared affine ValueError
            raise InputError(scan.path, f"{self.name} registration failed ({_first_line(error)})") from None


class UNetBaseline:
    """The 3D U-Net fine stage on windows around the export's coarse estimate (``coarse_voxel``).

    The scan is read as in training (:func:`mdgru_keras.io.read_volume` at the model spacing: RAS-canonical,
    resampled); the coarse estimate goes from the file's voxels to that grid, the U-Net's peak back to world mm.
    """

    name = UNET

    def __init__(self, model_path: str | Path, config: Config) -> None:
        from mdgru_keras.baselines.unet import UNetLocalizer

        self.config = config
        check_unet_matches(model_path, config)
        try:
            self.localizer = UNetLocalizer.load(model_path, config)
        except InputError:  # a file Keras cannot load (load_unet names it)
            raise
        except ValueError as error:  # window size of the model and the export's config differ
            raise InputError(model_path, str(error)) from None
        heatmaps = self.localizer.model.get_layer("heatmaps")
        if heatmaps.filters != config.num_landmarks:
            raise InputError(
                model_path, f"a U-Net for {heatmaps.filters} landmarks; the export has {config.num_landmarks}"
            )

    def __call__(self, scan: Scan) -> dict[str, np.ndarray]:
        from mdgru_keras.io import read_volume

        grid = read_volume(scan.path, self.config.spacing_mm)
        file_to_grid = np.linalg.inv(grid.array_to_file_voxel)
        coarse_grid_voxel = affine_maps.voxel_to_world(scan.decodings["coarse_voxel"], file_to_grid)
        grid_voxel = self.localizer.localize(grid.data, coarse_grid_voxel)
        world_mm = affine_maps.voxel_to_world(grid_voxel, grid.voxel_to_world)
        return {name: world_mm[k] for k, name in enumerate(scan.landmark_names)}


def check_unet_matches(model_path: str | Path, config: Config) -> None:
    """If ``train-unet`` recorded the U-Net's config (``PATH.json``), it must agree with the export's on the
    landmarks (their order gives the heatmap channels), spacing, high-pass and window size."""
    import json

    summary_path = Path(model_path).with_suffix(".json")
    try:
        recorded = json.loads(summary_path.read_text(encoding="utf-8")).get("config")
    except (OSError, ValueError, AttributeError):
        return
    if not isinstance(recorded, dict):
        return
    ours = config.to_dict()
    checks = {
        "landmarks": (recorded.get("landmarks"), ours["landmarks"]),
        "spacing_mm": (recorded.get("spacing_mm"), ours["spacing_mm"]),
        "highpass_sigma_mm": (recorded.get("highpass_sigma_mm"), ours["highpass_sigma_mm"]),
        "fine.window_size": ((recorded.get("fine") or {}).get("window_size"), ours["fine"]["window_size"]),
    }
    differences = [f"{key} {theirs!r} (export: {mine!r})" for key, (theirs, mine) in checks.items() if theirs != mine]
    if differences:
        raise InputError(model_path, "trained with another config than the export's: " + "; ".join(differences))


# ---------------------------------------------------------------------------------------------------------
# running the test set


@dataclass
class EvaluationRun:
    """Everything :func:`mdgru_keras.evaluation.evaluate` needs, plus what went wrong and how long it took."""

    predictions: list[Prediction] = field(default_factory=list)
    truths: list[GroundTruth] = field(default_factory=list)
    images: dict[str, Path] = field(default_factory=dict)  # subject -> scan file
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file, one-line error)
    seconds: dict[str, list[float]] = field(default_factory=dict)  # "model" / baseline -> seconds per scan

    def median_seconds(self) -> dict[str, float]:
        return {key: float(np.median(values)) for key, values in self.seconds.items() if values}


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _decode_scan(
    model: ExportedModel,
    label: str,
    case: EvaluationCase,
    volume: np.ndarray,
    voxel_to_world: np.ndarray,
    names: tuple[str, ...] | None = None,
) -> tuple[dict[str, np.ndarray], tuple[str, ...], list[Prediction], float]:
    """One export on one scan: its ``decodings`` outputs, the landmark names (``names``, else the export's own),
    one :class:`Prediction` per row of ``model.methods`` for those landmarks, and the seconds it took.
    :class:`InputError` naming the scan, with ``label`` naming the export, if it refuses the scan."""
    from mdgru_keras.serving import ServingError

    start = time.perf_counter()
    try:
        outputs = model.decodings(volume, voxel_to_world)
    except ServingError as error:
        raise InputError(case.image, f"{label} refused the scan ({error})") from None
    seconds = time.perf_counter() - start
    index = {str(name): k for k, name in enumerate(outputs["landmark_names"])}
    names = tuple(index) if names is None else names
    predictions = [
        Prediction(
            case.subject, method, {name: outputs[f"{decoding}_world_mm"][index[name]] for name in names},
            voxel_to_world,
        )  # fmt: skip
        for decoding, method in model.methods.items()
    ]
    return outputs, names, predictions, seconds


def evaluate_case(
    case: EvaluationCase,
    model: ExportedModel,
    baselines: Sequence[Callable[[Scan], dict[str, np.ndarray]]] = (),
    n1_model: ExportedModel | None = None,
) -> tuple[GroundTruth, list[Prediction], dict[str, float]]:
    """Truth, the predictions of every decoding and baseline, and seconds per method, for one subject.

    ``n1_model`` (prepared with :func:`use_n1_model`) adds its own ``fine n=1`` rows.

    Raises :class:`InputError` naming the file at fault (unreadable scan or landmark file, missing landmarks,
    a scan the model refuses, a baseline that fails on it).
    """
    from mdgru_keras.io import read_landmarks, read_nifti_array, require_landmarks

    truth_mm = require_landmarks(read_landmarks(case.landmarks), model.landmark_names, case.landmarks)
    volume, voxel_to_world = read_nifti_array(case.image)
    outputs, names, predictions, model_seconds = _decode_scan(model, "the model", case, volume, voxel_to_world)
    seconds = {MODEL: model_seconds}
    truth = GroundTruth(case.subject, truth_mm, voxel_to_world=voxel_to_world)
    if n1_model is not None:
        _, _, n1_predictions, seconds[N1_MODEL] = _decode_scan(
            n1_model, "the n = 1 model", case, volume, voxel_to_world, names
        )
        predictions += n1_predictions
    scan = Scan(case.image, volume, voxel_to_world, outputs, names)
    for baseline in baselines:
        start = time.perf_counter()
        landmarks_world_mm = baseline(scan)
        seconds[baseline.name] = time.perf_counter() - start
        try:
            predictions.append(Prediction(case.subject, baseline.name, landmarks_world_mm, voxel_to_world))
        except ValueError as error:  # e.g. a non-finite point from a diverged registration or a broken U-Net
            raise InputError(case.image, f"{baseline.name}: {error}") from None
    return truth, predictions, seconds


def run_evaluation(
    cases: Sequence[EvaluationCase],
    model: ExportedModel,
    baselines: Sequence[Callable[[Scan], dict[str, np.ndarray]]] = (),
    on_case: Callable[[EvaluationCase, str | None], None] | None = None,
    n1_model: ExportedModel | None = None,
) -> EvaluationRun:
    """:func:`evaluate_case` for every case; a failing case is recorded and skipped.

    ``on_case(case, error_line_or_None)`` is called after each case (progress and error reporting).
    """
    run = EvaluationRun()
    for case in cases:
        try:
            truth, predictions, seconds = evaluate_case(case, model, baselines, n1_model)
        except InputError as error:
            path = error.path if error.path is not None else str(case.image)
            run.failed.append((path, f"{error.problem} (subject {case.subject})"))
            if on_case is not None:
                on_case(case, f"{path}: {run.failed[-1][1]}")
            continue
        run.truths.append(truth)
        run.predictions.extend(predictions)
        run.images[case.subject] = case.image
        for key, value in seconds.items():
            run.seconds.setdefault(key, []).append(value)
        if on_case is not None:
            on_case(case, None)
    return run


# ---------------------------------------------------------------------------------------------------------
# figures of the best and worst cases


def _file_part(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("_") or "x"


def case_figures(
    cases: tuple[list[LandmarkError], list[LandmarkError]], images: dict[str, Path], out_dir: str | Path
) -> list[Path]:
    """One PNG per case, ``best-1_SUBJECT_LANDMARK.png`` ... ``worst-1_...``: sagittal and axial slices through
    the true landmark with the ground truth (green ○) and the prediction (red +), as Fig. 3 of the paper.

    ``cases``: ``(best, worst)`` from :func:`mdgru_keras.evaluation.best_and_worst`.
    """
    from mdgru_keras.figures import landmark_figure
    from mdgru_keras.io import read_volume

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, volumes = [], {}
    for kind, errors in zip(("best", "worst"), cases):
        for rank, error in enumerate(errors, start=1):
            if error.subject not in volumes:  # exact reorientation to RAS, no resampling
                volumes[error.subject] = read_volume(images[error.subject], spacing_mm=None)
            volume = volumes[error.subject]
            points = {
                label: {error.landmark: affine_maps.world_to_voxel(np.asarray(mm), volume.voxel_to_world)}
                for label, mm in (("ground truth", error.true_world_mm), ("prediction", error.predicted_world_mm))
            }
            title = f"{kind} {rank}: {error.subject}, {error.landmark}, {error.method}: {error.error_mm:.2f} mm"
            name = f"{kind}-{rank}_{_file_part(error.subject)}_{_file_part(error.landmark)}.png"
            written.append(landmark_figure(volume.data, volume.voxel_to_world, points, out_dir / name, title))
    return written
