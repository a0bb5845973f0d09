"""What a training run reports: CSV logs, TensorBoard scalars, a progress bar and a line per epoch.

Files in the run directory (written by the chief only):

* ``steps.csv``: ``step, epoch, loss`` for every training step (the loss of the global batch);
* ``log.csv``: one row per validation: ``epoch, step, train_loss, val_loss, val_error_mm_mean,
  val_error_mm_median, val_error_mm_max, learning_rate, elapsed_s``;
* ``tensorboard/``: the same scalars as TensorBoard events (``train/loss`` per step, ``val/*`` per epoch).

On ``--resume`` rows newer than the restored step are dropped (:meth:`RunLog.truncate_after`), so a run that
was killed after logging but before its next checkpoint does not count those steps twice.
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import keras
import tensorflow as tf

from mdgru_keras.io.atomic import write_text_atomic

STEP_FIELDS = ("step", "epoch", "loss")
EPOCH_FIELDS = (
    "epoch",
    "step",
    "train_loss",
    "val_loss",
    "val_error_mm_mean",
    "val_error_mm_median",
    "val_error_mm_max",
    "learning_rate",
    "elapsed_s",
)


def _scalar(tag: str, value: float, step: int) -> None:
    """A TensorBoard scalar, written with TensorFlow's own summary op (no ``tensorboard`` package needed)."""
    tf.summary.write(tag, tf.constant(float(value), tf.float32), step=step, metadata=_SCALAR_METADATA)


# What tensorboard.summary.scalar attaches: marks the tensor for TensorBoard's scalars dashboard.
_SCALAR_METADATA = tf.compat.v1.SummaryMetadata(
    plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="scalars")
).SerializeToString()


def read_csv(path: str | Path) -> list[dict[str, float]]:
    """Rows of a numeric CSV log as dicts of floats (empty when the file is missing)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def _format(value: float) -> str:
    return repr(float(value))  # full precision: runs are compared step by step


def _format_field(field: str, value: float) -> str:
    """A log value as written: steps as integers (also after a resume rewrote the file), the rest in full."""
    return str(int(value)) if field == "step" else _format(value)


class RunLog:
    """Appends to the CSV logs and TensorBoard, shows a progress bar; silent on non-chief workers."""

    def __init__(self, run_dir: str | Path, steps_per_epoch: int, enabled: bool = True, verbose: int = 1) -> None:
        self.run_dir = Path(run_dir)
        self.steps_per_epoch = steps_per_epoch
        self.enabled = enabled
        self.verbose = verbose if enabled else 0
        self.steps_path = self.run_dir / "steps.csv"
        self.epochs_path = self.run_dir / "log.csv"
        self._writer = None
        self._steps_file = None
        self._progbar: keras.utils.Progbar | None = None
        self._progbar_epoch = -1

    def open(self) -> None:
        if not self.enabled:
            return
        self._writer = tf.summary.create_file_writer(str(self.run_dir / "tensorboard"))
        new = not self.steps_path.exists()
        self._steps_file = open(self.steps_path, "a", encoding="utf-8", newline="")
        if new:
            self._steps_file.write(",".join(STEP_FIELDS) + "\n")
        if not self.epochs_path.exists():
            write_text_atomic(self.epochs_path, ",".join(EPOCH_FIELDS) + "\n", durable=True)

    def close(self) -> None:
        if self._steps_file is not None:
            self._steps_file.close()
            self._steps_file = None
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
        self._progbar = None

    def truncate_after(self, step: int) -> None:
        """Drop log rows newer than ``step`` (rows written after the checkpoint that a resume starts from)."""
        if not self.enabled:
            return
        for path, fields in ((self.steps_path, STEP_FIELDS), (self.epochs_path, EPOCH_FIELDS)):
            rows = [row for row in read_csv(path) if row["step"] <= step]
            lines = [",".join(fields)] + [",".join(_format_field(f, row[f]) for f in fields) for row in rows]
            write_text_atomic(path, "\n".join(lines) + "\n", durable=True)

    def step(self, step: int, loss: float) -> None:
        """Record the loss of training step ``step`` (1-based: the number of steps done)."""
        if not self.enabled:
            return
        epoch = step / self.steps_per_epoch
        self._steps_file.write(f"{step},{_format(epoch)},{_format(loss)}\n")
        self._steps_file.flush()
        with self._writer.as_default():
            _scalar("train/loss", loss, step)
        if self.verbose:
            epoch_index = (step - 1) // self.steps_per_epoch
            if self._progbar is None or epoch_index != self._progbar_epoch:
                # A live bar on a terminal; in a log file (not a tty) one line at the end of each epoch.
                verbose = self.verbose if sys.stdout.isatty() else 2
                self._progbar = keras.utils.Progbar(
                    self.steps_per_epoch, verbose=verbose, stateful_metrics=["loss"], unit_name="step"
                )
                self._progbar_epoch = epoch_index
            done = step - epoch_index * self.steps_per_epoch
            self._progbar.update(done, values=[("loss", loss)])

    def epoch(self, row: dict[str, float], epochs: int) -> str:
        """Append a validation row (keys :data:`EPOCH_FIELDS`); print and return the one-line summary."""
        line = (
            f"epoch {row['epoch']:.2f}/{epochs} step {int(row['step'])}: loss {row['train_loss']:.4f}"
            f" val_loss {row['val_loss']:.4f} val_error_mm mean {row['val_error_mm_mean']:.2f}"
            f" median {row['val_error_mm_median']:.2f} max {row['val_error_mm_max']:.2f}"
            f" ({row['elapsed_s']:.0f} s)"
        )
        if not self.enabled:
            return line
        with open(self.epochs_path, "a", encoding="utf-8") as handle:
            handle.write(",".join(_format_field(field, row[field]) for field in EPOCH_FIELDS) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        step = int(row["step"])
        with self._writer.as_default():
            for key in ("val_loss", "val_error_mm_mean", "val_error_mm_median", "val_error_mm_max"):
                _scalar(f"val/{key.removeprefix('val_')}", row[key], step)
            _scalar("train/epoch_loss", row["train_loss"], step)
            _scalar("train/learning_rate", row["learning_rate"], step)
        self._writer.flush()
        if self.verbose:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        return line

    def message(self, text: str) -> None:
        if self.verbose:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

