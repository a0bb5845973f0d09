"""The coarse and the fine stage as :class:`mdgru_keras.training.trainer.StageSetup`, and :func:`train_stage`.

Data come from the prepared dataset through :func:`mdgru_keras.data.pipeline.make_dataset` (the same crops
inference sees), models from :mod:`mdgru_keras.networks`, and the validation error is measured through the
real decoding path: per-axis softmax -> :func:`~mdgru_keras.geometry.coordinate_classes.decode_axis_tf`
(parabola refinement as in the config) -> window voxels -> world millimetres through each validation subject's
own ``voxel_to_world``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from mdgru_keras.config import Config, with_landmarks
from mdgru_keras.errors import InputError
from mdgru_keras.geometry import affine_maps
from mdgru_keras.geometry.coordinate_classes import decode_axis_tf
from mdgru_keras.training.trainer import StageSetup, Trainer, TrainResult

STAGES = ("coarse", "fine")
TRAIN_SPLIT = "train"
VALIDATION_SPLIT = "val"


def validation_config(config: Config) -> Config:
    """``config`` without random intensity and spatial augmentation: validation sees unaltered scans.

    The crop position stays random as in training (seeded, so every epoch sees the same crops), and with
    ``subvoxel_shift`` fine windows keep their sub-voxel positions. Without rotation and scaling, window
    voxels differ from volume voxels by a shift only, so errors in window voxels are errors in volume voxels.
    """
    plain = dataclasses.replace(
        config.augmentation,
        intensity_scale=0.0,
        intensity_shift=0.0,
        gamma=0.0,
        noise_std=0.0,
        bias_field=0.0,
        rotation_deg=0.0,
        scaling=0.0,
    )
    return config.replace(augmentation=plain)


def subject_affines(dataset_dir: str | Path, split: str) -> dict[str, np.ndarray]:
    """``subject -> voxel_to_world`` (4x4, float64) of every subject in ``split`` of a prepared dataset."""
    from mdgru_keras.data.records import read_description

    description = read_description(dataset_dir)
    files = [str(Path(dataset_dir) / name) for name in description["splits"][split]["shards"]]
    features = {
        "subject": tf.io.FixedLenFeature([], tf.string),
        "voxel_to_world": tf.io.FixedLenFeature([16], tf.float32),
    }
    affines = {}
    for serialized in tf.data.TFRecordDataset(files):
        parsed = tf.io.parse_single_example(serialized, features)
        affines[parsed["subject"].numpy().decode()] = parsed["voxel_to_world"].numpy().reshape(4, 4).astype(np.float64)
    return affines


def decode_window_voxel(logits: dict[str, tf.Tensor], config: Config, stage: str) -> tf.Tensor:
    """Window voxel coordinates ``[..., 3]`` decoded from per-axis logits ``{"x","y","z": [..., C]}``."""
    factor = config.coarse.input_stride if stage == "coarse" else 1
    return tf.stack(
        [
            decode_axis_tf(
                tf.nn.softmax(logits[axis], axis=-1), config.superresolution, factor, parabola=config.parabola
            )
            for axis in ("x", "y", "z")
        ],
        axis=-1,
    )


def errors_mm(
    predicted_window_voxel: np.ndarray, true_window_voxel: np.ndarray, subjects: np.ndarray, affines: dict
) -> np.ndarray:
    """Euclidean distances in mm between predicted and true positions ``[B, (K,) 3]``, each sample mapped to
    world millimetres through its subject's ``voxel_to_world`` (the window origin cancels in the difference)."""
    predicted = np.asarray(predicted_window_voxel, dtype=np.float64)
    truth = np.asarray(true_window_voxel, dtype=np.float64)
    distances = []
    for index, subject in enumerate(subjects):
        name = subject.decode() if isinstance(subject, bytes) else str(subject)
        affine = affines[name]
        difference = affine_maps.voxel_to_world(predicted[index], affine) - affine_maps.voxel_to_world(
            truth[index], affine
        )
        distances.append(np.linalg.norm(difference, axis=-1).reshape(-1))
    return np.concatenate(distances) if distances else np.zeros(0)


def per_example_loss(
    labels: dict[str, tf.Tensor], logits: dict[str, tf.Tensor], label_sigma_classes: float = 0.0
) -> tf.Tensor:
    """The paper's loss per sample ``[B]``: :class:`mdgru_keras.networks.AxisCrossEntropy` (summed over
    landmarks) of every axis, summed over the axes; the loop divides by the global batch size. With
    ``label_sigma_classes > 0``, its Gaussian soft-label form. Labels with a ``"mask"`` ``[B, K]`` (fine
    windows) count only the landmarks inside each window (:func:`mdgru_keras.networks.masked_localization_loss`).
    """
    from mdgru_keras.networks import AXES, AxisCrossEntropy, masked_localization_loss

    if "mask" in labels:
        return masked_localization_loss(labels, logits, labels["mask"], label_sigma_classes)
    loss = AxisCrossEntropy(label_sigma_classes, reduction=None)
    return tf.add_n([loss(labels[axis], logits[axis]) for axis in AXES])


def stage_setup(stage: str, config: Config, dataset_dir: str | Path) -> StageSetup:
    """The :class:`StageSetup` of ``stage`` on a prepared dataset; checks the dataset against the config first."""
    from mdgru_keras import networks
    from mdgru_keras.data.pipeline import make_dataset, split_size

    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    dataset_dir = Path(dataset_dir)
    check_dataset(config, dataset_dir)
    training = config.training
    seed = training.seed
    n_train = split_size(dataset_dir, TRAIN_SPLIT)
    steps_per_epoch = max(1, math.ceil(n_train * training.samples_per_subject / training.batch_size))
    plain = validation_config(config)
    affines = subject_affines(dataset_dir, VALIDATION_SPLIT)

    def train_dataset(start_index: int) -> tf.data.Dataset:
        return make_dataset(dataset_dir, TRAIN_SPLIT, stage, config, seed=seed, deterministic=True, repeat=True,
                            start_index=start_index)

    # One finite, seeded pass: every epoch validates on the same crops (made once, iterated every epoch).
    validation = make_dataset(
        dataset_dir, VALIDATION_SPLIT, stage, plain, seed=seed + 1, deterministic=True, repeat=False,
        with_metadata=True,
    )

    def stage_errors(logits, metadata) -> np.ndarray:
        predicted = decode_window_voxel(logits, config, stage).numpy()
        truth = metadata["window_voxel"].numpy()
        if stage == "fine":  # the landmark each validation window was placed for (others may lie outside)
            rows = np.arange(truth.shape[0])
            index = metadata["landmark_index"].numpy()
            predicted, truth = predicted[rows, index], truth[rows, index]
        return errors_mm(predicted, truth, metadata["subject"].numpy(), affines)

    return StageSetup(
        stage=stage,
        build_model=lambda: networks.build_model(config, stage),
        per_example_loss=functools.partial(
            per_example_loss, label_sigma_classes=networks.label_sigma_classes(config)
        ),
        train_dataset=train_dataset,
        validation_dataset=lambda: validation,
        errors_mm=stage_errors,
        steps_per_epoch=steps_per_epoch,
        global_batch_size=training.batch_size,
        description=str(dataset_dir.resolve()),
    )


def check_dataset(config: Config, dataset_dir: Path) -> None:
    """One-line errors, before any work, for a dataset that cannot train ``config``."""
    from mdgru_keras.data.pipeline import split_size
    from mdgru_keras.data.records import read_description

    description = read_description(dataset_dir)
    where = dataset_dir / "dataset.json"
    missing = [name for name in config.landmarks if name not in description["landmarks"]]
    if missing:
        raise InputError(
            where,
            f"has no landmark(s) {', '.join(missing)} of config {config.name!r} "
            f"(the dataset has {', '.join(description['landmarks']) or 'none'})",
        )
    spacing = description.get("spacing_mm")
    if spacing is None or abs(float(spacing) - config.spacing_mm) > 1e-6:
        raise InputError(
            where, f"was prepared at {spacing} mm but config {config.name!r} expects {config.spacing_mm} mm"
        )
    if config.fine.window_size > config.coarse.padded_size:
        raise InputError(
            where,
            f"config {config.name!r}: fine.window_size {config.fine.window_size} is larger than the padded "
            f"volume (coarse.padded_size {config.coarse.padded_size})",
        )
    for split in (TRAIN_SPLIT, VALIDATION_SPLIT):
        if split not in description["splits"] or split_size(dataset_dir, split) == 0:
            raise InputError(
                where, f"has no {split!r} subjects; training needs both 'train' and 'val' (see prepare --help)"
            )


def loss_figure(epoch_rows: list[dict], step_rows: list[dict], path: Path, title: str) -> Path | None:
    """The paper's Fig. 2 for one run: mean training loss of each epoch and validation loss, against epochs."""
    from mdgru_keras.figures import loss_curve_figure

    history = [{"epoch": row["epoch"], "loss": row["train_loss"], "val_loss": row["val_loss"]} for row in epoch_rows]
    return loss_curve_figure(history, path, title=title) if history else None


def resolve_config(
    config: Config,
    epochs: int | None = None,
    max_seconds: float | None = None,
    landmarks: Sequence[str] | None = None,
    dataset_dir: str | Path | None = None,
) -> Config:
    """``config`` with the command line's overrides; ``landmarks=("all",)`` takes the dataset's landmarks."""
    if landmarks is not None:
        if tuple(landmarks) == ("all",):
            from mdgru_keras.data.records import read_description

            landmarks = read_description(dataset_dir)["landmarks"]
        config = with_landmarks(config, landmarks)
    changes = {}
    if epochs is not None:
        changes["epochs"] = int(epochs)
    if max_seconds is not None:
        changes["max_train_seconds"] = float(max_seconds)
    if not changes:
        return config
    return config.replace(training=dataclasses.replace(config.training, **changes))


def train_stage(
    stage: str,
    config: Config,
    dataset_dir: str | Path,
    run_dir: str | Path,
    *,
    resume: bool = False,
    epochs: int | None = None,
    max_seconds: float | None = None,
    landmarks: Sequence[str] | None = None,
    deterministic: bool = True,
    verbose: int = 1,
) -> TrainResult:
    """Train ``stage`` (``coarse`` or ``fine``) of ``config`` on a prepared dataset into ``run_dir``.

    See :class:`mdgru_keras.training.trainer.Trainer` for what the run directory holds. ``deterministic`` turns on
    TensorFlow's op determinism, so that a run repeats exactly on the same machine (for a given seed).
    ``landmarks`` replaces the config's landmark list (``("all",)``: every landmark of the dataset).
    """
    from mdgru_keras.training.strategy import make_strategy

    config = resolve_config(config, epochs, max_seconds, landmarks, dataset_dir)
    # The strategy first: a multi-worker strategy must exist before other TensorFlow work starts.
    strategy = make_strategy(config.training.distribution)
    if deterministic:
        os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.training.seed)  # before any dataset: tf.data seeds depend on it
    setup = stage_setup(stage, config, dataset_dir)
    figure = functools.partial(loss_figure, title=f"{stage} stage, {config.name} config")
    trainer = Trainer(setup, config, run_dir, strategy, resume=resume, figure=figure, verbose=verbose)
    return trainer.run()
