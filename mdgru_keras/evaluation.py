"""Localization errors and their reports: the rows of the paper's Table 1a, as Markdown and JSON.

The flow: :class:`Prediction` s (one per subject and method) and :class:`GroundTruth` s (one per subject)
→ :func:`compute_errors` → :class:`LandmarkError` s (one per method, subject and landmark) →
:meth:`ErrorTable.from_errors` → :meth:`ErrorTable.to_markdown` / :meth:`ErrorTable.write_json`.
:func:`evaluate` does the three steps at once.

Two error measures are reported for every landmark:

* ``error_mm``: the Euclidean distance between predicted and true position in world millimetres (RAS).
* ``error_voxel``: the same distance measured in the *scan's* voxel units, i.e. the Euclidean distance
  between the two points' continuous voxel coordinates in the scan (``|A⁻¹ (p - t)|`` for the scan's
  ``voxel_to_world`` ``A``). For an isotropic 1 mm scan both agree; for a scan with 1 x 1 x 3 mm voxels a
  3 mm error along z is 1 voxel. It needs the scan's affine; without one it is ``None``.

Statistics per landmark and over all landmarks: median, mean, standard deviation (population, ``ddof=0``),
maximum and count of the errors. Rows are keyed by method name (see :data:`METHOD_ORDER` and
:func:`method_name`); a row exists only for methods whose predictions were given.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import numpy as np

from mdgru_keras.errors import InputError
from mdgru_keras.geometry import affine_maps
from mdgru_keras.io.atomic import write_text_atomic
from mdgru_keras.version import package_version

JSON_FORMAT = "mdgru-keras evaluation v1"

COARSE = "coarse"
REGISTRATION = "registration"
ANTS_AFFINE = "ants-affine"  # ANTsPy affine only (``--baseline ants --ants-transform Affine``)
ANTS_SYN = "ants-syn"  # ANTsPy affine + SyN (``--baseline ants``)
UNET = "unet"
BASELINE_ORDER = (REGISTRATION, ANTS_AFFINE, ANTS_SYN, UNET)
# Table 1a's rows in their order; "N" is the superresolution of the trained model (the config's
# ``superresolution``), which :func:`method_name` fills in, e.g. "fine n=4 + parabola".
METHOD_ORDER = (
    COARSE,
    "fine n=1 (argmax)",
    "fine n=1 + parabola",
    "fine n=N (argmax)",
    "fine n=N + parabola",
    *BASELINE_ORDER,
)
_FINE_PATTERN = re.compile(r"^fine n=(\d+|N) (\(argmax\)|\+ parabola)$")


def method_name(stage: str, superresolution: int | str = 1, parabola: bool = False) -> str:
    """The row key of a method: ``"coarse"``, ``"fine n=4 (argmax)"``, ``"fine n=4 + parabola"``, or a
    baseline's name (``"registration"``, ``"ants-syn"``, ``"unet"``) returned unchanged."""
    if stage == "fine":
        return f"fine n={superresolution} " + ("+ parabola" if parabola else "(argmax)")
    return stage


def method_sort_key(method: str) -> tuple:
    """Order of rows: coarse, fine by n (argmax before parabola), registration, ants-affine, ants-syn, unet,
    then others by name."""
    match = _FINE_PATTERN.match(method)
    if method == COARSE:
        return (0,)
    if match:
        n = math.inf if match.group(1) == "N" else int(match.group(1))
        return (1, n, match.group(2) != "(argmax)")
    if method in BASELINE_ORDER:
        return (2, METHOD_ORDER.index(method))
    return (3, method)


# ---------------------------------------------------------------------------------------------------------
# inputs


def _as_points(landmarks_world_mm: Mapping[str, Any], what: str) -> dict[str, np.ndarray]:
    points = {}
    for name, value in landmarks_world_mm.items():
        point = np.asarray(value, dtype=np.float64)
        if point.shape != (3,) or not np.all(np.isfinite(point)):
            raise ValueError(f"{what}: landmark {name!r} is not a finite 3-vector (got {value!r})")
        points[str(name)] = point
    return points


def _as_affine(voxel_to_world: Any, what: str) -> np.ndarray | None:
    if voxel_to_world is None:
        return None
    affine = np.asarray(voxel_to_world, dtype=np.float64)
    if affine.shape != (4, 4) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"{what}: voxel_to_world must be an invertible 4x4 affine, got shape {affine.shape}")
    return affine


@dataclass(frozen=True)
class GroundTruth:
    """True landmark positions of one subject.

    ``landmarks_world_mm``: name -> RAS mm ``(3,)``, in the dataset's landmark order.
    ``voxel_to_world``: the subject's scan's 4x4 RAS affine, which defines the voxel units of ``error_voxel``.
    """

    subject: str
    landmarks_world_mm: Mapping[str, np.ndarray]
    voxel_to_world: np.ndarray | None = None

    def __post_init__(self) -> None:
        what = f"ground truth of {self.subject!r}"
        object.__setattr__(self, "landmarks_world_mm", _as_points(self.landmarks_world_mm, what))
        object.__setattr__(self, "voxel_to_world", _as_affine(self.voxel_to_world, what))


@dataclass(frozen=True)
class Prediction:
    """One method's landmark positions for one subject.

    ``landmarks_world_mm``: name -> RAS mm ``(3,)``. ``voxel_to_world`` (optional): the scan's affine, used
    for ``error_voxel`` when the :class:`GroundTruth` has none (both given: they must agree).
    Build from voxel coordinates with :meth:`from_voxel`.
    """

    subject: str
    method: str
    landmarks_world_mm: Mapping[str, np.ndarray]
    voxel_to_world: np.ndarray | None = None

    def __post_init__(self) -> None:
        what = f"{self.method!r} prediction of {self.subject!r}"
        object.__setattr__(self, "landmarks_world_mm", _as_points(self.landmarks_world_mm, what))
        object.__setattr__(self, "voxel_to_world", _as_affine(self.voxel_to_world, what))

    @classmethod
    def from_voxel(
        cls, subject: str, method: str, landmarks_voxel: Mapping[str, np.ndarray], voxel_to_world: np.ndarray
    ) -> Prediction:
        """A prediction given as continuous voxel coordinates ``(3,)`` in a volume with ``voxel_to_world``."""
        world = {name: affine_maps.voxel_to_world(voxel, voxel_to_world) for name, voxel in landmarks_voxel.items()}
        return cls(subject, method, world, voxel_to_world)


@dataclass(frozen=True)
class LandmarkError:
    """The error of one method on one landmark of one subject."""

    method: str
    subject: str
    landmark: str
    error_mm: float
    error_voxel: float | None  # in the scan's voxel units; None without the scan's affine
    predicted_world_mm: tuple[float, float, float]
    true_world_mm: tuple[float, float, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "subject": self.subject,
            "landmark": self.landmark,
            "error_mm": self.error_mm,
            "error_voxel": self.error_voxel,
            "predicted_world_mm": list(self.predicted_world_mm),
            "true_world_mm": list(self.true_world_mm),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LandmarkError:
        return cls(
            method=str(data["method"]),
            subject=str(data["subject"]),
            landmark=str(data["landmark"]),
            error_mm=float(data["error_mm"]),
            error_voxel=None if data.get("error_voxel") is None else float(data["error_voxel"]),
            predicted_world_mm=tuple(float(v) for v in data["predicted_world_mm"]),
            true_world_mm=tuple(float(v) for v in data["true_world_mm"]),
        )


def compute_errors(
    predictions: Iterable[Prediction], ground_truth: Iterable[GroundTruth] | Mapping[str, GroundTruth]
) -> list[LandmarkError]:
    """Errors of every predicted landmark that has a true position.

    Landmarks missing from a prediction are missing from the errors (and so from the counts); predicted
    landmarks without a true position are not scored. A prediction for a subject without ground truth, two
    predictions of one method for one subject, or two disagreeing scan affines raise ``ValueError``.
    Order: predictions as given, landmarks in ground-truth order.
    """
    truths = dict(ground_truth) if isinstance(ground_truth, Mapping) else {t.subject: t for t in ground_truth}
    errors: list[LandmarkError] = []
    seen: set[tuple[str, str]] = set()
    for prediction in predictions:
        key = (prediction.method, prediction.subject)
        if key in seen:
            raise ValueError(f"two {prediction.method!r} predictions for subject {prediction.subject!r}")
        seen.add(key)
        truth = truths.get(prediction.subject)
        if truth is None:
            raise ValueError(f"{prediction.method!r} predicts {prediction.subject!r}, which has no ground truth")
        affine = _scan_affine(truth, prediction)
        for name, true_mm in truth.landmarks_world_mm.items():
            predicted_mm = prediction.landmarks_world_mm.get(name)
            if predicted_mm is None:
                continue
            error_voxel = None
            if affine is not None:
                voxels = affine_maps.world_to_voxel(np.stack([predicted_mm, true_mm]), affine)
                error_voxel = float(np.linalg.norm(voxels[0] - voxels[1]))
            errors.append(
                LandmarkError(
                    method=prediction.method,
                    subject=prediction.subject,
                    landmark=name,
                    error_mm=float(np.linalg.norm(predicted_mm - true_mm)),
                    error_voxel=error_voxel,
                    predicted_world_mm=tuple(float(v) for v in predicted_mm),
                    true_world_mm=tuple(float(v) for v in true_mm),
                )
            )
    return errors


def _scan_affine(truth: GroundTruth, prediction: Prediction) -> np.ndarray | None:
    if truth.voxel_to_world is not None and prediction.voxel_to_world is not None:
        if not np.allclose(truth.voxel_to_world, prediction.voxel_to_world, atol=1e-4):
            raise ValueError(
                f"the {prediction.method!r} prediction of {prediction.subject!r} comes with another voxel_to_world "
                "than its ground truth; give predictions in the scan's voxel coordinates"
            )
    return truth.voxel_to_world if truth.voxel_to_world is not None else prediction.voxel_to_world


# ---------------------------------------------------------------------------------------------------------
# statistics and the table


@dataclass(frozen=True)
class ErrorStats:
    """Summary of a set of errors; the voxel fields are ``None`` unless every error has a voxel value."""

    count: int
    median_mm: float
    mean_mm: float
    std_mm: float  # population standard deviation (ddof=0)
    max_mm: float
    median_voxel: float | None = None
    mean_voxel: float | None = None
    std_voxel: float | None = None
    max_voxel: float | None = None

    @classmethod
    def of(cls, errors: Sequence[LandmarkError]) -> ErrorStats:
        if not errors:
            raise ValueError("no errors to summarize")
        mm = np.array([e.error_mm for e in errors])
        voxel_values = [e.error_voxel for e in errors]
        voxel = None if any(v is None for v in voxel_values) else np.array(voxel_values, dtype=np.float64)
        return cls(
            count=len(errors),
            median_mm=float(np.median(mm)),
            mean_mm=float(np.mean(mm)),
            std_mm=float(np.std(mm)),
            max_mm=float(np.max(mm)),
            median_voxel=None if voxel is None else float(np.median(voxel)),
            mean_voxel=None if voxel is None else float(np.mean(voxel)),
            std_voxel=None if voxel is None else float(np.std(voxel)),
            max_voxel=None if voxel is None else float(np.max(voxel)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class MethodRow:
    """One row of Table 1a: a method's errors over all landmarks and per landmark."""

    method: str
    subjects: int
    overall: ErrorStats
    per_landmark: dict[str, ErrorStats]  # only landmarks the method predicted, in the table's landmark order

    def to_dict(self) -> dict[str, Any]:
        return {
            "subjects": self.subjects,
            "overall": self.overall.to_dict(),
            "per_landmark": {name: stats.to_dict() for name, stats in self.per_landmark.items()},
        }


@dataclass(frozen=True)
class ErrorTable:
    """Table 1a: one :class:`MethodRow` per method that has predictions, in :func:`method_sort_key` order."""

    landmarks: tuple[str, ...]
    rows: dict[str, MethodRow]
    errors: tuple[LandmarkError, ...] = field(repr=False)

    @classmethod
    def from_errors(cls, errors: Iterable[LandmarkError], landmarks: Sequence[str] | None = None) -> ErrorTable:
        """Summarize ``errors``; ``landmarks`` fixes the landmark order (default: order of first appearance)."""
        errors = tuple(errors)
        order = list(dict.fromkeys(landmarks if landmarks is not None else (e.landmark for e in errors)))
        order += [name for name in dict.fromkeys(e.landmark for e in errors) if name not in order]
        by_method: dict[str, list[LandmarkError]] = {}
        for error in errors:
            by_method.setdefault(error.method, []).append(error)
        rows = {}
        for method in sorted(by_method, key=method_sort_key):
            method_errors = by_method[method]
            per_landmark = {}
            for name in order:
                landmark_errors = [e for e in method_errors if e.landmark == name]
                if landmark_errors:
                    per_landmark[name] = ErrorStats.of(landmark_errors)
            rows[method] = MethodRow(
                method=method,
                subjects=len({e.subject for e in method_errors}),
                overall=ErrorStats.of(method_errors),
                per_landmark=per_landmark,
            )
        return cls(landmarks=tuple(order), rows=rows, errors=errors)

    # -- Markdown ------------------------------------------------------------------------------------------

    def to_markdown(self, digits: int = 2) -> str:
        """Overall table (one row per method), then per-landmark tables (mm, and voxels where known)."""
        if not self.rows:
            return "No predictions to evaluate.\n"

        def number(value: float | None) -> str:
            return "–" if value is None else f"{value:.{digits}f}"

        def mean_std(mean: float | None, std: float | None) -> str:
            return "–" if mean is None else f"{number(mean)} ± {number(std)}"

        lines = [
            "| method | subjects | errors | median mm | mean ± std mm | max mm "
            "| median vox | mean ± std vox | max vox |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for method, row in self.rows.items():
            s = row.overall
            lines.append(
                f"| {method} | {row.subjects} | {s.count} | {number(s.median_mm)} | {mean_std(s.mean_mm, s.std_mm)} "
                f"| {number(s.max_mm)} | {number(s.median_voxel)} | {mean_std(s.mean_voxel, s.std_voxel)} "
                f"| {number(s.max_voxel)} |"
            )
        methods = list(self.rows)
        for unit in ("mm", "voxel"):
            if unit == "voxel" and all(row.overall.median_voxel is None for row in self.rows.values()):
                continue
            lines += [
                "",
                f"Per landmark, error in {unit}: median / mean ± std (count)",
                "",
                "| landmark | " + " | ".join(methods) + " |",
                "| --- |" + " ---: |" * len(methods),
            ]
            for name in self.landmarks:
                cells = []
                for method in methods:
                    s = self.rows[method].per_landmark.get(name)
                    if s is None:
                        cells.append("–")
                        continue
                    median, mean, std = (
                        (s.median_mm, s.mean_mm, s.std_mm)
                        if unit == "mm"
                        else (s.median_voxel, s.mean_voxel, s.std_voxel)
                    )
                    cells.append("–" if median is None else f"{number(median)} / {mean_std(mean, std)} ({s.count})")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    # -- JSON ----------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": JSON_FORMAT,
            "created_by": f"mdgru-keras {package_version()}",
            "std": "population (ddof=0)",
            "voxel_error": "Euclidean distance in the scan's continuous voxel coordinates",
            "landmarks": list(self.landmarks),
            "methods": list(self.rows),
            "rows": {method: row.to_dict() for method, row in self.rows.items()},
            "errors": [error.to_dict() for error in self.errors],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ErrorTable:
        """Rebuild a table from :meth:`to_dict`'s output (the statistics are recomputed from the errors)."""
        if data.get("format") != JSON_FORMAT:
            raise ValueError(f"not an mdgru-keras evaluation (format {data.get('format')!r})")
        return cls.from_errors([LandmarkError.from_dict(e) for e in data["errors"]], landmarks=data["landmarks"])

    def write_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON, atomically (a reader never sees a half-written file)."""
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")


def read_json(path: str | Path) -> ErrorTable:
    """Read a table written by :meth:`ErrorTable.write_json`; ``InputError`` naming the file if it cannot."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return ErrorTable.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(path, f"cannot read the evaluation: {error}") from error


# ---------------------------------------------------------------------------------------------------------
# one-call evaluation and case picking


def evaluate(
    predictions: Iterable[Prediction],
    ground_truth: Iterable[GroundTruth] | Mapping[str, GroundTruth],
    json_path: str | Path | None = None,
    stream: TextIO | Literal["stdout"] | None = "stdout",
) -> ErrorTable:
    """Errors → :class:`ErrorTable`; prints the Markdown to ``stream`` (``"stdout"``: the current ``sys.stdout``,
    None: silent) and writes ``json_path`` (atomically)."""
    truths = list(ground_truth.values()) if isinstance(ground_truth, Mapping) else list(ground_truth)
    landmark_order = list(dict.fromkeys(name for truth in truths for name in truth.landmarks_world_mm))
    table = ErrorTable.from_errors(compute_errors(predictions, truths), landmarks=landmark_order)
    if stream is not None:
        (sys.stdout if stream == "stdout" else stream).write(table.to_markdown())
    if json_path is not None:
        table.write_json(json_path)
    return table


def best_and_worst(
    errors: Iterable[LandmarkError], k: int = 3, method: str | None = None
) -> tuple[list[LandmarkError], list[LandmarkError]]:
    """The ``k`` cases (subject, landmark) with the smallest and the largest ``error_mm``.

    Returns ``(best, worst)``: ``best`` ascending, ``worst`` descending by error; ties are broken by subject and
    landmark name so the choice is reproducible. Cases of one method only: pass ``method`` when ``errors``
    mixes methods. With fewer than ``2k`` cases the two lists overlap.
    """
    errors = [e for e in errors if method is None or e.method == method]
    methods = {e.method for e in errors}
    if len(methods) > 1:
        raise ValueError(f"errors of several methods ({sorted(methods)}); pick one with method=")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    ascending = sorted(errors, key=lambda e: (e.error_mm, e.subject, e.landmark))
    descending = sorted(errors, key=lambda e: (-e.error_mm, e.subject, e.landmark))
    return ascending[:k], descending[:k]
