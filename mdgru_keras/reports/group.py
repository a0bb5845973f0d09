"""The group page: every participant on one line, worst first, linking to its page, so that a rater reviews the
doubtful ones first; and the facts about the model that the pages show."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from mdgru_keras.io.atomic import write_text_atomic
from mdgru_keras.prediction import per_scan_paths
from mdgru_keras.reports import _html
from mdgru_keras.reports._html import esc
from mdgru_keras.reports.status import FLAGS, ReportEntry

if TYPE_CHECKING:
    from mdgru_keras.prediction import QualityThresholds
    from mdgru_keras.serving import LocalizationClient

GROUP_PAGE = "index.html"


def group_report(
    out_html: str | Path,
    entries: Sequence[ReportEntry | Mapping[str, object]],
    *,
    title: str = "Landmark QC",
    model_info: Mapping[str, object] | None = None,
    thresholds: QualityThresholds | None = None,
    generated: datetime.datetime | None = None,
) -> Path:
    """Write the group page (HTML, atomically): one row per participant, sorted worst first
    (:meth:`ReportEntry.sort_key`: by :data:`mdgru_keras.prediction.SEVERITY`, ``failed`` first, then more flagged
    landmarks first, then by id), each linking to its page. Returns ``out_html``.

    ``entries``: :class:`ReportEntry` objects (e.g. :meth:`ReportEntry.from_predictions`) or dicts with their
    fields. ``model_info``, the ``thresholds`` (when given) and ``generated`` (default: now) are shown in the
    header. Links are written relative (percent-encoded); the pages themselves are not checked.
    """
    entries = sorted(
        (entry if isinstance(entry, ReportEntry) else ReportEntry.from_dict(entry) for entry in entries),
        key=ReportEntry.sort_key,
    )
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry.worst_status] = counts.get(entry.worst_status, 0) + 1
    header_facts = [
        ("participants", f"{len(entries)}: " + (", ".join(f"{n} {status}" for status, n in counts.items()) or "none")),
        *_html.model_facts(model_info),
        ("thresholds", thresholds.describe() if thresholds is not None else None),
        ("generated", _html.timestamp(generated)),
    ]
    header_facts = [(name, value) for name, value in header_facts if value is not None]
    rows = []
    for rank, entry in enumerate(entries, start=1):
        name = esc(entry.participant)
        link = f'<a href="{esc(quote(entry.href, safe="/"))}">{name}</a>' if entry.href is not None else name
        rows.append(
            f'<tr class="{_html.row_classes(entry.worst_status)}"><td>{rank}</td><td class="name">{link}</td>'
            f'<td class="text">{_html.badge(entry.worst_status)}</td>'
            + (f"<td>{entry.num_flagged} of {entry.num_landmarks}</td>" if entry.num_landmarks else "<td>&ndash;</td>")
            + "".join(f"<td>{entry.flag_counts.get(flag, 0)}</td>" for flag in FLAGS)
            + f'<td class="text file">{esc(", ".join(entry.scans))}</td>'
            f'<td class="text note">{esc(entry.note)}</td></tr>'
        )
    table = (
        '<table class="group"><thead><tr><th>#</th><th class="name">participant</th><th class="name">worst</th>'
        "<th>flagged landmarks</th>" + "".join(f"<th>{esc(flag)}</th>" for flag in FLAGS)
        + '<th class="name">scans</th><th class="name">note</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )  # fmt: skip
    body = (
        f"<header><h1>{esc(title)}</h1>{_html.facts(header_facts)}"
        "<p>Participants worst first: review from the top. Each links to its page.</p></header>\n"
        f"<main>{table}</main>"
    )
    return write_text_atomic(out_html, _html.document(title, body))


def report_page_paths(images: Sequence[str | Path], directory: str | Path) -> list[Path]:
    """One page per scan in ``directory``, named after the scan (``SCAN.html``; ``-2``, ``-3``... for repeated
    names), never :data:`GROUP_PAGE` (a scan named ``index`` gets ``index-2.html``)."""
    return per_scan_paths([GROUP_PAGE, *images], Path(directory), ".html")[1:]


def model_info_for_report(client: LocalizationClient, model_name: str | None = None) -> dict[str, object]:
    """The facts about a client's model that the pages show: where it is (``model``: the SavedModel folder or
    the server's address), ``name`` (default for a model loaded here: its folder's name) and ``version`` (when
    known), and the export's ``created_by`` and
    ``created_at`` (a model loaded here, from its ``model_info.json``)."""
    info: dict[str, object] = {"model": str(client.server)}
    servable = getattr(client, "servable", None)
    if model_name is None and servable is not None:
        model_name = servable.version_dir.parent.name  # BASE/NAME/VERSION
    if model_name is not None:
        info["name"] = model_name
    if servable is not None:
        from mdgru_keras.export import read_model_info

        info["version"] = servable.version
        exported = read_model_info(servable.version_dir)
        info.update({key: exported[key] for key in ("created_by", "created_at") if key in exported})
    return info
