"""Pretrained models shipped inside the package, checked by SHA-256 before use.

A pretrained model is an exported SavedModel (``mdgru-localize export``) kept as package data in
``mdgru_keras/pretrained/NAME/``: ``saved_model/`` (one version's files) and ``manifest.json`` (the SHA-256 and
size of every file, the training recipe). ``make model-afids`` makes ``afids32`` (all 32 AFIDs; see
``docs/MODEL_CARD.md``) and installs it with :func:`install_pretrained`.

``pretrained_model_dir(name)`` returns the SavedModel folder after checking every file against the manifest,
so a damaged or half-copied install is refused in one line instead of giving wrong coordinates.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from mdgru_keras.errors import InputError

DEFAULT_MODEL = "afids32"
MANIFEST = "manifest.json"
SAVED_MODEL = "saved_model"
KNOWN = {DEFAULT_MODEL: "all 32 AFIDs (anatomical fiducials) on T1w/T2w head MRI, 1 mm (docs/MODEL_CARD.md)"}


def _package_dir() -> Path:
    return Path(str(resources.files(__name__)))


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _check_name(name: str, root: Path | None = None) -> Path:
    """The folder of pretrained model ``name`` under ``root`` (default: this package's folder)."""
    if name not in KNOWN:
        raise InputError(name, f"is not a pretrained model (known: {', '.join(sorted(KNOWN))})")
    return (Path(root) if root is not None else _package_dir()) / name


def is_installed(name: str = DEFAULT_MODEL, root: Path | None = None) -> bool:
    """Whether the package holds pretrained model ``name`` (files present; not yet checked)."""
    return (_check_name(name, root) / MANIFEST).is_file()


def read_manifest(name: str = DEFAULT_MODEL, root: Path | None = None) -> dict:
    path = _check_name(name, root) / MANIFEST
    if not path.is_file():
        raise InputError(
            path.parent, f"pretrained model {name!r} is not installed in this package; make it with `make model-afids`"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(path, f"unreadable pretrained-model manifest ({error})") from None


def pretrained_model_dir(name: str = DEFAULT_MODEL, root: Path | None = None) -> Path:
    """The SavedModel folder of pretrained model ``name``, every file checked against its manifest's SHA-256.

    ``root``: where the models lie (default: this package); for tests and unpacked copies.
    """
    manifest = read_manifest(name, root)
    folder = _check_name(name, root) / SAVED_MODEL
    for relative, expected in manifest["files"].items():
        path = folder / relative
        if not path.is_file():
            raise InputError(path, f"missing from pretrained model {name!r}; reinstall the package")
        if sha256_file(path) != expected["sha256"]:
            raise InputError(path, f"SHA-256 differs from the manifest of pretrained model {name!r}; reinstall")
    return folder


def install_pretrained(
    name: str, version_dir: str | Path, recipe: dict | None = None, root: Path | None = None
) -> Path:
    """Copy an exported SavedModel version folder into the package as pretrained model ``name``.

    The files and their manifest are written to a temporary folder beside the target and swapped in with
    ``os.replace``: the package holds the old model or the new one, never a mix. Returns the model's folder.
    """
    target = _check_name(name, root)
    source = Path(version_dir)
    if not (source / "saved_model.pb").is_file():
        raise InputError(source, "is not a SavedModel version folder (no saved_model.pb)")
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=target.parent))
    try:
        shutil.copytree(source, staging / SAVED_MODEL)
        files = {
            str(path.relative_to(staging / SAVED_MODEL)): {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            for path in sorted((staging / SAVED_MODEL).rglob("*"))
            if path.is_file()
        }
        manifest = {
            "name": name,
            "description": KNOWN[name],
            "installed_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "recipe": recipe or {},
            "files": files,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        (staging / "__init__.py").write_text("", encoding="utf-8")  # package data must sit in a package folder
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=target.parent))
            os.replace(target, old / name)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def copy_pretrained(
    name: str, base_dir: str | Path, model_name: str, version: int | None = None, root: Path | None = None
) -> Path:
    """Write pretrained model ``name`` (checked) as ``BASE/MODEL_NAME/VERSION/``, TF Serving's layout, in one
    atomic step; the default version is one more than the newest there. An existing version is never replaced."""
    source = pretrained_model_dir(name, root)
    model_dir = Path(base_dir) / model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    if version is None:
        numbers = [int(child.name) for child in model_dir.iterdir() if child.name.isdigit()]
        version = max(numbers, default=0) + 1
    target = model_dir / str(version)
    if target.exists():
        raise FileExistsError(f"{target}: version {version} exists already; choose another --version")
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.partial-", dir=model_dir))
    try:
        shutil.copytree(source, staging / "model")
        os.replace(staging / "model", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
