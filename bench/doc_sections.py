"""The generated sections of the docs: the text between a benchmark's ``<!-- name:begin -->`` and
``<!-- name:end -->`` markers, rewritten by each run."""

from __future__ import annotations


def with_section(text: str, begin: str, end: str, body: str) -> str:
    """``text`` with what lies between the markers ``begin`` and ``end`` replaced by ``body`` (blank lines around
    it); the markers stay."""
    start, stop = text.index(begin) + len(begin), text.index(end)
    return text[:start] + "\n\n" + body + "\n\n" + text[stop:]
