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
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from mdgru_keras.config import Config, TrainingConfig, config_from_dict
from mdgru_keras.errors import InputError
from mdgru_keras.io.atomic import atomic_path, write_text_atomic
from mdgru_keras.training.callbacks import RunLog, read_csv
from mdgru_keras.training.checkpoints import CheckpointStore
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


def float32_logits(logits: Any) -> Any:
    """``logits`` (a tensor or a nest of tensors) cast to float32: losses and errors are computed in float32, also
    under mixed precision."""
    return tf.nest.map_structure(lambda tensor: tf.cast(tensor, tf.float32), logits)


class TrainingProgress(tf.Module):
    """The loop's counters, saved with every checkpoint (plain host variables: made outside the strategy).

    Attributes:
        step: training steps done (brought up to date at every checkpoint).
        epoch_loss_sum: the sum of the step losses of the current epoch so far.
        epoch_loss_count: their number (the ``train_loss`` of the next validation is their mean).
        elapsed_s: training seconds of the run, over all its processes (brought up to date at every checkpoint).

    The attribute names are checkpoint keys (``progress/step``, ...): renaming one breaks resuming older runs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.epoch_loss_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        self.epoch_loss_count = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.elapsed_s = tf.Variable(0.0, dtype=tf.float64, trainable=False)


@dataclasses.dataclass(frozen=True)
class StepFunctions:
    """The compiled functions of the loop (:func:`make_step_functions`).

    Attributes:
        train_step: ``(inputs, labels, stop) -> (loss, stop)``: one optimizer step on a global batch that is
            split over the replicas; returns the batch's loss and the sum of the workers' stop flags (reduced
            with the loss, so that all workers stop after the same step).
        evaluate_batch: ``(inputs, labels) -> (logits, per-example loss)`` of a validation batch (float32).
        barrier: a collective no-op that returns once every worker has called it.
    """

    train_step: Callable[[Any, Any, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]
    evaluate_batch: Callable[[Any, Any], tuple[Any, tf.Tensor]]
    barrier: Callable[[], tf.Tensor]


def make_step_functions(
    strategy: tf.distribute.Strategy,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    per_example_loss: Callable[[Any, Any], tf.Tensor],
    global_batch_size: int,
) -> StepFunctions:
    """The loop's compiled functions (``tf.function``) for ``model`` and ``optimizer`` under ``strategy``.

    The loss of a step is the per-example loss summed over the global batch and divided by its size (the same
    whatever the number of replicas), plus the model's own losses (each replica adds its share).
    """
    replicas = strategy.num_replicas_in_sync

    def replica_step(inputs, labels, stop):
        with tf.GradientTape() as tape:
            logits = float32_logits(model(inputs, training=True))
            loss = tf.reduce_sum(per_example_loss(labels, logits)) / global_batch_size
            if model.losses:
                loss += tf.add_n(model.losses) / replicas
            scaled = optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply(gradients, model.trainable_variables)
        return loss, tf.identity(stop)

    @tf.function(autograph=False, reduce_retracing=True)
    def train_step(inputs, labels, stop):
        loss, stop = strategy.run(replica_step, args=(inputs, labels, stop))
        return (
            strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
            strategy.reduce(tf.distribute.ReduceOp.SUM, stop, axis=None),
        )

    @tf.function(autograph=False, reduce_retracing=True)
    def evaluate_batch(inputs, labels):
        logits = float32_logits(model(inputs, training=False))
        return logits, per_example_loss(labels, logits)

    @tf.function(autograph=False)
    def barrier():
        ones = strategy.run(lambda: tf.identity(tf.constant(1.0)))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, ones, axis=None)

    return StepFunctions(train_step=train_step, evaluate_batch=evaluate_batch, barrier=barrier)


def validate(setup: StageSetup, evaluate_batch: Callable[[Any, Any], tuple[Any, tf.Tensor]]) -> dict[str, float]:
    """One pass over ``setup``'s validation dataset: the mean loss and the localization error in mm (mean,
    median, max over every measured landmark); NaN when the dataset is empty."""
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


@dataclasses.dataclass(frozen=True)
class _RunParts:
    """The objects that one :meth:`Trainer.run` trains and writes through (made by :meth:`Trainer._build`).

    Attributes:
        model: the stage's model (variables mirrored by the strategy).
        optimizer: its optimizer (loss-scaled under mixed precision).
        progress: the counters saved with every checkpoint.
        store: the run's checkpoints (``run_dir/checkpoints``).
        log: ``steps.csv``, ``log.csv``, TensorBoard and the progress output (silent on non-chief workers).
        functions: the compiled training, validation and barrier steps.
    """

    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    progress: TrainingProgress
    store: CheckpointStore
    log: RunLog
    functions: StepFunctions


@dataclasses.dataclass
class _LoopState:
    """Where the loop of one :meth:`Trainer.run` stands, in this process.

    Attributes:
        step: training steps done (``progress.step`` catches up at every checkpoint).
        elapsed_before: training seconds of the run before this process (from the restored checkpoint).
        started: ``time.monotonic()`` when this process began to train; its time budget counts from here.
        step_times: seconds of each training step of this process.
        last_row: the newest validation row (None before the first; always None on non-chief workers until
            :meth:`Trainer._finish`).
        stopped_by: ``"epochs"``, or ``"time"`` once the time budget has stopped the run.
    """

    step: int
    elapsed_before: float
    started: float
    step_times: list[float] = dataclasses.field(default_factory=list)
    last_row: dict[str, float] | None = None
    stopped_by: str = "epochs"

    @classmethod
    def start(cls, progress: TrainingProgress) -> _LoopState:
        """The state at the first step of this process: ``progress``'s step and seconds, the clock started now."""
        return cls(
            step=int(progress.step.numpy()),
            elapsed_before=float(progress.elapsed_s.numpy()),
            started=time.monotonic(),
        )

    def seconds(self) -> float:
        """Seconds since this process began to train (what the time budget limits)."""
        return time.monotonic() - self.started

    def elapsed(self) -> float:
        """Training seconds of the whole run (what checkpoints and ``log.csv`` record)."""
        return self.elapsed_before + time.monotonic() - self.started


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

    The arguments are kept as attributes of the same names, and also ``chief`` (whether this process writes the
    run directory), ``workers`` (processes in the cluster) and ``verbose`` (0 on non-chief workers). They do not
    change: what one :meth:`run` builds and updates lives in a :class:`_RunParts` and a :class:`_LoopState` that
    its steps pass along.
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
        write_text_atomic(self.run_dir / "config.json", self.config.to_json() + "\n", durable=True)
        info = {
            "stage": self.setup.stage,
            "dataset": self.setup.description,
            "steps_per_epoch": self.setup.steps_per_epoch,
            "global_batch_size": self.setup.global_batch_size,
            "replicas": self.strategy.num_replicas_in_sync,
            "workers": self.workers,
        }
        write_text_atomic(self.run_dir / "run.json", json.dumps(info, indent=2) + "\n", durable=True)

    # ------------------------------------------------------------------ the run: the recipe
    @property
    def total_steps(self) -> int:
        """Training steps of the whole run: ``training.epochs`` epochs of ``setup.steps_per_epoch`` steps."""
        return self.config.training.epochs * self.setup.steps_per_epoch

    def run(self) -> TrainResult:
        """Train the stage into ``run_dir`` until its last epoch or its time budget; write the model and summary.

        A killed run (``resume=True``) continues from its newest valid checkpoint with the same batches and
        random numbers; a finished one trains no further and only writes its model, figure and summary again.
        """
        started = time.monotonic()
        resuming = self._prepare_run_dir()
        parts = self._build()
        resumed_from = self._resume_or_start(parts, resuming)
        batches = self._training_batches(parts.progress)
        loop = _LoopState.start(parts.progress)
        parts.log.open()
        try:
            self._train(parts, batches, loop)
            model_path, figure_path = self._finish(parts, loop)
        finally:
            parts.log.close()
        result = self._result(parts, loop, model_path, figure_path, resumed_from, started)
        self._write_summary(result)
        return result

    # ------------------------------------------------------------------ before training
    def _prepare_run_dir(self) -> bool:
        """Check ``run_dir`` against this run and create it; describe a new run (``config.json``, ``run.json``).

        Returns whether there is a run to resume (:meth:`_check_run_dir`).
        """
        resuming = self._check_run_dir()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not resuming:
            self._write_run_description()
        return resuming

    def _build(self) -> _RunParts:
        """The dtype policy and the seeds, then the model and optimizer (in the strategy scope), the counters,
        the checkpoint store, the run log and the compiled step functions.

        The order is part of the numerics: the seeds fix the initial weights and the DropConnect seed states.
        """
        training = self.config.training
        set_mixed_precision(training.mixed_precision)
        keras.utils.set_random_seed(training.seed)
        with self.strategy.scope():
            model = self.setup.build_model()
            optimizer = make_optimizer(self.config)
            optimizer.build(model.trainable_variables)
        progress = TrainingProgress()  # outside the strategy: plain host variables, saved with everything else
        checkpoint = tf.train.Checkpoint(model=model_variables(model), optimizer=optimizer, progress=progress)
        store = CheckpointStore(
            self.run_dir / "checkpoints",
            checkpoint,
            keep=training.keep_checkpoints,
            is_chief=self.chief,
            worker_id=worker_index(self.strategy),
        )
        log = RunLog(self.run_dir, self.setup.steps_per_epoch, enabled=self.chief, verbose=self.verbose)
        functions = make_step_functions(
            self.strategy, model, optimizer, self.setup.per_example_loss, self.setup.global_batch_size
        )
        return _RunParts(model, optimizer, progress, store, log, functions)

    def _resume_or_start(self, parts: _RunParts, resuming: bool) -> int | None:
        """Restore the newest valid checkpoint when ``resuming``; returns its step (None when starting at 0).

        Checkpoints and log rows newer than the restored step are set aside or dropped (the chief's files), so
        the logs continue without counting a step twice. A run to resume without a valid checkpoint starts
        again from step 0 with a fresh run description.
        """
        if not resuming:
            return None
        store, log = parts.store, parts.log
        info = store.latest_valid()
        if info is None:
            log.message(f"no valid checkpoint in {self.run_dir}; starting from step 0")
            if self.chief:
                store.set_aside_after(-1)
                log.truncate_after(0)
            self._write_run_description()
            return None
        try:
            store.restore(info)
        except (tf.errors.OpError, AssertionError, ValueError) as error:
            raise InputError(
                info.path,
                "cannot resume from this checkpoint (was the dataset, the data pipeline or the model "
                f"changed?): {str(error).strip().splitlines()[0]}",
            ) from None
        resumed_from = int(parts.progress.step.numpy())
        if self.chief:
            store.set_aside_after(resumed_from)
            log.truncate_after(resumed_from)
        log.message(f"resuming {self.run_dir} from step {resumed_from} (epoch {info.epoch:.2f})")
        return resumed_from

    def _training_batches(self, progress: TrainingProgress) -> Iterator[tuple]:
        """The endless training batches from the (restored) step on: the data position is the number of
        samples drawn, ``step * global_batch_size``."""
        return iter(self.setup.train_dataset(int(progress.step.numpy()) * self.setup.global_batch_size))

    # ------------------------------------------------------------------ training
    def _train(self, parts: _RunParts, batches: Iterator[tuple], loop: _LoopState) -> None:
        """Train from ``loop.step`` to the run's last step, or until the time budget stops every worker.

        After each step: validation and a checkpoint at the end of an epoch (or of the budget), else a
        checkpoint every ``checkpoint_every_steps`` steps (:meth:`_validate_and_checkpoint`).
        """
        total_steps = self.total_steps
        if loop.step >= total_steps:
            parts.log.message(
                f"{self.run_dir}: already trained for {loop.step} steps ({self.config.training.epochs} epochs)"
            )
        while loop.step < total_steps:
            stop_requested = self._train_step(parts, batches, loop)
            stop_now = stop_requested and loop.step < total_steps
            self._validate_and_checkpoint(parts, loop, stop_now)
            if stop_now:
                loop.stopped_by = "time"
                parts.log.message(
                    f"stopping after {loop.step} steps: the time budget of "
                    f"{self.config.training.max_train_seconds:.0f} s is used up"
                )
                break

    def _train_step(self, parts: _RunParts, batches: Iterator[tuple], loop: _LoopState) -> bool:
        """One optimizer step on the next global batch; counts and logs its loss.

        Returns whether any worker found its time budget used up before the step (all workers see the same).
        Raises :class:`FloatingPointError` for a loss that is not finite.
        """
        budget = self.config.training.max_train_seconds
        over_budget = budget > 0 and loop.seconds() >= budget
        inputs, labels = self._next_batch(batches)
        self._schedule_learning_rate(parts.optimizer, loop)
        tick = time.monotonic()
        loss_tensor, stop = parts.functions.train_step(inputs, labels, tf.constant(1.0 if over_budget else 0.0))
        loss = float(loss_tensor.numpy())
        loop.step_times.append(time.monotonic() - tick)
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss} at step {loop.step + 1}; lower the learning rate")
        loop.step += 1
        parts.progress.epoch_loss_sum.assign_add(loss)
        parts.progress.epoch_loss_count.assign_add(1)
        parts.log.step(loop.step, loss)
        return float(stop.numpy()) > 0

    def _next_batch(self, batches: Iterator[tuple]) -> tuple[Any, Any]:
        """Inputs and labels of the next global batch, each split into the replicas' slices."""
        batch = next(batches)
        global_batch = self.setup.global_batch_size
        return (
            split_global_batch(self.strategy, batch[0], global_batch),
            split_global_batch(self.strategy, batch[1], global_batch),
        )

    def _schedule_learning_rate(self, optimizer: keras.optimizers.Optimizer, loop: _LoopState) -> None:
        """Set the learning rate of the coming step (:func:`scheduled_learning_rate`; nothing for ``constant``)."""
        training = self.config.training
        if training.lr_schedule == "constant":
            return
        # The end of the run is whichever comes first: the last epoch or the time budget.
        run_progress = loop.step / self.total_steps
        if training.max_train_seconds > 0:
            run_progress = max(run_progress, loop.seconds() / training.max_train_seconds)
        optimizer.learning_rate = scheduled_learning_rate(training, run_progress)

    def _validate_and_checkpoint(self, parts: _RunParts, loop: _LoopState, stop_now: bool) -> None:
        """After a step: at the end of an epoch or of the time budget validate (:meth:`_validation_row`) and
        checkpoint with the validation error, and at an epoch's end start the next epoch's loss mean; at other
        steps a checkpoint every ``training.checkpoint_every_steps`` steps."""
        end_of_epoch = loop.step % self.setup.steps_per_epoch == 0
        if end_of_epoch or stop_now:
            loop.last_row = self._validation_row(parts, loop)
            self._save_checkpoint(parts, loop, None if loop.last_row is None else loop.last_row["val_error_mm_mean"])
            if end_of_epoch:
                parts.progress.epoch_loss_sum.assign(0.0)
                parts.progress.epoch_loss_count.assign(0)
        elif loop.step % self.config.training.checkpoint_every_steps == 0:
            self._save_checkpoint(parts, loop)

    def _validation_row(self, parts: _RunParts, loop: _LoopState) -> dict[str, float] | None:
        """Validate (:func:`validate`) and log the row (``log.csv``, TensorBoard, the line per epoch).

        Only the chief validates (it needs no collective ops) and logs; other workers return None.
        """
        if not self.chief:
            return None
        progress = parts.progress
        count = int(progress.epoch_loss_count.numpy())
        row = {
            "epoch": loop.step / self.setup.steps_per_epoch,
            "step": float(loop.step),
            "train_loss": float(progress.epoch_loss_sum.numpy()) / max(count, 1),
            **validate(self.setup, parts.functions.evaluate_batch),
            "learning_rate": float(keras.ops.convert_to_numpy(parts.optimizer.learning_rate)),
            "elapsed_s": loop.elapsed(),
        }
        parts.log.epoch(row, self.config.training.epochs)
        return row

    def _save_checkpoint(self, parts: _RunParts, loop: _LoopState, validation_error_mm: float | None = None) -> None:
        """Checkpoint the step: the counters catch up with the loop, then :meth:`CheckpointStore.save`."""
        parts.progress.step.assign(loop.step)
        parts.progress.elapsed_s.assign(loop.elapsed())
        parts.store.save(loop.step, loop.step / self.setup.steps_per_epoch, validation_error_mm)

    # ------------------------------------------------------------------ after training
    def _finish(self, parts: _RunParts, loop: _LoopState) -> tuple[Path | None, Path | None]:
        """The run's outputs: ``model.keras`` and the loss figure (chief only); returns their paths.

        A process that validated nothing (a finished run run again) takes its last validation from ``log.csv``.
        In a multi-worker run every worker then waits for the others (:meth:`_wait_for_workers`).
        """
        if loop.last_row is None:
            rows = read_csv(parts.log.epochs_path) if self.chief else []
            loop.last_row = rows[-1] if rows else None
        model_path = figure_path = None
        if self.chief:
            model_path = self.run_dir / "model.keras"
            with atomic_path(model_path, suffix=".keras") as temporary:
                parts.model.save(temporary)
            if self.figure is not None:
                figure_path = self.figure(
                    read_csv(parts.log.epochs_path), read_csv(parts.log.steps_path), self.run_dir / "loss.png"
                )
        if self.workers > 1:
            self._wait_for_workers(parts.functions)
        return model_path, figure_path

    def _wait_for_workers(self, functions: StepFunctions) -> None:
        """Keep the cluster up until the chief has written its files (worker 0 hosts the coordination service;
        a worker that outlives it logs connection errors)."""
        functions.barrier()
        if self.chief:
            time.sleep(3.0)  # let the other workers disconnect from the coordination service first

    def _result(
        self,
        parts: _RunParts,
        loop: _LoopState,
        model_path: Path | None,
        figure_path: Path | None,
        resumed_from: int | None,
        started: float,
    ) -> TrainResult:
        """What the run did; ``started`` is the ``time.monotonic()`` of the start of :meth:`run`."""
        # The first step of this process includes tracing; leave it out of the step time.
        step_times = loop.step_times
        timed = step_times[1:] if len(step_times) > 1 else step_times
        return TrainResult(
            run_dir=self.run_dir,
            model_path=model_path,
            figure_path=figure_path,
            step=loop.step,
            epochs_done=loop.step / self.setup.steps_per_epoch,
            stopped_by=loop.stopped_by,
            last_validation=loop.last_row,
            best=parts.store.best(),
            wall_s=time.monotonic() - started,
            step_time_s_median=statistics.median(timed) if timed else None,
            first_step_s=step_times[0] if step_times else None,
            resumed_from_step=resumed_from,
        )

    def _write_summary(self, result: TrainResult) -> None:
        """``summary.json``: ``result`` as JSON (chief only)."""
        if not self.chief:
            return
        summary = dataclasses.asdict(result)
        summary = {key: (str(value) if isinstance(value, Path) else value) for key, value in summary.items()}
        write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n", durable=True)
