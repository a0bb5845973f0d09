"""How bad a landmark's or a participant's QC status is, and one participant's line on the group page.

A landmark's status is ``ok`` or one or more flags joined by ``;``
(:meth:`mdgru_keras.prediction.ScanPrediction.statuses`); a participant with a scan that could not be localized
at all is ``failed``. Worst first: ``failed`` > ``outside_image`` > ``unstable`` > ``low_confidence`` > ``ok``
(:data:`SEVERITY`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from mdgru_keras.prediction import (
    MAX_FLIP_DISAGREEMENT_MM,
    MIN_CONFIDENCE,
    STATUS_LOW_CONFIDENCE,
    STATUS_OK,
    STATUS_OUTSIDE,
    STATUS_UNSTABLE,
)

if TYPE_CHECKING:
    from mdgru_keras.prediction import ScanPrediction

STATUS_FAILED = "failed"
SEVERITY: Mapping[str, int] = {
    STATUS_OK: 0,
    STATUS_LOW_CONFIDENCE: 1,
    STATUS_UNSTABLE: 2,
    STATUS_OUTSIDE: 3,
    STATUS_FAILED: 4,
}
FLAGS = (STATUS_OUTSIDE, STATUS_UNSTABLE, STATUS_LOW_CONFIDENCE)  # the landmark flags, worst first


def status_flags(status: str) -> list[str]:
    """The flags of a landmark status (``"low_confidence;unstable"`` -> both; ``"ok"`` -> none)."""
    flags = [flag for flag in status.split(";") if flag and flag != STATUS_OK]
    unknown = [flag for flag in flags if flag not in SEVERITY]
    if unknown:
        raise ValueError(f"unknown status {status!r}; expected ok or flags among {', '.join(SEVERITY)} joined by ';'")
    return flags


def worst_status(statuses: Iterable[str]) -> str:
    """The worst flag among statuses (each ``ok`` or flags joined by ``;``); ``ok`` when none is flagged."""
    flags = [flag for status in statuses for flag in status_flags(status)]
    return max(flags, key=SEVERITY.__getitem__, default=STATUS_OK)


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
        min_confidence: float = MIN_CONFIDENCE,
        max_disagreement_mm: float = MAX_FLIP_DISAGREEMENT_MM,
    ) -> ReportEntry:
        """The entry of a participant's predictions (and its scans that failed, as ``(file, error)`` pairs),
        with the thresholds its page used."""
        statuses = [
            status
            for prediction in predictions
            for status in prediction.statuses(min_confidence, max_disagreement_mm)
        ]
        counts = {flag: sum(flag in status_flags(status) for status in statuses) for flag in FLAGS}
        return cls(
            participant=participant,
            href=href,
            worst_status=STATUS_FAILED if failed else worst_status(statuses),
            num_flagged=sum(status != STATUS_OK for status in statuses),
            num_landmarks=len(statuses),
            flag_counts={flag: count for flag, count in counts.items() if count},
            scans=tuple(Path(p.path).name for p in predictions) + tuple(Path(path).name for path, _ in failed),
            note="; ".join(f"{Path(path).name}: {error}" for path, error in failed),
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
