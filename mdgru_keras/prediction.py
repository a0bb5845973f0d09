"""Landmarks of NIfTI scans through the exported SavedModel (loaded here or behind TF Serving), and their files.

The scan goes to the model as its file stores it (:func:`mdgru_keras.io.read_nifti_array`: the array and its
voxel->world affine); the model reorients, resamples and localizes, and answers in RAS millimetres and in
the file's voxel indices. This module turns the answers into :class:`ScanPrediction` objects and writes them:

* JSON: ``{"scans": [{"file", "landmarks": {name: {"world_mm", "voxel", "coarse_world_mm", "coarse_voxel",
  "confidence", "flip_disagreement_mm", "coarse_shift_mm", "status"}}}], "failed": [{"file", "error"}],
  "min_confidence", "max_flip_disagreement_mm", "max_coarse_shift_mm", ...}``;
* CSV: one row per scan and landmark (:data:`CSV_COLUMNS`);
* 3D Slicer ``.fcsv`` (RAS), one file per scan (:func:`mdgru_keras.io.write_landmarks`);
* a PNG per scan with sagittal and axial slices through each landmark (:func:`mdgru_keras.figures.landmark_figure`).

Answers that cannot be right are not passed off as good ones:

* a scan with fewer than :data:`MIN_SCAN_VOXELS` voxels along an axis of its array is refused before it
  reaches the model (:class:`~mdgru_keras.errors.InputError`), by the model's own rule;
* every landmark gets a ``status``: ``ok``, or ``outside_image`` (its voxel lies more than half a voxel beyond
  the array on some axis: the landmark is not in the scan, or the model is lost), ``low_confidence``
  (``confidence`` below the threshold, :data:`MIN_CONFIDENCE` by default), ``unstable`` (a model whose fine
  passes see the mirror image found it at places more than :data:`MAX_FLIP_DISAGREEMENT_MM` apart in the scan
  and in its mirror image) and/or ``coarse_fine_disagree`` (the fine estimate lies more than
  :data:`MAX_COARSE_SHIFT_MM` from the coarse one: ``coarse_shift_mm``), joined by ``;``;
* a scan in which :data:`LOST_FLAGGED_FRACTION` or more of the landmarks are flagged is one the model is probably
  lost in (:func:`lost_scan_note`): its warning line says so first, and so does its participant's note on
  ``predict --report``'s and the BIDS app's group pages.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mdgru_keras.io.nifti import NIFTI_SUFFIXES, read_nifti_array

if TYPE_CHECKING:
    from mdgru_keras.serving import LocalizationClient

PREDICTIONS_FORMAT = "mdgru-keras predictions 1"
# Scans with fewer voxels than this along an axis are refused: the exported model's own limit (its signature
# answers INVALID_ARGUMENT below it), checked here so that --model and --server refuse alike, in one line.
# Small scans above it are localized (the model pads them); their answers get a status (outside_image, ...).
MIN_SCAN_VOXELS = 2
# Default confidence threshold of the ``low_confidence`` status. The confidence is the product over the three
# axes of the probability within one class of the answer (chance level 27 / C^3 for C classes per axis: tiny
# 8e-4; cpu and afids 1.3e-5). Calibrated on held-out synthetic heads of an earlier shipped model
# (docs/MODEL_CARD.md, bench-pretrained, 2026-12-01 16:01 UTC: 13.1 % of the 512 landmarks of unseen and
# held-out-family heads flagged, 8.1 mm mean error against 2.1 mm) and kept: the current export (2026-12-05 05:37
# UTC) is more confident, 1.2 % flagged, 9.0 mm mean error against 1.7 mm, 17 % of the errors over 5 mm among them
# (3e-3 would flag 10.5 % and 58 %). Models of other configs need their own: --min-confidence. Not calibrated on
# real scans.
MIN_CONFIDENCE = 0.001
# Default threshold of the ``unstable`` status: the distance between the fine estimates in the scan and in its
# left-right mirror image (``flip_disagreement_mm``, models whose passes see the mirror image). Chosen on held-out
# synthetic heads of the shipped models (docs/MODEL_CARD.md, bench-pretrained): above 8 mm, 4.1 % of the landmarks
# of unseen and held-out-family heads were flagged with the export of 2026-12-05 05:37 UTC (8.8 mm mean error
# against 1.5 mm for the others, 46 % of the errors over 5 mm among them). The current export's errors are smaller
# and its mirror-image pass is a pass of its own: 2.0 % flagged, 3.6 against 1.2 mm, 33 % of the errors over 5 mm
# (bench-pretrained, 2026-12-05 23:17 UTC; the MODEL_CARD's table gives other thresholds). Not calibrated on real
# scans.
MAX_FLIP_DISAGREEMENT_MM = 8.0
# Default threshold of the ``coarse_fine_disagree`` status: the distance of the fine estimate from the coarse one
# (``coarse_shift_mm``). Calibrated like the others (docs/MODEL_CARD.md, bench-pretrained, 2026-12-05 05:37 UTC):
# above 15 mm, 9.6 % of the landmarks were flagged, with 4.3 mm mean error against 1.5 mm for the others, and
# 42 % of the errors over 5 mm among them (earlier exports: 8.6 %, 4.2 against 1.6 mm; 7.6 %, 4.0 against 2.0 mm;
# 9.6 %, 4.4 against 2.7 mm).
# Not calibrated on real scans.
MAX_COARSE_SHIFT_MM = 15.0
# A scan in which at least this fraction of the landmarks is flagged is one the model is probably lost in: its
# warning says so first, because the landmarks left "ok" there are most likely wrong too. Chosen on 46 synthetic
# heads (bench-pretrained's unseen, held-out-family, beyond, tilted and small heads, and make demo's 6 test heads;
# shipped export of 2026-12-05 22:52 UTC): the three heads 27-45 mm off on average had 84-100 % of their landmarks
# flagged (their "ok" ones 23 mm off on average); of the other 43, one beyond the training ranges had 94 % (3.2 mm off),
# the rest at most 50 %. Only for models of at least LOST_MIN_LANDMARKS landmarks: with fewer the fraction says
# little.
LOST_FLAGGED_FRACTION = 0.75
LOST_MIN_LANDMARKS = 8
STATUS_OK = "ok"
STATUS_OUTSIDE = "outside_image"
STATUS_LOW_CONFIDENCE = "low_confidence"
STATUS_UNSTABLE = "unstable"
STATUS_COARSE_FINE_DISAGREE = "coarse_fine_disagree"
# The statuses from the least to the most severe (worst_status): a landmark outside the image is not in the scan
# at all, a low confidence means the model did not find it, an unstable one was found at two places, and one
# far from its coarse estimate moved a long way. The order of the middle three was that of the mean errors of
# the landmarks each flagged on held-out heads with the first shipped model (11.5, 9.2 and 8.8 mm); with the
# current one they are 8.1, 9.6 and 4.4 mm (docs/MODEL_CARD.md), and the order was kept.
STATUS_SEVERITY = (STATUS_OK, STATUS_COARSE_FINE_DISAGREE, STATUS_UNSTABLE, STATUS_LOW_CONFIDENCE, STATUS_OUTSIDE)
# A scan's status when it could not be localized at all (predict's "error:" lines, the BIDS app's error logs):
# worse than any landmark's.
STATUS_FAILED = "failed"
SEVERITY: dict[str, int] = {status: rank for rank, status in enumerate((*STATUS_SEVERITY, STATUS_FAILED))}
CSV_COLUMNS = (
    "file",
    "landmark",
    "x_mm",
    "y_mm",
    "z_mm",
    "voxel_i",
    "voxel_j",
    "voxel_k",
    "coarse_x_mm",
    "coarse_y_mm",
    "coarse_z_mm",
    "confidence",
    "flip_disagreement_mm",
    "coarse_shift_mm",
    "status",
)


@dataclass(frozen=True)
class QualityThresholds:
    """When a landmark gets a flag (module docstring): ``low_confidence`` below ``min_confidence``, ``unstable``
    when its mirror-image estimates lie more than ``max_flip_disagreement_mm`` apart, ``coarse_fine_disagree``
    when the fine estimate lies more than ``max_coarse_shift_mm`` from the coarse one (``0`` or ``None``: off).
    The defaults are calibrated for the shipped model (docs/MODEL_CARD.md); predict's and bids' options set them.
    """

    min_confidence: float = MIN_CONFIDENCE
    max_flip_disagreement_mm: float = MAX_FLIP_DISAGREEMENT_MM
    max_coarse_shift_mm: float | None = MAX_COARSE_SHIFT_MM

    def to_json(self) -> dict:
        return {
            "min_confidence": self.min_confidence,
            "max_flip_disagreement_mm": self.max_flip_disagreement_mm,
            "max_coarse_shift_mm": self.max_coarse_shift_mm or None,  # null: the flag is off
        }

    def describe(self) -> str:
        """One line for people: ``low_confidence below 0.001; unstable above 8 mm flip disagreement; ...``."""
        parts = [
            f"{STATUS_LOW_CONFIDENCE} below {self.min_confidence:g}",
            f"{STATUS_UNSTABLE} above {self.max_flip_disagreement_mm:g} mm flip disagreement",
        ]
        if self.max_coarse_shift_mm:
            parts.append(f"{STATUS_COARSE_FINE_DISAGREE} above {self.max_coarse_shift_mm:g} mm coarse shift")
        return "; ".join(parts)


DEFAULT_THRESHOLDS = QualityThresholds()


@dataclass(frozen=True)
class ScanPrediction:
    """The landmarks of one scan (K landmarks, in the model's order).

    ``world_mm``, ``coarse_world_mm``: float64 ``[K, 3]`` RAS millimetres; ``voxel``, ``coarse_voxel``:
    float64 ``[K, 3]`` continuous voxel indices of the file's own array (0-based, as nibabel indexes it);
    ``confidence``: float32 ``[K]`` in ``[0, 1]``; ``flip_disagreement_mm``: float64 ``[K]``, the distance between
    the estimates in the scan and in its mirror image (zeros for models whose passes never see the mirror image);
    ``shape``: the file's array shape (``None``: unknown, then no landmark counts as outside).
    """

    path: str
    landmark_names: tuple[str, ...]
    world_mm: np.ndarray
    voxel: np.ndarray
    coarse_world_mm: np.ndarray
    coarse_voxel: np.ndarray
    confidence: np.ndarray
    shape: tuple[int, ...] | None = None
    flip_disagreement_mm: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.flip_disagreement_mm is None:  # exports made before flip averaging existed
            object.__setattr__(self, "flip_disagreement_mm", np.zeros(len(self.landmark_names)))

    @classmethod
    def from_outputs(
        cls, path: str | Path, outputs: dict[str, np.ndarray], shape: Sequence[int] | None = None
    ) -> ScanPrediction:
        """From the outputs of the SavedModel's ``serving_default`` / ``localize_int16`` signatures (exports
        without ``flip_disagreement_mm`` get zeros)."""
        disagreement = outputs.get("flip_disagreement_mm")
        return cls(
            path=str(path),
            landmark_names=tuple(str(name) for name in outputs["landmark_names"]),
            world_mm=np.asarray(outputs["world_mm"], dtype=np.float64),
            voxel=np.asarray(outputs["voxel"], dtype=np.float64),
            coarse_world_mm=np.asarray(outputs["coarse_world_mm"], dtype=np.float64),
            coarse_voxel=np.asarray(outputs["coarse_voxel"], dtype=np.float64),
            confidence=np.asarray(outputs["confidence"], dtype=np.float32),
            shape=None if shape is None else tuple(int(n) for n in shape),
            flip_disagreement_mm=None if disagreement is None else np.asarray(disagreement, dtype=np.float64),
        )

    def select(self, names: Sequence[str] | None) -> ScanPrediction:
        """The landmarks ``names`` only, in that order (``None``: all); names must be known."""
        if names is None:
            return self
        index = [self.landmark_names.index(name) for name in names]
        return ScanPrediction(
            path=self.path,
            landmark_names=tuple(names),
            world_mm=self.world_mm[index],
            voxel=self.voxel[index],
            coarse_world_mm=self.coarse_world_mm[index],
            coarse_voxel=self.coarse_voxel[index],
            confidence=self.confidence[index],
            shape=self.shape,
            flip_disagreement_mm=self.flip_disagreement_mm[index],
        )

    def outside(self) -> np.ndarray:
        """bool ``[K]``: the landmark's voxel lies more than half a voxel beyond the array on some axis."""
        if self.shape is None:
            return np.zeros(len(self.landmark_names), dtype=bool)
        upper = np.asarray(self.shape[:3], dtype=np.float64) - 0.5
        return ((self.voxel < -0.5) | (self.voxel > upper) | ~np.isfinite(self.voxel)).any(axis=-1)

    def low_confidence(self, min_confidence: float = MIN_CONFIDENCE) -> np.ndarray:
        """bool ``[K]``: the confidence is below ``min_confidence`` (NaN counts as low)."""
        return ~(self.confidence.astype(np.float64) >= min_confidence)

    def unstable(self, max_disagreement_mm: float = MAX_FLIP_DISAGREEMENT_MM) -> np.ndarray:
        """bool ``[K]``: the estimates in the scan and in its mirror image lie more than ``max_disagreement_mm``
        apart (NaN counts as unstable)."""
        return ~(self.flip_disagreement_mm <= max_disagreement_mm)

    def coarse_shift_mm(self) -> np.ndarray:
        """float64 ``[K]``: how far the fine estimate lies from the coarse one (mm)."""
        return np.linalg.norm(self.world_mm - self.coarse_world_mm, axis=-1)

    def coarse_fine_disagree(self, max_coarse_shift_mm: float | None = MAX_COARSE_SHIFT_MM) -> np.ndarray:
        """bool ``[K]``: the fine estimate lies more than ``max_coarse_shift_mm`` from the coarse one (NaN counts
        as disagreeing); ``0`` or ``None`` switches the flag off."""
        if not max_coarse_shift_mm:
            return np.zeros(len(self.landmark_names), dtype=bool)
        return ~(self.coarse_shift_mm() <= max_coarse_shift_mm)

    def statuses(self, thresholds: QualityThresholds = DEFAULT_THRESHOLDS) -> list[str]:
        """Per landmark ``ok``, or ``outside_image``, ``low_confidence``, ``unstable`` and/or
        ``coarse_fine_disagree`` joined by ``;`` (module docstring)."""
        flags = (
            (STATUS_OUTSIDE, self.outside()),
            (STATUS_LOW_CONFIDENCE, self.low_confidence(thresholds.min_confidence)),
            (STATUS_UNSTABLE, self.unstable(thresholds.max_flip_disagreement_mm)),
            (STATUS_COARSE_FINE_DISAGREE, self.coarse_fine_disagree(thresholds.max_coarse_shift_mm)),
        )
        return [
            ";".join(status for status, flagged in flags if flagged[k]) or STATUS_OK
            for k in range(len(self.landmark_names))
        ]

    def lost_note(self, thresholds: QualityThresholds = DEFAULT_THRESHOLDS) -> str | None:
        """:func:`lost_scan_note` of this scan's :meth:`statuses`."""
        return lost_scan_note(self.statuses(thresholds))

    def probably_lost(self, thresholds: QualityThresholds = DEFAULT_THRESHOLDS) -> bool:
        """Whether the model is probably lost in this scan (:meth:`lost_note`)."""
        return self.lost_note(thresholds) is not None

    def warning(self, thresholds: QualityThresholds = DEFAULT_THRESHOLDS) -> str | None:
        """One line naming the landmarks that are not ``ok`` (``None`` when all are), for standard error; it
        starts by saying so when the model is :meth:`probably_lost` in the scan."""
        names = self.landmark_names
        min_confidence = thresholds.min_confidence
        max_disagreement_mm = thresholds.max_flip_disagreement_mm
        max_coarse_shift_mm = thresholds.max_coarse_shift_mm
        outside = [name for name, out in zip(names, self.outside()) if out]
        low = [
            f"{name} ({float(value):.2g})"
            for name, value, is_low in zip(names, self.confidence, self.low_confidence(min_confidence))
            if is_low
        ]
        unstable = [
            f"{name} ({float(value):.1f} mm)"
            for name, value, flagged in zip(names, self.flip_disagreement_mm, self.unstable(max_disagreement_mm))
            if flagged
        ]
        shifted = [
            f"{name} ({float(value):.1f} mm)"
            for name, value, flagged in zip(
                names, self.coarse_shift_mm(), self.coarse_fine_disagree(max_coarse_shift_mm)
            )
            if flagged
        ]
        parts = []
        if lost := self.lost_note(thresholds):
            parts.append(f"{lost} (check it by eye: --figure or --report)")
        if outside:
            parts.append(f"outside the image: {', '.join(outside)}")
        if low:
            parts.append(f"confidence below {min_confidence:g}: {', '.join(low)}")
        if unstable:
            parts.append(f"mirror-image estimates over {max_disagreement_mm:g} mm apart: {', '.join(unstable)}")
        if shifted:
            parts.append(f"fine estimate over {max_coarse_shift_mm:g} mm from the coarse one: {', '.join(shifted)}")
        return f"{self.path}: {'; '.join(parts)}" if parts else None

    def point_descriptions(self, thresholds: QualityThresholds = DEFAULT_THRESHOLDS) -> dict[str, str]:
        """Per landmark one line with its QC values, for the description of a 3D Slicer point (.fcsv,
        .mrk.json): ``status ok; confidence 0.97; flip disagreement 1.2 mm; coarse shift 3.4 mm``."""
        statuses = self.statuses(thresholds)
        coarse_shift_mm = self.coarse_shift_mm()
        return {
            name: f"status {statuses[k]}; confidence {float(self.confidence[k]):.3g}; "
            f"flip disagreement {float(self.flip_disagreement_mm[k]):.1f} mm; "
            f"coarse shift {float(coarse_shift_mm[k]):.1f} mm"
            for k, name in enumerate(self.landmark_names)
        }

    def world_mm_by_name(self) -> dict[str, np.ndarray]:
        return {name: self.world_mm[k] for k, name in enumerate(self.landmark_names)}

    def to_json(self, thresholds: QualityThresholds = DEFAULT_THRESHOLDS) -> dict:
        statuses = self.statuses(thresholds)
        coarse_shift_mm = self.coarse_shift_mm()
        return {
            "file": self.path,
            "landmarks": {
                name: {
                    "world_mm": self.world_mm[k].tolist(),
                    "voxel": self.voxel[k].tolist(),
                    "coarse_world_mm": self.coarse_world_mm[k].tolist(),
                    "coarse_voxel": self.coarse_voxel[k].tolist(),
                    "confidence": float(self.confidence[k]),
                    "flip_disagreement_mm": float(self.flip_disagreement_mm[k]),
                    "coarse_shift_mm": float(coarse_shift_mm[k]),
                    "status": statuses[k],
                }
                for k, name in enumerate(self.landmark_names)
            },
        }


def lost_scan_note(statuses: Sequence[str]) -> str | None:
    """``N of K landmarks flagged, the model is probably lost in this scan`` when at least
    :data:`LOST_FLAGGED_FRACTION` of one scan's landmark ``statuses`` are not ``ok`` (scans of at least
    :data:`LOST_MIN_LANDMARKS` landmarks), else ``None``. The one rule for predict's warning, its QC pages and the
    BIDS app's group page (which has only the statuses its sidecars recorded)."""
    count, flagged = len(statuses), sum(status != STATUS_OK for status in statuses)
    if count < LOST_MIN_LANDMARKS or flagged < LOST_FLAGGED_FRACTION * count:
        return None
    return f"{flagged} of {count} landmarks flagged, the model is probably lost in this scan"


def status_flags(status: str) -> list[str]:
    """The flags of a landmark status (``"low_confidence;unstable"`` -> both; ``"ok"`` -> none); a flag that is
    not one of :data:`SEVERITY` is a ``ValueError``."""
    flags = [flag for flag in status.split(";") if flag and flag != STATUS_OK]
    unknown = [flag for flag in flags if flag not in SEVERITY]
    if unknown:
        raise ValueError(f"unknown status {status!r}; expected ok or flags among {', '.join(SEVERITY)} joined by ';'")
    return flags


def worst_status(statuses: Iterable[str]) -> str:
    """The most severe flag among ``statuses`` (each ``ok`` or flags joined by ``;``; ``failed`` for a scan),
    by :data:`SEVERITY` (``ok`` also for no statuses at all)."""
    flags = [flag for status in statuses for flag in status_flags(status)]
    return max(flags, key=SEVERITY.__getitem__, default=STATUS_OK)


def check_scan_size(path: str | Path, shape: Sequence[int], voxel_to_world: np.ndarray) -> None:
    """Refuse a scan with fewer than :data:`MIN_SCAN_VOXELS` voxels along an axis (an :class:`InputError`).

    ``voxel_to_world`` is the scan's affine; the message gives the size in mm too."""
    from mdgru_keras.errors import InputError

    spacing = np.linalg.norm(np.asarray(voxel_to_world, dtype=np.float64)[:3, :3], axis=0)
    voxels = np.asarray(shape[:3], dtype=np.int64)
    if not (voxels >= MIN_SCAN_VOXELS).all():
        size = " x ".join(f"{value:.3g}" for value in voxels * spacing)
        counts = " x ".join(str(int(n)) for n in voxels)
        raise InputError(
            path,
            f"too small for landmark localization: {counts} voxels ({size} mm); the model needs at least "
            f"{MIN_SCAN_VOXELS} voxels along each axis",
        )


def predict_scan(client: LocalizationClient, path: str | Path) -> ScanPrediction:
    """Read one NIfTI scan and localize its landmarks through ``client`` (local or remote).

    Raises :class:`~mdgru_keras.errors.InputError` for unreadable files and scans too small to localize in
    (:func:`check_scan_size`), and :class:`mdgru_keras.serving.ServingError` when the model refuses the scan (e.g.
    ``INVALID_ARGUMENT`` for NaN values).
    """
    volume, voxel_to_world = read_nifti_array(path)
    check_scan_size(path, volume.shape, voxel_to_world)
    # localize() sends integer-valued scans (most CT and MR) as int16: half the bytes, the same result.
    return ScanPrediction.from_outputs(path, client.localize(volume, voxel_to_world), shape=volume.shape)


def unknown_landmarks(requested: Iterable[str], known: Sequence[str], owner: str = "the model") -> str | None:
    """A one-line message naming unknown landmark names and listing the ones ``owner`` knows, or None if all are
    known. Names are case-sensitive."""
    unknown = [name for name in requested if name not in known]
    if not unknown:
        return None
    return (
        f"unknown landmark{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
        f"{owner} knows {len(known)}: {', '.join(known)}"
    )


def scan_stem(path: str | Path) -> str:
    """``sub-01_T1w`` for ``dir/sub-01_T1w.nii.gz``."""
    name = Path(path).name
    for suffix in sorted(NIFTI_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def per_scan_paths(paths: Sequence[str | Path], directory: Path, suffix: str) -> list[Path]:
    """One output file per scan in ``directory``, named after the scan (``-2``, ``-3``... for repeated names)."""
    seen: dict[str, int] = {}
    result = []
    for path in paths:
        stem = scan_stem(path)
        seen[stem] = seen.get(stem, 0) + 1
        result.append(directory / (f"{stem}{suffix}" if seen[stem] == 1 else f"{stem}-{seen[stem]}{suffix}"))
    return result


def predictions_json(
    predictions: Sequence[ScanPrediction],
    failed: Sequence[tuple[str, str]],
    model: str,
    thresholds: QualityThresholds = DEFAULT_THRESHOLDS,
) -> str:
    """The JSON document (see the module docstring); ``failed`` holds ``(file, one-line error)`` pairs."""
    document = {
        "format": PREDICTIONS_FORMAT,
        "model": model,
        "coordinates": "world_mm: RAS millimetres; voxel: 0-based continuous indices of the file's own array",
        **thresholds.to_json(),
        "scans": [prediction.to_json(thresholds) for prediction in predictions],
        "failed": [{"file": path, "error": error} for path, error in failed],
    }
    return json.dumps(document, indent=2) + "\n"


def predictions_csv(
    predictions: Sequence[ScanPrediction], thresholds: QualityThresholds = DEFAULT_THRESHOLDS
) -> str:
    """One row per scan and landmark (columns :data:`CSV_COLUMNS`; float64 values written exactly)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for prediction in predictions:
        statuses = prediction.statuses(thresholds)
        coarse_shift_mm = prediction.coarse_shift_mm()
        for k, name in enumerate(prediction.landmark_names):
            writer.writerow(
                [prediction.path, name]
                + [repr(float(v)) for v in prediction.world_mm[k]]
                + [repr(float(v)) for v in prediction.voxel[k]]
                + [repr(float(v)) for v in prediction.coarse_world_mm[k]]
                + [repr(float(prediction.confidence[k])), repr(float(prediction.flip_disagreement_mm[k]))]
                + [repr(float(coarse_shift_mm[k])), statuses[k]]
            )
    return out.getvalue()


def write_prediction_figure(prediction: ScanPrediction, out_png: str | Path) -> Path:
    """Sagittal and axial slices through each landmark with the prediction (and the coarse estimate) marked."""
    from mdgru_keras.figures import landmark_figure
    from mdgru_keras.geometry import affine_maps
    from mdgru_keras.io.nifti import read_volume

    # The figure wants RAS-canonical slices: reorient (exactly, no resampling) and move the points along.
    volume = read_volume(prediction.path, spacing_mm=None)
    points = {
        label: {
            name: affine_maps.world_to_voxel(world_mm[k], volume.voxel_to_world)
            for k, name in enumerate(prediction.landmark_names)
        }
        for label, world_mm in (("prediction", prediction.world_mm), ("coarse estimate", prediction.coarse_world_mm))
    }
    return landmark_figure(volume.data, volume.voxel_to_world, points, out_png, title=Path(prediction.path).name)
