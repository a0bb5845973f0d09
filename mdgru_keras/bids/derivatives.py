"""The output of the BIDS app: a BIDS-derivatives dataset of landmark files, and the group table.

OUTPUT_DIR holds::

    dataset_description.json    DatasetType "derivative", GeneratedBy mdgru-keras and its version
    .bidsignore                 the files below that BIDS does not define (logs/, the group files, the pages)
    sub-01.html                 the participant's QC page (mdgru_keras.bids.reports)
    sub-01/[ses-1/]anat/sub-01[_ses-1][_acq-X][_run-N]_space-T1w_desc-mdgru_afids.fcsv   3D Slicer, RAS mm
    sub-01/[ses-1/]anat/sub-01[_ses-1][_acq-X][_run-N]_space-T1w_desc-mdgru_afids.json   its sidecar
    logs/sub-01[_ses-1]..._space-T1w_desc-mdgru_afids_error.json   a failed scan's error (until it succeeds)
    group_afids.tsv, group_summary.json, group_report.html         written by the group level

Names: every entity of the scan's name (``sub``, ``ses``, ``acq``, ``ce``, ``rec``, ``run``, ``echo``,
``part``, ...) is kept in its order, so two runs or acquisitions never share an output; then ``space-T1w``
(``space-T2w`` for a T2w scan: the coordinates are world millimetres, RAS, of that very scan, as 3D Slicer
shows it), ``desc-mdgru`` and the suffix ``afids``.

The sidecar (:func:`sidecar_document`) names the source scan, the model (name, version, path, SHA-256 of its
fingerprint), the settings (``--landmarks``, ``--min-confidence``, ``--max-disagreement``), the scan's worst
status and per landmark its coordinates, confidence, flip disagreement and status.

Complete outputs, and reruns: every file is written atomically (:mod:`mdgru_keras.io.atomic`), the sidecar
last. A scan's outputs are complete (:func:`read_complete`) when its sidecar is ours and the .fcsv beside it
holds exactly the sidecar's landmarks. A run killed at any moment leaves complete outputs, no outputs, or an
.fcsv without its sidecar (incomplete: written again by the next run), plus possibly hidden temporary files
``.NAME.XXXX.tmp`` (removed when the scan is written again). Before writing a scan its old sidecar is removed,
so an interrupted rewrite is never taken for complete; a scan that fails loses its old outputs and gets an
error log instead, which its next successful run removes.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mdgru_keras.bids.layout import DESCRIPTION_FILE, BidsScan, Selection, read_json
from mdgru_keras.errors import InputError
from mdgru_keras.io.atomic import write_text_atomic
from mdgru_keras.version import package_version

if TYPE_CHECKING:
    from mdgru_keras.prediction import QualityThresholds, ScanPrediction

PIPELINE = "mdgru-keras"  # GeneratedBy Name, also the derivatives' name for pybids
BIDS_VERSION = "1.10.0"  # of the derivatives written here
RAW = "raw"  # DatasetLinks name of the input dataset, as in the sidecars' Sources "bids:raw:sub-01/..."
DESC = "mdgru"
SUFFIX = "afids"
SIDECAR_FORMAT = "mdgru-keras BIDS landmarks 1"
SUMMARY_FORMAT = "mdgru-keras BIDS group summary 1"
LOGS = "logs"
GROUP_TABLE = "group_afids.tsv"
GROUP_SUMMARY = "group_summary.json"
GROUP_COLUMNS = (
    "participant_id",
    "session_id",
    "image",
    "landmark",
    "x_mm",
    "y_mm",
    "z_mm",
    "confidence",
    "flip_disagreement_mm",
    "coarse_shift_mm",
    "status",
)
NOT_AVAILABLE = "n/a"  # BIDS' value for an empty TSV cell
# the QC pages (mdgru_keras.bids.reports: sub-XX.html, group_report.html) are not BIDS files either
BIDSIGNORE = f"{LOGS}/\n/{GROUP_TABLE}\n/{GROUP_SUMMARY}\n/*.html\n"


def generated_by() -> list[dict]:
    return [
        {
            "Name": PIPELINE,
            "Version": package_version(),
            "Description": "anatomical landmarks (AFIDs) localized by coarse-to-fine MD-GRU networks",
        }
    ]


# ---------------------------------------------------------------------------------------------------------
# the derivatives dataset


def dataset_description(bids_dir: Path) -> dict:
    return {
        "Name": "mdgru-keras landmarks",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": generated_by(),
        "SourceDatasets": [{"URL": Path(bids_dir).resolve().as_uri()}],
        "DatasetLinks": {RAW: Path(bids_dir).resolve().as_uri()},
    }


def _read_description(path: Path) -> dict:
    description = read_json(path)
    return description if isinstance(description, dict) else {}


def _is_ours(description: dict) -> bool:
    generated = description.get("GeneratedBy")
    return isinstance(generated, list) and any(
        isinstance(entry, dict) and entry.get("Name") == PIPELINE for entry in generated
    )


def prepare_output_dir(output_dir: str | Path, bids_dir: str | Path) -> None:
    """Make ``output_dir`` a derivatives dataset of ``bids_dir`` (its ``dataset_description.json`` and
    ``.bidsignore``), or keep the one a previous run made. Refuses, in one line, the input dataset itself and a
    folder that holds another dataset."""
    output_dir, bids_dir = Path(output_dir), Path(bids_dir)
    if output_dir.resolve() == bids_dir.resolve():
        raise InputError(
            output_dir, "is the input dataset itself; write the derivatives elsewhere, e.g. BIDS_DIR/derivatives/mdgru"
        )
    description_path = output_dir / DESCRIPTION_FILE
    if description_path.is_file():
        description = _read_description(description_path)
        if not _is_ours(description):
            names = [entry.get("Name") for entry in description.get("GeneratedBy", []) if isinstance(entry, dict)]
            owner = f"generated by {', '.join(map(str, names))}" if names else (
                f"DatasetType {description.get('DatasetType', 'raw')}"
            )
            raise InputError(
                description_path,
                f"belongs to another dataset ({owner}); give mdgru-keras an OUTPUT_DIR of its own, "
                "e.g. BIDS_DIR/derivatives/mdgru",
            )
    else:
        write_text_atomic(description_path, json.dumps(dataset_description(bids_dir), indent=2) + "\n")
    if not (output_dir / ".bidsignore").exists():
        write_text_atomic(output_dir / ".bidsignore", BIDSIGNORE)


def check_output_dir(output_dir: str | Path) -> None:
    """For the group level: ``output_dir`` must hold what the participant level wrote."""
    output_dir = Path(output_dir)
    description_path = output_dir / DESCRIPTION_FILE
    if not description_path.is_file():
        raise InputError(
            output_dir, f"no mdgru-keras derivatives here (no {DESCRIPTION_FILE}); run the participant level first"
        )
    if not _is_ours(_read_description(description_path)):
        raise InputError(
            description_path, f"not written by {PIPELINE} (GeneratedBy); give the participant level's OUTPUT_DIR"
        )


# ---------------------------------------------------------------------------------------------------------
# one scan's outputs


def derivative_stem(scan: BidsScan) -> str:
    """``sub-01_ses-2_acq-mprage_run-1_space-T1w_desc-mdgru_afids`` for ``sub-01_ses-2_acq-mprage_run-1_T1w``."""
    kept = [f"{key}-{value}" for key, value in scan.entities if key not in ("space", "desc")]
    return "_".join([*kept, f"space-{scan.suffix}", f"desc-{DESC}", SUFFIX])


@dataclass(frozen=True)
class ScanOutputs:
    """Where one scan's outputs go."""

    scan: BidsScan
    landmarks: Path  # the .fcsv
    sidecar: Path  # its .json
    error_log: Path  # logs/STEM_error.json

    @classmethod
    def of(cls, output_dir: str | Path, scan: BidsScan) -> ScanOutputs:
        folder = Path(output_dir) / scan.participant_id
        if scan.session_id is not None:
            folder = folder / scan.session_id
        stem = derivative_stem(scan)
        return cls(
            scan=scan,
            landmarks=folder / "anat" / f"{stem}.fcsv",
            sidecar=folder / "anat" / f"{stem}.json",
            error_log=Path(output_dir) / LOGS / f"{stem}_error.json",
        )


def plan_outputs(
    output_dir: str | Path, scans: Iterable[BidsScan]
) -> tuple[list[ScanOutputs], list[tuple[BidsScan, str]]]:
    """The outputs of each scan, and the scans whose outputs another scan already takes (e.g. ``.nii`` and
    ``.nii.gz`` of one name), each with a one-line problem."""
    planned, conflicts, taken = [], [], {}
    for scan in scans:
        outputs = ScanOutputs.of(output_dir, scan)
        first = taken.setdefault(outputs.landmarks, scan)
        if first is scan:
            planned.append(outputs)
        else:
            conflicts.append((scan, f"has the same output name as {first.relpath} ({outputs.landmarks.name}); skipped"))
    return planned, conflicts


@dataclass(frozen=True)
class Settings:
    """What a scan's outputs depend on besides the scan: the model and the options that change them.

    ``model``: :func:`describe_model`; ``landmarks``: the ``--landmarks`` names, or None for all;
    ``thresholds``: the QC flags' (``--min-confidence``, ``--max-disagreement``, ``--max-coarse-shift``).
    """

    model: dict
    landmarks: tuple[str, ...] | None
    thresholds: QualityThresholds

    def to_json(self) -> dict:
        return {
            "Landmarks": "all" if self.landmarks is None else list(self.landmarks),
            "MinConfidence": self.thresholds.min_confidence,
            "MaxFlipDisagreementMm": self.thresholds.max_flip_disagreement_mm,
            "MaxCoarseShiftMm": self.thresholds.max_coarse_shift_mm or None,  # null: the flag is off
        }

    def differences(self, sidecar: dict) -> list[str]:
        """How the settings a sidecar records differ from these, one phrase each (empty: they agree)."""
        found = []
        old_model = sidecar.get("Model") or {}
        if old_model.get("Fingerprint") != self.model.get("Fingerprint"):
            found.append(
                f"model {old_model.get('Name')} version {old_model.get('Version')}, now {self.model.get('Name')} "
                f"version {self.model.get('Version')}"
                + (" (other weights)" if old_model.get("Name") == self.model.get("Name")
                   and old_model.get("Version") == self.model.get("Version") else "")
            )
        old, new = sidecar.get("Settings") or {}, self.to_json()
        for key, option in (("Landmarks", "--landmarks"), ("MinConfidence", "--min-confidence"),
                            ("MaxFlipDisagreementMm", "--max-disagreement"),
                            ("MaxCoarseShiftMm", "--max-coarse-shift")):  # fmt: skip
            if old.get(key) != new[key]:
                found.append(f"{option} {_option_text(old.get(key))}, now {_option_text(new[key])}")
        return found


def _option_text(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe_model(model_dir: str | Path) -> dict:
    """Name, version, path and fingerprint (SHA-256 of the SavedModel's ``fingerprint.pb``, or of its
    ``saved_model.pb``) of an exported model, for the sidecars; the model is not loaded."""
    from mdgru_keras.export import read_model_info
    from mdgru_keras.pretrained import sha256_file
    from mdgru_keras.serving.servable import resolve_version_dir

    version_dir, version = resolve_version_dir(model_dir)
    info = read_model_info(version_dir)
    fingerprint = version_dir / "fingerprint.pb"
    if not fingerprint.is_file():  # SavedModels written before TensorFlow 2.12
        fingerprint = version_dir / "saved_model.pb"
    name = info.get("name") or (version_dir.parent.name if version_dir.name.isdigit() else version_dir.name)
    return {
        "Name": str(name),
        "Version": int(info.get("version", version)),
        "Path": str(version_dir.resolve()),
        "Fingerprint": "sha256:" + sha256_file(fingerprint),
    }


def sidecar_document(scan: BidsScan, prediction: ScanPrediction, settings: Settings) -> dict:
    from mdgru_keras.prediction import worst_status

    landmarks = prediction.to_json(settings.thresholds)["landmarks"]
    source = f"bids:{RAW}:{scan.relpath}"
    return {
        "Format": SIDECAR_FORMAT,
        "Description": f"Anatomical landmarks localized by {PIPELINE} in {scan.relpath}: world millimetres (RAS) "
        "of that scan, as 3D Slicer shows them; the .fcsv beside this file holds the same points.",
        "Sources": [source],
        "SpatialReference": source,
        "CoordinateSystem": "RAS",
        "CoordinateUnits": "mm",
        "GeneratedBy": generated_by(),
        "Model": settings.model,
        "Settings": settings.to_json(),
        "Status": worst_status(values["status"] for values in landmarks.values()),
        "Landmarks": landmarks,
    }


def remove_leftovers(outputs: ScanOutputs) -> None:
    """The hidden temporary files a killed write of these outputs left (``.NAME.XXXX.tmp``, io.atomic)."""
    for target in (outputs.landmarks, outputs.sidecar, outputs.error_log):
        if target.parent.is_dir():
            for leftover in target.parent.glob(f".{target.name}.*.tmp"):
                leftover.unlink(missing_ok=True)


def write_scan_outputs(outputs: ScanOutputs, prediction: ScanPrediction, settings: Settings) -> None:
    """The .fcsv (each point's description: its status, confidence and flip disagreement), then the sidecar;
    an old sidecar goes first and the scan's error log last (module docstring: complete outputs)."""
    from mdgru_keras.io.landmarks import write_landmarks

    remove_leftovers(outputs)
    outputs.sidecar.unlink(missing_ok=True)
    document = sidecar_document(outputs.scan, prediction, settings)
    text = json.dumps(document, indent=2, allow_nan=False) + "\n"  # a ValueError for NaN, before any write
    descriptions = prediction.point_descriptions(settings.thresholds)
    write_landmarks(outputs.landmarks, prediction.world_mm_by_name(), fmt="fcsv", descriptions=descriptions)
    write_text_atomic(outputs.sidecar, text)
    outputs.error_log.unlink(missing_ok=True)


def read_complete(outputs: ScanOutputs) -> dict | None:
    """The sidecar of complete outputs (module docstring), or None."""
    from mdgru_keras.io.landmarks import read_landmarks

    try:
        document = json.loads(outputs.sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict) or document.get("Format") != SIDECAR_FORMAT:
        return None
    landmarks = document.get("Landmarks")
    if not isinstance(landmarks, dict):
        return None
    try:
        names = list(read_landmarks(outputs.landmarks))
    except InputError:
        return None
    return document if names == list(landmarks) else None


def record_failure(outputs: ScanOutputs, problem: str) -> None:
    """Keep a failed scan's one-line problem for the group summary (``logs/STEM_error.json``), and remove its
    outputs of an earlier run (``--overwrite``): a scan that failed has none."""
    outputs.sidecar.unlink(missing_ok=True)
    outputs.landmarks.unlink(missing_ok=True)
    document = {
        "Image": outputs.scan.relpath,
        "Error": problem,
        "Time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    write_text_atomic(outputs.error_log, json.dumps(document, indent=2) + "\n")


def read_failure(outputs: ScanOutputs) -> str | None:
    try:
        document = json.loads(outputs.error_log.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return str(document["Error"]) if isinstance(document, dict) and "Error" in document else None


# ---------------------------------------------------------------------------------------------------------
# the group level


@dataclass
class GroupResult:
    """What the group level found: one table row per scan and landmark, the scans without complete outputs
    (each with its problem), the scans the model is probably lost in (each with its note:
    :func:`mdgru_keras.prediction.lost_scan_note` of the statuses its sidecar recorded), per participant the
    statuses of its landmarks and its scans with complete outputs, and the models and settings used."""

    selection: Selection
    rows: list[list[str]] = field(default_factory=list)
    failed: list[tuple[BidsScan, str]] = field(default_factory=list)
    lost: list[tuple[BidsScan, str]] = field(default_factory=list)
    statuses: dict[str, list[str]] = field(default_factory=dict)
    complete_scans: dict[str, list[str]] = field(default_factory=dict)  # participant -> relpaths with outputs
    models: list[dict] = field(default_factory=list)
    settings: list[dict] = field(default_factory=list)

    @property
    def failed_participants(self) -> list[str]:
        return sorted({scan.participant_id for scan, _ in self.failed})


def collect_group(output_dir: str | Path, selection: Selection) -> GroupResult:
    """Every selected scan's complete outputs as table rows (in scan order, landmarks in file order); a scan
    without them is failed, with the error its participant level recorded (or that it has none yet)."""
    from mdgru_keras.prediction import lost_scan_note

    result = GroupResult(selection)
    planned, conflicts = plan_outputs(output_dir, selection.scans)
    result.failed.extend(conflicts)
    for outputs in planned:
        scan = outputs.scan
        document = read_complete(outputs)
        if document is None:
            problem = read_failure(outputs) or (
                f"no complete outputs ({outputs.landmarks.name} and its .json); run the participant level for it"
            )
            result.failed.append((scan, problem))
            continue
        for collection, value in ((result.models, document.get("Model")), (result.settings, document.get("Settings"))):
            if value not in collection:
                collection.append(value)
        result.complete_scans.setdefault(scan.participant_id, []).append(scan.relpath)
        scan_statuses = [values["status"] for values in document["Landmarks"].values()]
        result.statuses.setdefault(scan.participant_id, []).extend(scan_statuses)
        if note := lost_scan_note(scan_statuses):
            result.lost.append((scan, note))
        for name, values in document["Landmarks"].items():
            result.rows.append(
                [scan.participant_id, scan.session_id or NOT_AVAILABLE, scan.relpath, name]
                + [repr(float(v)) for v in values["world_mm"]]
                + [repr(float(values[key])) for key in ("confidence", "flip_disagreement_mm", "coarse_shift_mm")]
                + [values["status"]]
            )
    return result


def group_table(rows: Sequence[Sequence[str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, delimiter="\t", lineterminator="\n")
    writer.writerow(GROUP_COLUMNS)
    writer.writerows(rows)
    return out.getvalue()


def group_summary(result: GroupResult) -> dict:
    """Counts per status (a landmark with two flags counts under both), each participant's worst status
    (``failed`` when one of its scans has no complete outputs), the failed participants and scans."""
    from mdgru_keras.prediction import STATUS_FAILED, STATUS_SEVERITY, worst_status

    flags = [flag for statuses in result.statuses.values() for status in statuses for flag in status.split(";")]
    failed = set(result.failed_participants)
    participants = sorted({scan.participant_id for scan in result.selection.scans})
    return {
        "format": SUMMARY_FORMAT,
        "generated_by": generated_by(),
        "table": GROUP_TABLE,
        "participants": len(participants),
        "scans": len(result.selection.scans),
        "complete_scans": len(result.selection.scans) - len(result.failed),
        "landmarks": len(result.rows),
        "status_counts": {status: flags.count(status) for status in STATUS_SEVERITY},
        "participant_status": {
            participant: STATUS_FAILED if participant in failed else worst_status(result.statuses.get(participant, []))
            for participant in participants
        },
        "failed_participants": sorted(failed),
        "failed_scans": [
            {
                "participant_id": scan.participant_id,
                "session_id": scan.session_id,
                "image": scan.relpath,
                "error": problem,
            }
            for scan, problem in result.failed
        ],
        "probably_lost_scans": [
            {"participant_id": scan.participant_id, "session_id": scan.session_id, "image": scan.relpath, "note": note}
            for scan, note in result.lost
        ],
        "participants_without_scans": [f"sub-{label}" for label in result.selection.without_scans],
        "models": result.models,
        "settings": result.settings,
    }


def write_group(output_dir: str | Path, result: GroupResult) -> tuple[Path, Path]:
    """``group_afids.tsv`` and ``group_summary.json`` in ``output_dir``, atomically; returns their paths."""
    output_dir = Path(output_dir)
    table = write_text_atomic(output_dir / GROUP_TABLE, group_table(result.rows))
    summary = write_text_atomic(output_dir / GROUP_SUMMARY, json.dumps(group_summary(result), indent=2) + "\n")
    return table, summary
