"""The input of the BIDS app: a BIDS dataset's anatomical scans, found with pybids.

:func:`check_bids_dir` refuses a folder that is not a BIDS dataset with one :class:`InputError` naming it (no
``dataset_description.json``, one that is not JSON, or that lacks a field BIDS requires). :func:`find_scans`
indexes the dataset (``BIDSLayout(validate=False)``: a dataset with small deviations from the standard is still
read) and returns every ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]`` (and ``_T2w`` when asked) of the selected
participants and sessions as :class:`BidsScan` objects, sorted by path; pybids' default ignores apply
(``derivatives/``, ``sourcedata/``, ``code/``, hidden files), so an OUTPUT_DIR in ``BIDS_DIR/derivatives/`` is
never read back as input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mdgru_keras.errors import InputError, one_line

SUFFIXES = ("T1w", "T2w")  # the scans the model localizes in (docs/MODEL_CARD.md)
NIFTI_EXTENSIONS = (".nii", ".nii.gz")
DESCRIPTION_FILE = "dataset_description.json"
REQUIRED_FIELDS = ("Name", "BIDSVersion")  # what BIDS requires of dataset_description.json
LABEL = re.compile(r"[A-Za-z0-9]+")  # a BIDS label: letters and digits only


@dataclass(frozen=True)
class BidsScan:
    """One anatomical scan of the dataset.

    ``path``: BIDS_DIR (as given) / ``relpath``; ``relpath``: the path below BIDS_DIR with ``/``; ``subject``
    and ``session``: labels without ``sub-`` and ``ses-`` (``session`` None in a dataset without sessions);
    ``suffix``: ``T1w`` or ``T2w``; ``entities``: the ``key-value`` pairs of the file name in order, ``sub``
    (and ``ses``) first, e.g.
    ``(("sub", "01"), ("ses", "2"), ("acq", "mprage"), ("run", "1"))``.
    """

    path: Path
    relpath: str
    subject: str
    session: str | None
    suffix: str
    entities: tuple[tuple[str, str], ...]

    @property
    def participant_id(self) -> str:
        return f"sub-{self.subject}"

    @property
    def session_id(self) -> str | None:
        return None if self.session is None else f"ses-{self.session}"


@dataclass(frozen=True)
class Selection:
    """The scans of a query, and the selected participants that have none of the asked suffixes."""

    scans: tuple[BidsScan, ...]
    without_scans: tuple[str, ...]  # participant labels


def parse_label(value: str, prefix: str) -> str:
    """A participant or session label as given on the command line (``01`` or ``sub-01``) -> ``01``.

    Raises ``ValueError`` with a one-line message for anything that is not a BIDS label."""
    label = value.strip()
    label = label[len(prefix):] if label.startswith(prefix) else label
    if not LABEL.fullmatch(label):
        raise ValueError(f"{value!r} is not a BIDS label (letters and digits, optionally after {prefix!r})")
    return label


def read_json(path: Path) -> object:
    """A JSON file's content (a ``dataset_description.json``, a BOM allowed), or an :class:`InputError` in one
    line naming the file and why it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise InputError(path, f"not valid JSON (line {error.lineno}: {error.msg})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(path, f"cannot read it ({type(error).__name__}: {error})") from None


def check_bids_dir(bids_dir: str | Path) -> dict:
    """The dataset description of ``bids_dir``, or an :class:`InputError` in one line saying why it is not a
    BIDS dataset."""
    bids_dir = Path(bids_dir)
    if not bids_dir.exists():
        raise InputError(bids_dir, "no such folder")
    if not bids_dir.is_dir():
        raise InputError(bids_dir, "not a folder; BIDS_DIR is the top folder of a BIDS dataset")
    description_path = bids_dir / DESCRIPTION_FILE
    if not description_path.is_file():
        raise InputError(
            bids_dir,
            f"not a BIDS dataset: no {DESCRIPTION_FILE} (BIDS_DIR is the dataset's top folder, which holds "
            f"{DESCRIPTION_FILE} and the sub-* folders)",
        )
    description = read_json(description_path)
    if not isinstance(description, dict):
        raise InputError(description_path, "not a JSON object")
    missing = [field for field in REQUIRED_FIELDS if field not in description]
    if missing:
        raise InputError(
            description_path,
            f"lacks {' and '.join(missing)}, which BIDS requires (e.g. "
            '{"Name": "My study", "BIDSVersion": "1.10.0"})',
        )
    return description


def _name_entities(path: Path) -> list[tuple[str, str]]:
    """The ``key-value`` pairs of a BIDS file name, in order (the suffix and the extension left out)."""
    stem = path.name.split(".", 1)[0]
    return [tuple(token.split("-", 1)) for token in stem.split("_")[:-1] if "-" in token]


def _known(what: str, labels: Sequence[str]) -> str:
    shown = ", ".join(labels[:20]) + (f", ... ({len(labels) - 20} more)" if len(labels) > 20 else "")
    return f"the dataset has {len(labels)} {what}{'s' if len(labels) != 1 else ''}: {shown}" if labels else (
        f"the dataset has no {what}s"
    )


def _index(bids_dir: Path):
    from bids import BIDSLayout

    try:
        return BIDSLayout(str(bids_dir), validate=False)
    except Exception as error:  # noqa: BLE001 - pybids raises many kinds for unreadable datasets
        problem = f"cannot index the BIDS dataset ({type(error).__name__}: {one_line(error)})"
        raise InputError(bids_dir, problem) from None


def find_scans(
    bids_dir: str | Path,
    participants: Sequence[str] = (),
    sessions: Sequence[str] = (),
    suffixes: Sequence[str] = ("T1w",),
) -> Selection:
    """The anatomical ``suffixes`` scans (NIfTI) of ``participants`` (default: all) in ``sessions`` (default:
    all, and scans outside sessions), sorted by path.

    ``bids_dir`` is checked first (:func:`check_bids_dir`). A participant or session label the dataset does not
    have is an :class:`InputError` naming the dataset and listing the labels it has; so is a selection without
    any scan.
    """
    bids_dir = Path(bids_dir)
    check_bids_dir(bids_dir)
    unknown_suffixes = [suffix for suffix in suffixes if suffix not in SUFFIXES]
    if unknown_suffixes:
        raise ValueError(f"unknown suffixes {unknown_suffixes}; expected some of {SUFFIXES}")
    layout = _index(bids_dir)
    known_subjects = sorted(layout.get_subjects())
    if not known_subjects:
        raise InputError(bids_dir, "no participants: no sub-* folder with BIDS files")
    unknown = [label for label in participants if label not in known_subjects]
    if unknown:
        raise InputError(
            bids_dir,
            f"no participant {', '.join(f'sub-{label}' for label in unknown)} "
            f"({_known('participant', [f'sub-{label}' for label in known_subjects])})",
        )
    if sessions:
        known_sessions = sorted(layout.get_sessions())
        unknown = [label for label in sessions if label not in known_sessions]
        if unknown:
            raise InputError(
                bids_dir,
                f"no session {', '.join(f'ses-{label}' for label in unknown)} "
                f"({_known('session', [f'ses-{label}' for label in known_sessions])})",
            )
    selected = list(dict.fromkeys(participants)) or known_subjects
    query = {
        "subject": selected,
        "datatype": "anat",
        "suffix": list(suffixes),
        "extension": list(NIFTI_EXTENSIONS),
        "return_type": "object",
    }
    if sessions:
        query["session"] = list(sessions)
    scans = []
    for found in layout.get(**query):
        relpath = Path(found.path).relative_to(Path(layout.root)).as_posix()
        path = bids_dir / relpath  # as BIDS_DIR was given (relative or not), for the messages
        entities = found.get_entities()
        subject, session = str(entities["subject"]), entities.get("session")
        session = None if session is None else str(session)
        name_entities = [(key, value) for key, value in _name_entities(path) if key not in ("sub", "ses")]
        leading = [("sub", subject)] + ([("ses", session)] if session is not None else [])
        scans.append(
            BidsScan(
                path=path,
                relpath=relpath,
                subject=subject,
                session=session,
                suffix=str(entities["suffix"]),
                entities=tuple(leading + name_entities),
            )
        )
    scans.sort(key=lambda scan: scan.relpath)
    if not scans:
        where = f" in {', '.join(f'ses-{label}' for label in sessions)}" if sessions else ""
        raise InputError(
            bids_dir,
            f"no {' or '.join(suffixes)} image (sub-*/[ses-*/]anat/*_{suffixes[0]}.nii[.gz]) for "
            f"{'the selected participants' if participants else 'any participant'}{where}",
        )
    with_scans = {scan.subject for scan in scans}
    return Selection(tuple(scans), tuple(label for label in selected if label not in with_scans))
