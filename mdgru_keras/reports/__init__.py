"""Visual QC reports of predicted landmarks, in the style of fMRIPrep's: self-contained HTML pages that open
offline (inline CSS, images as data URIs, no script, a Content-Security-Policy that forbids fetching anything).

* :func:`participant_report` — one page per participant (one or several scans): a summary table per scan
  (landmark, RAS mm, confidence, flip disagreement, status; flagged rows highlighted and linked to their figure),
  then for each landmark its axial, coronal and sagittal slices with the marker, confidence and flags.
* :func:`group_report` — one page listing the participants worst first (:class:`ReportEntry`, built with
  :meth:`ReportEntry.from_predictions`), each linking to its page.
* :class:`ScanReports` — a page per scan plus the group page, as ``mdgru-localize predict --report DIR`` writes
  them; :func:`report_page_paths` and :func:`model_info_for_report` give its file names and model facts.

A typical use (a BIDS App writing one page per participant and a group page)::

    from mdgru_keras.reports import ReportEntry, group_report, participant_report

    entries = []
    for participant, scans in predictions_by_participant.items():  # scans: [(nifti_path, ScanPrediction)]
        page = participant_report(out / f"{participant}.html", scans, title=participant, model_info=info,
                                  min_confidence=0.01, max_disagreement_mm=8.0)
        entries.append(ReportEntry.from_predictions(participant, page.name, [p for _, p in scans],
                                                    min_confidence=0.01, max_disagreement_mm=8.0))
    group_report(out / "index.html", entries, model_info=info, min_confidence=0.01, max_disagreement_mm=8.0)
"""

from mdgru_keras.reports.group import GROUP_PAGE, group_report, model_info_for_report, report_page_paths
from mdgru_keras.reports.participant import participant_report
from mdgru_keras.reports.scans import ScanReports
from mdgru_keras.reports.status import SEVERITY, STATUS_FAILED, ReportEntry, worst_status

__all__ = [
    "GROUP_PAGE",
    "SEVERITY",
    "STATUS_FAILED",
    "ReportEntry",
    "ScanReports",
    "group_report",
    "model_info_for_report",
    "participant_report",
    "report_page_paths",
    "worst_status",
]
