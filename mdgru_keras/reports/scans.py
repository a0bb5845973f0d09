"""QC pages for a list of scans, one page each, and their group page: what ``mdgru-localize predict --report DIR``
writes."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

from mdgru_keras.prediction import DEFAULT_THRESHOLDS, STATUS_FAILED, QualityThresholds, ScanPrediction, scan_stem
from mdgru_keras.reports.group import GROUP_PAGE, group_report, report_page_paths
from mdgru_keras.reports.participant import participant_report
from mdgru_keras.reports.status import ReportEntry


class ScanReports:
    """One QC page per scan in ``directory`` (``SCAN.html``, :func:`report_page_paths`), written as each scan's
    prediction arrives (:meth:`add`), and the group page ``index.html`` listing every scan worst first
    (:meth:`finish`). Each scan is its own "participant", named after its file (``sub-01_T1w``)."""

    def __init__(
        self,
        directory: str | Path,
        images: Sequence[str | Path],
        *,
        model_info: Mapping[str, object] | None = None,
        thresholds: QualityThresholds = DEFAULT_THRESHOLDS,
    ) -> None:
        self.directory = Path(directory)
        self.images = list(images)
        self.pages = report_page_paths(self.images, self.directory)
        self.model_info = dict(model_info or {})
        self.thresholds = thresholds
        self.entries: dict[int, ReportEntry] = {}  # index in images -> its line on the group page

    def add(self, index: int, prediction: ScanPrediction) -> Path:
        """Write the page of ``images[index]`` with its prediction; returns the page's path."""
        image, page = self.images[index], self.pages[index]
        participant_report(
            page, [(image, prediction)], title=scan_stem(image), model_info=self.model_info,
            thresholds=self.thresholds,
        )  # fmt: skip
        self.entries[index] = ReportEntry.from_predictions(
            scan_stem(image), page.name, [prediction], thresholds=self.thresholds
        )
        return page

    def finish(self, failed: Sequence[tuple[str | Path, str]] = ()) -> Path:
        """Write the group page and return its path. ``failed``: ``(image, one-line error)`` pairs. A scan without a
        page (it failed, or its page did) gets a line with status ``failed``, its error and no link; the errors of
        a scan that has a page (e.g. its figure failed) become its note."""
        errors: dict[str, list[str]] = {}
        for path, error in failed:
            errors.setdefault(str(path), []).append(error)
        entries = []
        for index, image in enumerate(self.images):
            entry, note = self.entries.get(index), "; ".join(errors.get(str(image), []))
            if entry is None:
                entry = ReportEntry(scan_stem(image), None, STATUS_FAILED, scans=(Path(image).name,), note=note)
            elif note:
                entry = dataclasses.replace(entry, note=note)
            entries.append(entry)
        return group_report(
            self.directory / GROUP_PAGE, entries, title="Landmark QC", model_info=self.model_info,
            thresholds=self.thresholds,
        )  # fmt: skip
