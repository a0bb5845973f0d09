"""Demo data: the MNI ICBM 2009c template (T1w, T2w) with the 32 AFIDs ground-truth landmarks.

The files come from the ``autoafids`` 0.1.4 wheel on PyPI (MIT licence), fetched with pip itself
(``pip download --no-deps --only-binary :all: autoafids==0.1.4``), checked against a pinned SHA-256, and
extracted next to the wheel's licence and the template's attribution. A second run finds the files (by their
pinned hashes) and downloads nothing. Every file is written through a temporary file and ``os.replace``.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from mdgru_keras.errors import InputError
from mdgru_keras.io.atomic import atomic_path, write_text_atomic

AUTOAFIDS_VERSION = "0.1.4"
WHEEL_NAME = f"autoafids-{AUTOAFIDS_VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "f949e0e1b01a01de122cd23fc8457444d455e50a7482cf4b2440f505778fcdbc"
WHEEL_SIZE_MB = 27

T1W_NAME = "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"
T2W_NAME = "tpl-MNI152NLin2009cAsym_res-01_T2w.nii.gz"
LANDMARKS_NAME = "tpl-MNI152NLin2009cAsym_res-01_desc-groundtruth_afids.fcsv"
LICENCE_NAME = "LICENSE-autoafids.txt"
ATTRIBUTION_NAME = "ATTRIBUTION.md"
NAMED_LANDMARKS_NAME = "afids.fcsv"

# The AFIDs protocol's short names for fiducials 1..32 (Lau et al. 2019). The ground-truth file labels them
# "1".."32" with the long name in its description column; `afids.fcsv` carries these names as labels, so
# `--landmarks PMJ` works everywhere. The long descriptions are kept.
AFID_NAMES: tuple[str, ...] = (
    "AC", "PC", "ICS", "PMJ", "SIPF", "RSLMS", "LSLMS", "RILMS", "LILMS", "CUL", "IMS", "RMB", "LMB", "PG",
    "RLVAC", "LLVAC", "RLVPC", "LLVPC", "GENU", "SPLE", "RALTH", "LALTH", "RSAMTH", "LSAMTH", "RIAMTH", "LIAMTH",
    "RIGO", "LIGO", "RVOH", "LVOH", "ROSF", "LOSF",
)  # fmt: skip

# output file name -> (member of the wheel, sha256 of its content)
DEMO_FILES: dict[str, tuple[str, str]] = {
    T1W_NAME: (
        f"autoafids/resources/{T1W_NAME}",
        "1f27aabea9f7183dc0c69dafa71e1787b921ca778d655d9c1bf302b273d5627a",
    ),
    T2W_NAME: (
        f"autoafids/resources/{T2W_NAME}",
        "6e39951e4478ff041f1290d31935dc05aa5425f9fd3f20ed57d4646f0d5be0ff",
    ),
    LANDMARKS_NAME: (
        f"autoafids/resources/{LANDMARKS_NAME}",
        "8290b044e4198acf732700473db113985784cc6f0205534d88a38422fb94d4c0",
    ),
    LICENCE_NAME: (
        f"autoafids-{AUTOAFIDS_VERSION}.dist-info/LICENSE",
        "f7845a96a96dfeb9be9f9087105c4fe0665a2f48d09f5482b1dad88c4b8a6075",
    ),
}

ATTRIBUTION = f"""\
# Demo data: sources, licences and attribution

Extracted by `mdgru-localize demo-data` from the Python wheel `{WHEEL_NAME}`
(https://pypi.org/project/autoafids/{AUTOAFIDS_VERSION}/, SHA-256 `{WHEEL_SHA256}`).

- `{T1W_NAME}`: the MNI ICBM 152 2009c nonlinear asymmetric template, T1-weighted, 1 mm, 193x229x193, RAS.
- `{T2W_NAME}`: the same template, T2-weighted.
- `{LANDMARKS_NAME}`: the 32 anatomical fiducials (AFIDs) placed on the
  template, a 3D Slicer markups file in RAS mm. The `label` column holds the AFID number (`1` = AC, `2` = PC,
  `4` = PMJ, ...), the `desc` column its name.
- `{LICENCE_NAME}`: the MIT licence of the autoafids package, copied from the wheel.

## autoafids (MIT licence)

Copyright (c) 2024 AFIDs; the full licence text is in `{LICENCE_NAME}`.
AFIDs protocol: Lau J. C. et al., "A framework for evaluating correspondence between brain images using
anatomical fiducials", Human Brain Mapping 40(14):4163-4179, 2019; Taha A. et al., "Magnetic resonance
imaging datasets with anatomical fiducials for quality control and registration", Scientific Data 10:449, 2023.

## MNI ICBM 152 2009c nonlinear asymmetric template

V. S. Fonov, A. C. Evans, R. C. McKinstry, C. R. Almli and D. L. Collins, "Unbiased nonlinear average
age-appropriate brain templates from birth to adulthood", NeuroImage 47, Supplement 1, S102, 2009
(Organization for Human Brain Mapping 2009 Annual Meeting).
V. S. Fonov, A. C. Evans, K. Botteron, C. R. Almli, R. C. McKinstry, D. L. Collins and BDCG, "Unbiased average
age-appropriate atlases for pediatric studies", NeuroImage 54(1):313-327, 2011.

Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute,
McGill University. Permission to use, copy, modify, and distribute this software and its documentation for
any purpose and without fee is hereby granted, provided that the above copyright notice appear in all
copies. The authors and McGill University make no representations about the suitability of this software
for any purpose. It is provided "as is" without express or implied warranty. The authors are not
responsible for any data loss, equipment damage, property loss, or injury to subjects or patients
resulting from the use or misuse of this software package.
"""


class DownloadError(RuntimeError):
    """pip could not fetch the autoafids wheel (offline, proxy, index problems); the message says why."""


@dataclass(frozen=True)
class DemoData:
    """Paths of the extracted demo files; ``downloaded`` is False when they were already there."""

    directory: Path
    t1w: Path
    t2w: Path
    landmarks: Path
    licence: Path
    attribution: Path
    downloaded: bool

    @property
    def named_landmarks(self) -> Path:
        """The 32 AFIDs labelled with the protocol's short names (AC, PC, ..., PMJ, ...)."""
        return self.directory / NAMED_LANDMARKS_NAME


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _paths(directory: Path, downloaded: bool) -> DemoData:
    return DemoData(
        directory=directory,
        t1w=directory / T1W_NAME,
        t2w=directory / T2W_NAME,
        landmarks=directory / LANDMARKS_NAME,
        licence=directory / LICENCE_NAME,
        attribution=directory / ATTRIBUTION_NAME,
        downloaded=downloaded,
    )


def is_cached(directory: str | Path, files: Mapping[str, tuple[str, str]] = DEMO_FILES) -> bool:
    """True when every demo file is in ``directory`` with its pinned hash, and the attribution is there."""
    directory = Path(directory)
    if not (directory / ATTRIBUTION_NAME).is_file():
        return False
    return all((directory / name).is_file() and sha256_of(directory / name) == sha for name, (_, sha) in files.items())


def download_wheel(directory: str | Path) -> Path:
    """Fetch the pinned autoafids wheel into ``directory`` with pip (honours pip's own config: index, proxy)."""
    directory = Path(directory)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "-d",
        str(directory),
        f"autoafids=={AUTOAFIDS_VERSION}",
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    except subprocess.TimeoutExpired:
        raise DownloadError(f"pip download of autoafids {AUTOAFIDS_VERSION} timed out after 900 s") from None
    wheel = directory / WHEEL_NAME
    if result.returncode != 0 or not wheel.is_file():
        said = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        reason = said[-1] if said else f"exit status {result.returncode}"
        raise DownloadError(
            f"could not download autoafids {AUTOAFIDS_VERSION} from PyPI ({reason}); "
            f"fetch {WHEEL_NAME} elsewhere and pass it with --wheel"
        )
    return wheel


def extract_demo_data(
    wheel: str | Path,
    directory: str | Path,
    *,
    wheel_sha256: str = WHEEL_SHA256,
    files: Mapping[str, tuple[str, str]] = DEMO_FILES,
) -> DemoData:
    """Check ``wheel`` against ``wheel_sha256`` and extract ``files`` (name -> (member, sha256)) into
    ``directory`` with the attribution. Nothing is replaced unless the wheel and every member check out.
    """
    wheel = Path(wheel)
    directory = Path(directory)
    if not wheel.is_file():
        raise InputError(wheel, "no such file")
    actual = sha256_of(wheel)
    if actual != wheel_sha256:
        raise InputError(wheel, f"SHA-256 {actual} does not match the pinned {wheel_sha256}; not extracting")
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as error:
        raise InputError(wheel, f"not a wheel (zip) file: {error}") from None
    # All files are staged and checked first; only then does the ExitStack move them into place together.
    with archive, ExitStack() as staged:
        members = set(archive.namelist())
        for name, (member, sha) in tqdm(files.items(), desc="extracting demo data", unit="file", leave=False):
            if member not in members:
                raise InputError(wheel, f"lacks the member {member}")
            temporary = staged.enter_context(atomic_path(directory / name))
            digest = hashlib.sha256()
            with open(temporary, "wb") as out, archive.open(member) as source:
                for block in iter(lambda: source.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
            if digest.hexdigest() != sha:
                raise InputError(wheel, f"member {member} has SHA-256 {digest.hexdigest()}, expected {sha}")
    write_text_atomic(directory / ATTRIBUTION_NAME, ATTRIBUTION)
    return _paths(directory, downloaded=True)


def fetch_demo_data(directory: str | Path, *, wheel: str | Path | None = None, force: bool = False) -> DemoData:
    """Make the demo files available in ``directory``: reuse them when present and intact (unless ``force``),
    else extract them from ``wheel`` (a local copy of the pinned wheel) or from a fresh pip download.
    """
    directory = Path(directory)
    if not force and is_cached(directory):
        demo = _paths(directory, downloaded=False)
    elif wheel is not None:
        demo = extract_demo_data(wheel, directory)
    else:
        with tempfile.TemporaryDirectory(prefix="autoafids-") as download_dir:
            print(f"Downloading {WHEEL_NAME} ({WHEEL_SIZE_MB} MB) from PyPI with pip ...", file=sys.stderr)
            demo = extract_demo_data(download_wheel(download_dir), directory)
    write_named_afids(demo.landmarks, demo.named_landmarks)
    return demo


def write_named_afids(ground_truth_fcsv: str | Path, out_path: str | Path) -> Path:
    """Write the AFIDs of ``ground_truth_fcsv`` (labels "1".."32") relabelled with :data:`AFID_NAMES`."""
    from mdgru_keras.io.landmarks import read_landmarks, write_landmarks

    numbered = read_landmarks(ground_truth_fcsv)
    expected = [str(i) for i in range(1, len(AFID_NAMES) + 1)]
    if list(numbered) != expected:
        raise InputError(ground_truth_fcsv, f"expected the 32 AFIDs labelled 1..32, found {', '.join(numbered)}")
    named = {name: numbered[number] for name, number in zip(AFID_NAMES, expected, strict=True)}
    return write_landmarks(out_path, named)
