"""How bad a landmark's or a participant's QC status is, and one participant's line on the group page.

A landmark's status is ``ok`` or one or more flags joined by ``;``
(:meth:`mdgru_keras.prediction.ScanPrediction.statuses`); a participant with a scan that could not be localized
at all is ``failed``. How bad each is: :data:`mdgru_keras.prediction.SEVERITY`, ``failed`` worst.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from mdgru_keras.prediction import (
    DEFAULT_THRESHOLDS,
    SEVERITY,
    STATUS_FAILED,
    STATUS_OK,
    STATUS_SEVERITY,
    QualityThresholds,
    status_flags,
    worst_status,
)

if TYPE_CHECKING:
    from mdgru_keras.prediction import ScanPrediction

__all__ = ["FLAGS", "SEVERITY", "STATUS_FAILED", "ReportEntry", "status_flags", "worst_status"]
FLAGS = tuple(reversed(STATUS_SEVERITY[1:]))  # the landmark flags, worst first


@dataclass(frozen=True)
class ReportEntry:
    """One participant's line on the group page (:func:`mdgru_keras.reports.group_report`).

    ``participant``: its id (e.g. ``sub-01``); ``href``: the link to its page, relative to the group page's
    folder (``None``: no page, e.g. every scan failed); ``worst_status``: ``ok``, ``low_confidence``, ``unstable``,
    ``outside_image`` or ``failed``; ``num_flagged``: landmarks not ``ok`` (over all its scans); ``num_landmarks``:
    all its landmarks; ``flag_counts``: flag -> landmarks carrying it; ``scans``: its scan file names;
    ``note``: one line shown with it (e.g. why a scan failed).
    """

    participant: str
    href: str | None
    worst_status: str = STATUS_OK
    num_flagged: int = 0
    num_landmarks: int = 0
    flag_counts: Mapping[str, int] = field(default_factory=dict)
    scans: tuple[str, ...] = ()
    note: str = ""

    def __post_init__(self) -> None:
        if self.worst_status not in SEVERITY:
            raise ValueError(
                f"ReportEntry {self.participant!r}: worst_status must be one of {', '.join(SEVERITY)}, "
                f"received {self.worst_status!r}"
            )
        if self.href is not None:
            parts = urlsplit(self.href)
            if parts.scheme or parts.netloc or self.href.startswith(("/", "\\")) or not self.href:
                raise ValueError(
                    f"ReportEntry {self.participant!r}: href must be a link relative to the group page's folder "
                    f"(the reports work offline and can be moved together), received {self.href!r}"
                )
        unknown = [flag for flag in self.flag_counts if flag not in FLAGS]
        if unknown:
            raise ValueError(
                f"ReportEntry {self.participant!r}: flag_counts keys must be among {', '.join(FLAGS)}, "
                f"received {', '.join(map(repr, unknown))}"
            )
        object.__setattr__(self, "scans", tuple(str(scan) for scan in self.scans))

    @classmethod
    def from_predictions(
        cls,
        participant: str,
        href: str | None,
        predictions: Sequence[ScanPrediction],
        *,
        failed: Sequence[tuple[str, str]] = (),
        thresholds: QualityThresholds = DEFAULT_THRESHOLDS,
    ) -> ReportEntry:
        """The entry of a participant's predictions (and its scans that failed, as ``(file, error)`` pairs),
        with the thresholds its page used. Its note names the scans the model is probably lost in
        (:meth:`~mdgru_keras.prediction.ScanPrediction.probably_lost`) before the failed ones."""
        return cls.from_statuses(
            participant,
            href,
            [status for prediction in predictions for status in prediction.statuses(thresholds)],
            scans=[prediction.path for prediction in predictions],
            failed=failed,
            notes=[f"{Path(prediction.path).name}: {note}" for prediction in predictions
                   if (note := prediction.lost_note(thresholds))],
        )

    @classmethod
    def from_statuses(
        cls,
        participant: str,
        href: str | None,
        statuses: Sequence[str],
        *,
        scans: Sequence[str | Path] = (),
        failed: Sequence[tuple[str | Path, str]] = (),
        notes: Sequence[str] = (),
    ) -> ReportEntry:
        """The entry of a participant whose landmarks have ``statuses`` (over all its ``scans``), and whose
        scans ``failed`` (``(file, error)`` pairs) could not be localized; its note is ``notes`` and then the
        failed scans' errors."""
        counts = {flag: sum(flag in status_flags(status) for status in statuses) for flag in FLAGS}
        return cls(
            participant=participant,
            href=href,
            worst_status=STATUS_FAILED if failed else worst_status(statuses),
            num_flagged=sum(status != STATUS_OK for status in statuses),
            num_landmarks=len(statuses),
            flag_counts={flag: count for flag, count in counts.items() if count},
            scans=tuple(Path(path).name for path in scans) + tuple(Path(path).name for path, _ in failed),
            note="; ".join([*notes, *(f"{Path(path).name}: {error}" for path, error in failed)]),
        )

    @classmethod
    def from_dict(cls, entry: Mapping[str, object]) -> ReportEntry:
        """From a dict with the field names (``participant`` and ``href`` required)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(entry) - known)
        if unknown or "participant" not in entry or "href" not in entry:
            raise ValueError(
                f"a group report entry needs participant and href and may have {', '.join(sorted(known))}; "
                f"received keys {', '.join(sorted(map(str, entry)))}"
            )
        values = dict(entry)
        if "scans" in values:
            values["scans"] = tuple(values["scans"])  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]

    def sort_key(self) -> tuple:
        """Worst first: by status severity, then by number of flagged landmarks, then by participant id."""
        return (-SEVERITY[self.worst_status], -self.num_flagged, self.participant)
