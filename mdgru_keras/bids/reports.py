"""The BIDS App's visual QC reports (pages: :mod:`mdgru_keras.reports`), beside the derivatives as fMRIPrep's:

* ``OUTPUT_DIR/sub-XX.html``, written at the participant level: every scan of the participant with complete
  outputs (its landmarks' table and slices, read back from the sidecars, so that a page also covers scans done by
  an earlier run) and its scans that failed, with their errors;
* ``OUTPUT_DIR/group_report.html``, written at the group level: every participant on one line, the worst first
  (``failed``, then by :data:`mdgru_keras.prediction.SEVERITY`), linking to its page.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mdgru_keras.bids.derivatives import GroupResult, ScanOutputs, read_complete, read_failure

if TYPE_CHECKING:
    from mdgru_keras.prediction import QualityThresholds, ScanPrediction

GROUP_REPORT = "group_report.html"


def participant_page(output_dir: str | Path, participant_id: str) -> Path:
    return Path(output_dir) / f"{participant_id}.html"


def prediction_from_sidecar(outputs: ScanOutputs, sidecar: dict) -> ScanPrediction:
    """The prediction a complete sidecar records (:func:`mdgru_keras.bids.derivatives.sidecar_document`), with the
    scan's array shape read from its header (so that ``outside_image`` is judged as when it was written)."""
    import nibabel as nib

    from mdgru_keras.prediction import ScanPrediction

    landmarks = sidecar["Landmarks"]
    names = tuple(landmarks)

    def values(key: str) -> np.ndarray:
        return np.array([landmarks[name][key] for name in names], dtype=np.float64)

    return ScanPrediction(
        path=str(outputs.scan.path),
        landmark_names=names,
        world_mm=values("world_mm"),
        voxel=values("voxel"),
        coarse_world_mm=values("coarse_world_mm"),
        coarse_voxel=values("coarse_voxel"),
        confidence=values("confidence").astype(np.float32),
        shape=tuple(nib.load(str(outputs.scan.path)).shape[:3]),
        flip_disagreement_mm=values("flip_disagreement_mm"),
    )


def write_participant_report(
    output_dir: str | Path,
    participant_id: str,
    planned: Sequence[ScanOutputs],
    thresholds: QualityThresholds,
    model: dict | None = None,
) -> Path:
    """``OUTPUT_DIR/sub-XX.html`` for the scans of ``planned`` that belong to ``participant_id``: those with
    complete outputs shown, the others listed with their recorded error. ``model``: the sidecars' ``Model``."""
    from mdgru_keras.reports import participant_report

    scans, failed = [], []
    for outputs in planned:
        if outputs.scan.participant_id != participant_id:
            continue
        sidecar = read_complete(outputs)
        if sidecar is None:
            failed.append((outputs.scan.relpath, read_failure(outputs) or "no complete outputs"))
        else:
            scans.append((outputs.scan.path, prediction_from_sidecar(outputs, sidecar)))
    model_info = None if model is None else {
        "name": model.get("Name"), "version": model.get("Version"), "fingerprint": model.get("Fingerprint"),
    }  # fmt: skip
    return participant_report(
        participant_page(output_dir, participant_id), scans, title=participant_id, model_info=model_info,
        thresholds=thresholds, failed=failed,
    )  # fmt: skip


def write_group_report(output_dir: str | Path, result: GroupResult) -> Path:
    """``OUTPUT_DIR/group_report.html``: one line per selected participant that has scans, worst first, linking
    to its page where it has one (statuses as its sidecars record them; its note names the scans the model is
    probably lost in, then the failed ones)."""
    from mdgru_keras.reports import ReportEntry, group_report

    output_dir = Path(output_dir)
    failed: dict[str, list[tuple[str, str]]] = {}
    for scan, problem in result.failed:
        failed.setdefault(scan.participant_id, []).append((scan.relpath, problem))
    lost: dict[str, list[str]] = {}
    for scan, note in result.lost:
        lost.setdefault(scan.participant_id, []).append(f"{Path(scan.relpath).name}: {note}")
    entries = []
    for participant in sorted({scan.participant_id for scan in result.selection.scans}):
        page = participant_page(output_dir, participant)
        entries.append(ReportEntry.from_statuses(
            participant, page.name if page.is_file() else None, result.statuses.get(participant, []),
            scans=result.complete_scans.get(participant, []), failed=failed.get(participant, []),
            notes=lost.get(participant, []),
        ))  # fmt: skip
    model_info, thresholds = None, None
    if len(result.models) == 1 and isinstance(result.models[0], dict):  # else the pages say which
        model = result.models[0]
        model_info = {"name": model.get("Name"), "version": model.get("Version")}
    if len(result.settings) == 1 and isinstance(result.settings[0], dict):
        from mdgru_keras.prediction import QualityThresholds

        settings = result.settings[0]
        thresholds = QualityThresholds(settings["MinConfidence"], settings["MaxFlipDisagreementMm"],
                                       settings.get("MaxCoarseShiftMm"))  # fmt: skip
    return group_report(output_dir / GROUP_REPORT, entries, title="Landmark QC: group", model_info=model_info,
                        thresholds=thresholds)  # fmt: skip
