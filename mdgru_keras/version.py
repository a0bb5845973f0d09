"""The installed mdgru-keras version, as every file the software writes records it (exports, datasets,
evaluations, BIDS derivatives, QC pages)."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "mdgru-keras"


def package_version() -> str:
    """The version of the installed distribution; ``unknown`` when running from a tree without its metadata."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"
