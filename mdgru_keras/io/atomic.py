"""Atomic file writes: write to a temporary file in the target's directory, then ``os.replace`` it.

Readers never see a half-written file, and an interrupted write leaves the old file (or none) in place.
``durable=True`` also survives a crash of the machine (not only of the process): the file's data is flushed to
disk (``fsync``) before the rename and the folder's entry after it. That costs a disk flush per write; the
training run's checkpoints and run files use it, outputs that a rerun recreates do not.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _file_mode() -> int:
    """The mode a plainly created file gets (0o666 minus the umask); mkstemp's 0o600 would hide shared data."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _missing_folders(folder: Path, path: Path) -> list[Path]:
    """The folders that creating ``folder`` would make, deepest first; a regular file where a folder should be
    is a :class:`NotADirectoryError` naming ``path`` (the file the user asked for) and the file in the way."""
    missing = []
    for ancestor in (folder, *folder.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, f"cannot write here: {ancestor} is not a directory", str(path))
            break
        missing.append(ancestor)
    return missing


def _make_parent(path: Path) -> None:
    """Create ``path``'s folder; a regular file where a folder should be is named as such."""
    _missing_folders(path.parent, path)
    path.parent.mkdir(parents=True, exist_ok=True)


def check_writable(path: str | Path, *, directory: bool = False) -> None:
    """Fail now if ``path`` (a file; ``directory=True``: a folder to write files into) cannot be written.

    For commands that write their results at the end of long work: the user learns in one line, before the
    work, that the output cannot go there. Creates the missing folders, writes and removes a temporary file in
    the target's folder, and removes the folders it made, so nothing is left behind. Raises an
    :class:`OSError` that names ``path``: :class:`NotADirectoryError` for a regular file where a folder should
    be, :class:`IsADirectoryError` for a file target that is a folder, else the error of the test write (e.g.
    :class:`PermissionError`). Passing is no promise (the disk may still fill up), only an early answer.
    """
    path = Path(path)
    folder = path if directory else path.parent
    if not directory and path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if directory and path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"cannot write here: {path} is not a directory", str(path))
    made = _missing_folders(folder, path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".write-test", dir=folder)
        os.close(handle)
        os.unlink(name)
    except OSError as error:
        if error.errno is None:
            raise
        raise OSError(error.errno, f"cannot write in {folder}: {error.strerror}", str(path)) from None
    finally:
        for made_folder in made:  # deepest first; a folder someone else filled meanwhile stays
            try:
                made_folder.rmdir()
            except OSError:
                break


def fsync_directory(path: str | Path) -> None:
    """Flush ``path``'s entries (a rename or a new file in it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """Flush the data of the file at ``path`` to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _about(error: OSError, path: Path) -> OSError:
    """``error`` naming ``path`` instead of the temporary file (which the user never asked for)."""
    if error.errno is None:
        return error
    return OSError(error.errno, error.strerror, str(path))  # OSError picks the subclass from errno


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp", *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on error it is removed.

    ``suffix`` lets writers that look at the extension (e.g. ``.nii.gz``) see the right one. An
    :class:`OSError` from creating the temporary file or from moving it into place names ``path``.
    ``durable``: fsync the file before and its folder after the rename (module docstring).
    """
    path = Path(path)
    _make_parent(path)
    try:
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as error:
        raise _about(error, path) from None
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, _file_mode())
        if durable:
            fsync_file(temporary)
        try:
            os.replace(temporary, path)
        except OSError as error:  # e.g. IsADirectoryError: path is an existing folder
            raise _about(error, path) from None
        if durable:
            fsync_directory(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str, *, durable: bool = False) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically (``durable``: :func:`atomic_path`)."""
    with atomic_path(path, durable=durable) as temporary:
        temporary.write_text(text, encoding="utf-8", newline="")
    return Path(path)


def write_bytes_atomic(path: str | Path, data: bytes, *, durable: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (``durable``: :func:`atomic_path`)."""
    with atomic_path(path, durable=durable) as temporary:
        temporary.write_bytes(data)
    return Path(path)
