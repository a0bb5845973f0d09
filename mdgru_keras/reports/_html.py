"""The pages' shared frame: escaping, the document skeleton with its style sheet, badges and the header's facts.

Every page is one self-contained HTML5 file: inline CSS, images as ``data:`` URIs, no script, and a
Content-Security-Policy that forbids loading anything else (a reference to the network would be refused by
the browser, not fetched). Every piece of text from outside (file names, landmark names, model facts) goes
through :func:`esc`.
"""

from __future__ import annotations

import datetime
import html
import json
from collections.abc import Iterable, Mapping

from mdgru_keras.reports.status import SEVERITY, status_flags
from mdgru_keras.version import package_version

CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STATUS_TEXT: Mapping[str, str] = {
    "ok": "no flag",
    "low_confidence": "confidence below the threshold",
    "unstable": "estimates in the scan and its mirror image disagree by more than the threshold",
    "coarse_fine_disagree": "the fine estimate lies farther from the coarse one than the threshold",
    "outside_image": "the point lies outside the image",
    "failed": "a scan could not be localized",
}
MAX_VALUE_CHARS = 300

STYLE = """
:root { --ok: #1b7f3b; --coarse_fine_disagree: #8a7400; --low_confidence: #9a6a00; --unstable: #c25100;
  --outside_image: #c62828; --failed: #6a1b9a; }
* { box-sizing: border-box; }
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1400px;
  padding: 0 16px 32px; color: #1d1d1f; background: #fafafa; }
h1 { font-size: 22px; margin: 18px 0 6px; } h2 { font-size: 18px; margin: 28px 0 8px; }
h3 { font-size: 15px; margin: 0 0 4px; }
.file { font-family: ui-monospace, Menlo, Consolas, monospace; overflow-wrap: anywhere; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 8px 0 12px; }
dl.meta dt { color: #555; } dl.meta dd { margin: 0; overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: 6px 0 14px; background: #fff; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #eee; } td.name, th.name, td.text { text-align: left; white-space: normal; }
td.file { overflow-wrap: normal; }
tr.flagged.low_confidence td { background: #fff6dc; } tr.flagged.unstable td { background: #ffe9d6; }
tr.flagged.coarse_fine_disagree td { background: #fbf8d8; }
tr.flagged.outside_image td, tr.flagged.failed td { background: #ffdede; }
.badge { display: inline-block; padding: 0 6px; border-radius: 8px; color: #fff; font-size: 12px;
  font-weight: 600; white-space: nowrap; }
.badge.ok { background: var(--ok); } .badge.low_confidence { background: var(--low_confidence); }
.badge.unstable { background: var(--unstable); } .badge.outside_image { background: var(--outside_image); }
.badge.failed { background: var(--failed); }
.badge.coarse_fine_disagree { background: var(--coarse_fine_disagree); }
.landmarks { display: flex; flex-wrap: wrap; gap: 12px; }
.landmark { background: #fff; border: 1px solid #ddd; border-left: 6px solid var(--ok); padding: 8px;
  width: min-content; }
.landmark.low_confidence { border-left-color: var(--low_confidence); }
.landmark.unstable { border-left-color: var(--unstable); }
.landmark.coarse_fine_disagree { border-left-color: var(--coarse_fine_disagree); }
.landmark.outside_image { border-left-color: var(--outside_image); }
.landmark:target { outline: 3px solid #1565c0; }
.values { margin: 0 0 6px; color: #333; font-size: 13px; }
.views { display: flex; gap: 6px; }
figure { margin: 0; } figcaption { font-size: 12px; color: #444; text-align: center; }
.frame { position: relative; line-height: 0; background: #000; }
.frame img { image-rendering: pixelated; display: block; }
.frame .o { position: absolute; color: #ff0; font: bold 12px/1 system-ui, sans-serif; text-shadow: 0 0 2px #000; }
.o.left { left: 3px; top: 50%; transform: translateY(-50%); }
.o.right { right: 3px; top: 50%; transform: translateY(-50%); }
.o.top { top: 3px; left: 50%; transform: translateX(-50%); }
.o.bottom { bottom: 3px; left: 50%; transform: translateX(-50%); }
.note { color: #6a1b9a; }
.legend { font-size: 13px; color: #333; }
body:has(#flagged-only:checked) .landmark.ok, body:has(#flagged-only:checked) tr.ok { display: none; }
footer { margin-top: 28px; color: #777; font-size: 12px; }
"""


def esc(text: object) -> str:
    """``text`` as HTML text or attribute value (``<``, ``>``, ``&`` and both quotes escaped)."""
    return html.escape(str(text), quote=True)


def timestamp(generated: datetime.datetime | None) -> str:
    """``generated`` (default: now) as ISO 8601 in UTC, to the second."""
    moment = generated if generated is not None else datetime.datetime.now(datetime.UTC)
    if moment.tzinfo is not None:
        moment = moment.astimezone(datetime.UTC)
    return moment.isoformat(timespec="seconds")


def badge(status: str) -> str:
    """A coloured badge per flag of a status (``ok``: one green badge); its tooltip says what the flag means."""
    flags = status_flags(status) or ["ok"]
    return " ".join(f'<span class="badge {flag}" title="{esc(STATUS_TEXT[flag])}">{esc(flag)}</span>' for flag in flags)


def row_classes(status: str) -> str:
    """CSS classes of a table row or figure for a status: ``ok``, or ``flagged`` plus its worst flag."""
    flags = status_flags(status)
    if not flags:
        return "ok"
    return f"flagged {max(flags, key=SEVERITY.__getitem__)}"


def value_text(value: object) -> str:
    """A model fact as one line: strings and numbers as they are, anything else as compact JSON; shortened."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."


def facts(items: Iterable[tuple[str, object]]) -> str:
    """A definition list of ``(name, value)`` facts, both escaped."""
    rows = "".join(f"<dt>{esc(name)}</dt><dd>{esc(value_text(value))}</dd>" for name, value in items)
    return f'<dl class="meta">{rows}</dl>'


def model_facts(model_info: Mapping[str, object] | None) -> list[tuple[str, object]]:
    return [(f"model {key}" if key != "model" else "model", value) for key, value in (model_info or {}).items()]


def document(title: str, body: str) -> str:
    """The whole page: ``title`` (escaped here) and ``body`` (HTML, already escaped by its makers)."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CONTENT_SECURITY_POLICY)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta name="generator" content="mdgru-keras {esc(package_version())}">\n'
        f"<title>{esc(title)}</title>\n"
        '<link rel="icon" href="data:,">\n'
        f"<style>{STYLE}</style>\n</head>\n<body>\n{body}\n"
        f"<footer>Made by mdgru-keras {esc(package_version())}. Self-contained: this file needs no network "
        "and no other file (links to other reports aside).</footer>\n</body>\n</html>\n"
    )
