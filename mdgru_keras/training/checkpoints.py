"""Step checkpoints that are written atomically, validated before use, and pruned to the last K plus the best.

Layout of ``RUN/checkpoints/``::

    ckpt-000000120/            one checkpoint (a complete directory or nothing)
        ckpt.index             tf.train.Checkpoint files (model, optimizer, step, data iterator, ...)
        ckpt.data-00000-of-00001
        manifest.json          written last: step, epoch, validation error, size and SHA-256 of each file
    best.json                  {"step": ..., "validation_error_mm": ...}: the best checkpoint by validation error

A checkpoint is first written to a hidden temporary directory next to its final place and then renamed, so a
run killed at any moment leaves either a whole checkpoint or an ignored ``.tmp-*`` directory. Before a
checkpoint is restored its manifest, file sizes, hashes and the TensorFlow index are checked; a checkpoint that
fails any check is skipped (with a warning) and the previous one is used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path

import tensorflow as tf

from mdgru_keras.io.atomic import fsync_directory, fsync_file, write_text_atomic

PREFIX = "ckpt"
MANIFEST = "manifest.json"
BEST = "best.json"
_NAME = re.compile(r"^ckpt-(\d{9})$")


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint on disk."""

    path: Path  # the checkpoint directory
    step: int
    epoch: float
    validation_error_mm: float | None = None

    @property
    def prefix(self) -> str:
        """The tf.train.Checkpoint prefix inside the directory (what ``Checkpoint.read`` wants)."""
        return str(self.path / PREFIX)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CheckpointStore:
    """Atomic, validated checkpoints of one ``tf.train.Checkpoint`` in ``directory``.

    Args:
        directory: where the checkpoints live (created when missing).
        checkpoint: the object graph to save and restore (model, optimizer, counters, data iterator).
        keep: how many of the newest checkpoints to keep; the best one by validation error is kept as well.
        is_chief: only the chief writes into ``directory``; other workers of a multi-worker run write the same
            checkpoint to a private temporary directory (all workers must take part in saving) and delete it.
        worker_id: names the private directory of a non-chief worker.
    """

    def __init__(
        self,
        directory: str | Path,
        checkpoint: tf.train.Checkpoint,
        keep: int = 3,
        is_chief: bool = True,
        worker_id: int = 0,
    ) -> None:
        self.directory = Path(directory)
        self.checkpoint = checkpoint
        self.keep = max(1, int(keep))
        self.is_chief = is_chief
        self.worker_id = worker_id
        self.directory.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ listing and validation
    def all(self) -> list[CheckpointInfo]:
        """Complete-looking checkpoints (a manifest that parses), oldest first; not yet hash-checked."""
        found = []
        for entry in self.directory.iterdir():
            match = _NAME.match(entry.name)
            if not match or not entry.is_dir():
                continue
            info = self._read_manifest(entry)
            if info is not None:
                found.append(info)
        return sorted(found, key=lambda info: info.step)

    def _read_manifest(self, path: Path) -> CheckpointInfo | None:
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
            return CheckpointInfo(
                path=path,
                step=int(manifest["step"]),
                epoch=float(manifest["epoch"]),
                validation_error_mm=manifest.get("validation_error_mm"),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def problem(self, info: CheckpointInfo) -> str | None:
        """Why ``info`` cannot be restored, or None when every check passes."""
        try:
            manifest = json.loads((info.path / MANIFEST).read_text(encoding="utf-8"))
            files = manifest["files"]
        except (OSError, ValueError, KeyError) as error:
            return f"unreadable manifest ({error})"
        if not any(name.endswith(".index") for name in files):
            return "manifest lists no checkpoint index"
        for name, expected in files.items():
            path = info.path / name
            if not path.is_file():
                return f"missing file {name}"
            if path.stat().st_size != expected["size"]:
                return f"{name} has {path.stat().st_size} bytes, the manifest says {expected['size']}"
            if _sha256(path) != expected["sha256"]:
                return f"{name} does not match its SHA-256 in the manifest"
        try:
            tf.train.load_checkpoint(info.prefix)
        except (tf.errors.OpError, ValueError) as error:
            return f"TensorFlow cannot read it ({str(error).splitlines()[0]})"
        return None

    def latest_valid(self) -> CheckpointInfo | None:
        """The newest checkpoint that passes :meth:`problem`; broken newer ones are reported and skipped."""
        for info in reversed(self.all()):
            problem = self.problem(info)
            if problem is None:
                return info
            warnings.warn(f"{info.path}: skipping a damaged checkpoint: {problem}", stacklevel=2)
        return None

    # ------------------------------------------------------------------ save and restore
    def save(self, step: int, epoch: float, validation_error_mm: float | None = None) -> CheckpointInfo:
        """Write the checkpoint for ``step`` atomically; prune old ones; update ``best.json``."""
        final = self.directory / f"{PREFIX}-{step:09d}"
        if not self.is_chief:
            scratch = self.directory.parent / f".worker-{self.worker_id}-checkpoint"
            shutil.rmtree(scratch, ignore_errors=True)
            self.checkpoint.write(str(scratch / PREFIX))
            shutil.rmtree(scratch, ignore_errors=True)
            return CheckpointInfo(final, step, epoch, validation_error_mm)
        tmp = self.directory / f".tmp-{PREFIX}-{step:09d}-{uuid.uuid4().hex[:8]}"
        self.checkpoint.write(str(tmp / PREFIX))
        files = {}
        for path in sorted(tmp.iterdir()):
            fsync_file(path)
            files[path.name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
        manifest = {
            "step": int(step),
            "epoch": float(epoch),
            "validation_error_mm": None if validation_error_mm is None else float(validation_error_mm),
            "files": files,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2), durable=True)
        if final.exists():  # the same step saved again (e.g. the end of an epoch that is also a step interval)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_directory(self.directory)
        info = CheckpointInfo(final, step, epoch, validation_error_mm)
        if validation_error_mm is not None:
            best = self.best()
            if best is None or validation_error_mm < best[1]:
                write_text_atomic(
                    self.directory / BEST,
                    json.dumps({"step": int(step), "validation_error_mm": float(validation_error_mm)}),
                    durable=True,
                )
        self._prune()
        return info

    def restore(self, info: CheckpointInfo) -> None:
        """Restore everything in the checkpoint graph from ``info`` (all tracked objects must match)."""
        self.checkpoint.read(info.prefix).assert_consumed()

    def best(self) -> tuple[int, float] | None:
        """``(step, validation_error_mm)`` of the best checkpoint so far, or None."""
        try:
            data = json.loads((self.directory / BEST).read_text(encoding="utf-8"))
            return int(data["step"]), float(data["validation_error_mm"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def best_info(self) -> CheckpointInfo | None:
        best = self.best()
        if best is None:
            return None
        for info in self.all():
            if info.step == best[0]:
                return info
        return None

    def _prune(self) -> None:
        """Keep the newest ``keep`` checkpoints and the best; remove the rest and stale temporary directories."""
        infos = self.all()
        best = self.best()
        keep_steps = {info.step for info in infos[-self.keep :]}
        if best is not None:
            keep_steps.add(best[0])
        for info in infos:
            if info.step not in keep_steps:
                shutil.rmtree(info.path, ignore_errors=True)
        for entry in self.directory.iterdir():
            if entry.name.startswith(".tmp-"):
                shutil.rmtree(entry, ignore_errors=True)
        # Directories without a readable manifest are interrupted or damaged saves that the rename made
        # visible before this process could finish (not possible with os.replace, but a copy may do it).
        for entry in self.directory.iterdir():
            if _NAME.match(entry.name) and entry.is_dir() and self._read_manifest(entry) is None:
                shutil.rmtree(entry, ignore_errors=True)

    def set_aside_after(self, step: int) -> None:
        """Rename checkpoints newer than ``step`` to ``.damaged-*`` (they failed validation) and recompute the best."""
        for info in self.all():
            if info.step > step:
                os.replace(info.path, self.directory / f".damaged-{info.path.name}-{uuid.uuid4().hex[:8]}")
        best = self.best()
        if best is not None and best[0] > step:
            scored = [info for info in self.all() if info.validation_error_mm is not None]
            if scored:
                winner = min(scored, key=lambda info: info.validation_error_mm)
                write_text_atomic(
                    self.directory / BEST,
                    json.dumps({"step": winner.step, "validation_error_mm": winner.validation_error_mm}),
                    durable=True,
                )
            else:
                (self.directory / BEST).unlink(missing_ok=True)
