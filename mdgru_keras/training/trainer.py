"""The training loop: a custom ``strategy.run`` loop with exact step checkpoints and resumable data.

One epoch is ``steps_per_epoch`` steps of one global batch each (for the real stages: one random sample from
every training subject, times ``config.training.samples_per_subject``). After every epoch the model is
validated (loss and localization error in mm) and a checkpoint is written; checkpoints are also written every
``config.training.checkpoint_every_steps`` steps. A checkpoint holds every model variable (DropConnect seed
states included), the optimizer state and the step and loss counters; the training data are one fixed, seeded
sequence of samples whose position is ``step * global batch``, so a resumed run continues with exactly the
batches and random numbers that the uninterrupted run would have used.

Why not ``tf.train.Checkpoint(iterator=...)``: in TensorFlow 2.21 a symbolic iterator checkpoint of the crop
pipeline (interleave or flat_map, then shuffle, then repeat) fails to restore or hangs, and a full one stores
the prefetched crops: about 470 MB per checkpoint for the cpu preset's 256^3 coarse crops. The position costs
nothing and restarting the pipeline there reads at most one pass of serialized records.

The loop itself knows nothing about landmarks: a :class:`StageSetup` supplies the model, the per-example loss,
the datasets and the error measure (see :mod:`mdgru_keras.training.stages` for the coarse and fine stages).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from mdgru_keras.config import Config, TrainingConfig, config_from_dict
from mdgru_keras.errors import InputError
from mdgru_keras.training.callbacks import RunLog, read_csv
from mdgru_keras.training.checkpoints import CheckpointStore, atomic_write_text
from mdgru_keras.training.strategy import is_chief, num_workers, set_mixed_precision, split_global_batch, worker_index

# Settings that only say how long to train: a resumed run may change them.
RUN_LENGTH_KEYS = ("epochs", "max_train_seconds")


@dataclasses.dataclass
class StageSetup:
    """Everything stage-specific that the loop needs.

    Attributes:
        stage: a name written to ``run.json`` (``coarse`` or ``fine``); a resume must name the same.
        build_model: makes the Keras model (called inside the strategy scope).
        per_example_loss: ``(labels, logits) -> float32 [B]`` (logits already cast to float32).
        train_dataset: ``start_index -> dataset``: the endless training dataset of *global* batches
            ``(inputs, labels[, ...])``, starting at sample ``start_index`` of one fixed, seeded sequence
            (a resumed run asks for ``step * global_batch_size``: the data position is part of the step).
        validation_dataset: makes the finite validation dataset of batches ``(inputs, labels, metadata)``.
        errors_mm: ``(logits, metadata) -> float [N]`` localization errors in mm of one validation batch.
        steps_per_epoch: training steps per epoch.
        global_batch_size: rows per training batch over all replicas.
        description: the dataset (path), written to ``run.json``.
    """

    stage: str
    build_model: Callable[[], keras.Model]
    per_example_loss: Callable[[Any, Any], tf.Tensor]
    train_dataset: Callable[[int], tf.data.Dataset]
    validation_dataset: Callable[[], tf.data.Dataset]
    errors_mm: Callable[[Any, Any], np.ndarray]
    steps_per_epoch: int
    global_batch_size: int
    description: str = ""


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    model_path: Path | None
    figure_path: Path | None
    step: int
    epochs_done: float
    stopped_by: str  # "epochs" | "time"
    last_validation: dict[str, float] | None
    best: tuple[int, float] | None
    wall_s: float
    step_time_s_median: float | None  # training steps of this process after its first one
    first_step_s: float | None  # the first step of this process: tracing included
    resumed_from_step: int | None


def make_optimizer(config: Config) -> keras.optimizers.Optimizer:
    """``config.training``'s optimizer (:func:`mdgru_keras.networks.make_optimizer`), wrapped for loss scaling
    under mixed precision."""
    from mdgru_keras.networks import make_optimizer as config_optimizer

    optimizer = config_optimizer(config)
    if keras.mixed_precision.global_policy().name == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def scheduled_learning_rate(training: TrainingConfig, progress: float) -> float:
    """The learning rate at ``progress`` (0 at the start, 1 at the end of the run) of ``training.lr_schedule``:
    ``constant``, or ``cosine`` from ``learning_rate`` down to ``learning_rate * final_lr_fraction``."""
    if training.lr_schedule == "constant":
        return training.learning_rate
    fraction = training.final_lr_fraction
    progress = min(max(progress, 0.0), 1.0)
    return training.learning_rate * (fraction + (1.0 - fraction) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (run-length keys excluded)."""
    differences = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        if prefix == "training." and key in RUN_LENGTH_KEYS:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differences.extend(config_differences(a, b, f"{name}."))
        elif a != b:
            differences.append(f"{name} ({a!r} in the run, {b!r} now)")
    return differences


def model_variables(model: keras.Model) -> dict[str, tf.Variable]:
    """All variables of ``model`` by position, for ``tf.train.Checkpoint``.

    A Keras 3 model handed to ``tf.train.Checkpoint`` as it is contributes only what other objects reach (the
    optimizer's trainable variables); its non-trainable state, such as the seed generators that draw the
    DropConnect masks, would be lost. Listing every variable keeps a resumed run on the same random numbers.
    Keys are positions, not paths: seed generators get process-wide counters in their names
    (``seed_generator_57``), and a resume checks that the config, hence the variable list, is the same.
    """
    return {f"v{index:04d}": variable for index, variable in enumerate(model.variables)}


class Trainer:
    """Runs (or resumes) the training of one stage into ``run_dir``.

    Args:
        setup: the stage (model, loss, data, error measure).
        config: the resolved config (run-length overrides already applied); written to ``config.json``.
        run_dir: the run directory.
        strategy: a ``tf.distribute`` strategy (:func:`mdgru_keras.training.strategy.make_strategy`); its scope
            is used here.
        resume: continue from the newest valid checkpoint in ``run_dir`` (start fresh when there is none).
        figure: ``(log_rows, step_rows, path) -> path or None`` draws the loss curves; None skips the figure.
        verbose: 1 progress bar and a line per epoch, 0 silent.
    """

    def __init__(
        self,
        setup: StageSetup,
        config: Config,
        run_dir: str | Path,
        strategy: tf.distribute.Strategy,
        resume: bool = False,
        figure: Callable[[list, list, Path], Path | None] | None = None,
        verbose: int = 1,
    ) -> None:
        self.setup = setup
        self.config = config
        self.run_dir = Path(run_dir)
        self.strategy = strategy
        self.resume = resume
        self.figure = figure
        self.chief = is_chief(strategy)
        self.workers = num_workers(strategy)
        self.verbose = verbose if self.chief else 0
        replicas = strategy.num_replicas_in_sync
        if setup.global_batch_size % replicas:
            raise InputError(
                None,
                f"training.batch_size {setup.global_batch_size} cannot be split evenly over {replicas} replicas",
            )

    # ------------------------------------------------------------------ run directory
    def _check_run_dir(self) -> bool:
        """Validate the run directory against this run; True when there is a run to resume."""
        config_path = self.run_dir / "config.json"
        run_path = self.run_dir / "run.json"
        if not self.chief:
            # The chief checks (and may just have written) the run description; a worker only needs to know
            # whether there are checkpoints to resume from (a multi-worker --out must be on a shared disk).
            return self.resume and (self.run_dir / "checkpoints").is_dir()
        exists = config_path.exists() or (self.run_dir / "checkpoints").exists()
        if not exists:
            return False
        if not self.resume:
            raise InputError(
                self.run_dir, "already holds a training run; add --resume to continue it, or choose another --out"
            )
        try:
            old_config = config_from_dict(json.loads(config_path.read_text(encoding="utf-8")), str(config_path))
            run_info = json.loads(run_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise InputError(config_path, f"cannot resume: unreadable run description ({error})") from None
        if run_info.get("stage") != self.setup.stage:
            raise InputError(
                run_path, f"is a {run_info.get('stage')} run; cannot resume it as the {self.setup.stage} stage"
            )
        # a stage's run depends on the shared settings and its own section, not on the other stage's
        other = "fine" if self.setup.stage == "coarse" else "coarse"
        old_dict, new_dict = old_config.to_dict(), self.config.to_dict()
        old_dict.pop(other, None)
        new_dict.pop(other, None)
        differences = config_differences(old_dict, new_dict)
        if differences:
            raise InputError(
                config_path, "cannot resume with another config: differs in " + "; ".join(differences)
            )
        if run_info.get("steps_per_epoch") != self.setup.steps_per_epoch:
            raise InputError(
                run_path,
                f"cannot resume: {run_info.get('steps_per_epoch')} steps per epoch in the run, "
                f"{self.setup.steps_per_epoch} with this dataset",
            )
        return True

    def _write_run_description(self) -> None:
        if not self.chief:
            return
        atomic_write_text(self.run_dir / "config.json", self.config.to_json() + "\n")
        info = {
            "stage": self.setup.stage,
            "dataset": self.setup.description,
            "steps_per_epoch": self.setup.steps_per_epoch,
            "global_batch_size": self.setup.global_batch_size,
            "replicas": self.strategy.num_replicas_in_sync,
            "workers": self.workers,
        }
        atomic_write_text(self.run_dir / "run.json", json.dumps(info, indent=2) + "\n")

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        started = time.monotonic()
        training = self.config.training
        setup = self.setup
        has_run = self._check_run_dir()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not has_run:
            self._write_run_description()
        set_mixed_precision(training.mixed_precision)
        keras.utils.set_random_seed(training.seed)

        strategy = self.strategy
        with strategy.scope():
            model = setup.build_model()
            optimizer = make_optimizer(self.config)
            optimizer.build(model.trainable_variables)
        # Counters live outside the strategy: plain host variables, saved with everything else.
        progress = tf.Module()
        progress.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        progress.epoch_loss_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        progress.epoch_loss_count = tf.Variable(0, dtype=tf.int64, trainable=False)
        progress.elapsed_s = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        checkpoint = tf.train.Checkpoint(model=model_variables(model), optimizer=optimizer, progress=progress)
        store = CheckpointStore(
            self.run_dir / "checkpoints",
            checkpoint,
            keep=training.keep_checkpoints,
            is_chief=self.chief,
            worker_id=worker_index(strategy),
        )
        log = RunLog(self.run_dir, setup.steps_per_epoch, enabled=self.chief, verbose=self.verbose)

        resumed_from = None
        if has_run:
            info = store.latest_valid()
            if info is not None:
                try:
                    store.restore(info)
                except (tf.errors.OpError, AssertionError, ValueError) as error:
                    raise InputError(
                        info.path,
                        "cannot resume from this checkpoint (was the dataset, the data pipeline or the model "
                        f"changed?): {str(error).strip().splitlines()[0]}",
                    ) from None
                resumed_from = int(progress.step.numpy())
                if self.chief:
                    store.set_aside_after(resumed_from)
                    log.truncate_after(resumed_from)
                log.message(f"resuming {self.run_dir} from step {resumed_from} (epoch {info.epoch:.2f})")
            else:
                log.message(f"no valid checkpoint in {self.run_dir}; starting from step 0")
                if self.chief:
                    store.set_aside_after(-1)
                    log.truncate_after(0)
                self._write_run_description()

        global_batch = setup.global_batch_size
        # The data position is the number of samples drawn: resume where the checkpointed step left off.
        train_iterator = iter(setup.train_dataset(int(progress.step.numpy()) * global_batch))
        per_example_loss = setup.per_example_loss
        replicas = strategy.num_replicas_in_sync

        def replica_step(inputs, labels, stop):
            with tf.GradientTape() as tape:
                logits = model(inputs, training=True)
                logits = tf.nest.map_structure(lambda t: tf.cast(t, tf.float32), logits)
                loss = tf.reduce_sum(per_example_loss(labels, logits)) / global_batch
                if model.losses:
                    loss += tf.add_n(model.losses) / replicas
                scaled = optimizer.scale_loss(loss)
            gradients = tape.gradient(scaled, model.trainable_variables)
            optimizer.apply(gradients, model.trainable_variables)
            return loss, tf.identity(stop)

        @tf.function(autograph=False, reduce_retracing=True)
        def train_step(inputs, labels, stop):
            loss, stop = strategy.run(replica_step, args=(inputs, labels, stop))
            # The stop flag is reduced with the loss so that all workers stop after the same step.
            return (
                strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
                strategy.reduce(tf.distribute.ReduceOp.SUM, stop, axis=None),
            )

        @tf.function(autograph=False, reduce_retracing=True)
        def evaluate_batch(inputs, labels):
            logits = model(inputs, training=False)
            logits = tf.nest.map_structure(lambda t: tf.cast(t, tf.float32), logits)
            return logits, per_example_loss(labels, logits)

        @tf.function(autograph=False)
        def barrier():
            ones = strategy.run(lambda: tf.identity(tf.constant(1.0)))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, ones, axis=None)

        def validate() -> dict[str, float]:
            losses, errors = [], []
            for batch in setup.validation_dataset():
                inputs, labels, metadata = batch
                logits, loss = evaluate_batch(inputs, labels)
                losses.append(loss.numpy().reshape(-1))
                errors.append(np.asarray(setup.errors_mm(logits, metadata), dtype=np.float64).reshape(-1))
            errors_mm = np.concatenate(errors) if errors else np.array([np.nan])
            return {
                "val_loss": float(np.mean(np.concatenate(losses))) if losses else math.nan,
                "val_error_mm_mean": float(np.mean(errors_mm)),
                "val_error_mm_median": float(np.median(errors_mm)),
                "val_error_mm_max": float(np.max(errors_mm)),
            }

        steps_per_epoch = setup.steps_per_epoch
        total_steps = training.epochs * steps_per_epoch
        budget = training.max_train_seconds
        step = int(progress.step.numpy())
        elapsed_before = float(progress.elapsed_s.numpy())
        loop_started = time.monotonic()
        step_times: list[float] = []
        last_row: dict[str, float] | None = None
        stopped_by = "epochs"

        def elapsed() -> float:
            return elapsed_before + time.monotonic() - loop_started

        def save(validation_error_mm: float | None = None) -> None:
            progress.step.assign(step)
            progress.elapsed_s.assign(elapsed())
            store.save(step, step / steps_per_epoch, validation_error_mm)

        def end_of_validation_period() -> dict[str, float] | None:
            if not self.chief:  # validation needs no collective ops: only the chief, who logs it, runs it
                return None
            count = int(progress.epoch_loss_count.numpy())
            row = {
                "epoch": step / steps_per_epoch,
                "step": float(step),
                "train_loss": float(progress.epoch_loss_sum.numpy()) / max(count, 1),
                **validate(),
                "learning_rate": float(keras.ops.convert_to_numpy(optimizer.learning_rate)),
                "elapsed_s": elapsed(),
            }
            log.epoch(row, training.epochs)
            return row

        log.open()
        try:
            if step >= total_steps:
                log.message(f"{self.run_dir}: already trained for {step} steps ({training.epochs} epochs)")
            while step < total_steps:
                over_budget = budget > 0 and time.monotonic() - loop_started >= budget
                batch = next(train_iterator)
                inputs, labels = batch[0], batch[1]
                if replicas > 1:
                    inputs = split_global_batch(strategy, inputs, global_batch)
                    labels = split_global_batch(strategy, labels, global_batch)
                if training.lr_schedule != "constant":
                    # The end of the run is whichever comes first: the last epoch or the time budget.
                    run_progress = step / total_steps
                    if budget > 0:
                        run_progress = max(run_progress, (time.monotonic() - loop_started) / budget)
                    optimizer.learning_rate = scheduled_learning_rate(training, run_progress)
                tick = time.monotonic()
                loss, stop = train_step(inputs, labels, tf.constant(1.0 if over_budget else 0.0))
                loss = float(loss.numpy())
                step_times.append(time.monotonic() - tick)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"training loss is {loss} at step {step + 1}; lower the learning rate")
                step += 1
                progress.epoch_loss_sum.assign_add(loss)
                progress.epoch_loss_count.assign_add(1)
                log.step(step, loss)
                stop_now = float(stop.numpy()) > 0 and step < total_steps
                if step % steps_per_epoch == 0 or stop_now:
                    last_row = end_of_validation_period()
                    save(None if last_row is None else last_row["val_error_mm_mean"])
                    if step % steps_per_epoch == 0:
                        progress.epoch_loss_sum.assign(0.0)
                        progress.epoch_loss_count.assign(0)
                elif step % training.checkpoint_every_steps == 0:
                    save()
                if stop_now:
                    stopped_by = "time"
                    log.message(f"stopping after {step} steps: the time budget of {budget:.0f} s is used up")
                    break
            if last_row is None:
                rows = read_csv(log.epochs_path) if self.chief else []
                last_row = rows[-1] if rows else None
            model_path = figure_path = None
            if self.chief:
                model_path = self.run_dir / "model.keras"
                tmp = self.run_dir / f".model-{uuid.uuid4().hex[:8]}.keras"
                model.save(tmp)
                os.replace(tmp, model_path)
                if self.figure is not None:
                    figure_path = self.figure(
                        read_csv(log.epochs_path), read_csv(log.steps_path), self.run_dir / "loss.png"
                    )
            if self.workers > 1:
                # Keep the cluster up until the chief has written its files (worker 0 hosts the coordination
                # service; a worker that outlives it logs connection errors).
                barrier()
                if self.chief:
                    time.sleep(3.0)  # let the other workers disconnect from the coordination service first
        finally:
            log.close()

        # The first step of this process includes tracing; leave it out of the step time.
        timed = step_times[1:] if len(step_times) > 1 else step_times
        result = TrainResult(
            run_dir=self.run_dir,
            model_path=model_path,
            figure_path=figure_path,
            step=step,
            epochs_done=step / steps_per_epoch,
            stopped_by=stopped_by,
            last_validation=last_row,
            best=store.best(),
            wall_s=time.monotonic() - started,
            step_time_s_median=statistics.median(timed) if timed else None,
            first_step_s=step_times[0] if step_times else None,
            resumed_from_step=resumed_from,
        )
        if self.chief:
            summary = dataclasses.asdict(result)
            summary = {key: (str(value) if isinstance(value, Path) else value) for key, value in summary.items()}
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return result
