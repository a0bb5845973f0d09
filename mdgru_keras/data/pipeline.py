"""The ``tf.data`` pipeline of random training crops (contract: ``docs/ARCHITECTURE.md``, "tf.data pipeline").

Per sample: parse and decode the volume -> raw-intensity augmentation -> :func:`preprocess` of the whole
volume -> intensity scale/shift -> one crop:

* ``coarse``: a ``P = config.coarse.padded_size`` region centred on the volume plus a uniform random integer
  offset of up to ``config.coarse.offset_range_voxel`` per axis, restricted so that all landmarks stay at
  least :data:`COARSE_MARGIN_VOXEL` inside; zero-padded outside the volume.
* ``fine``: a ``W = config.fine.window_size`` window holding landmark ``k`` (uniform) at a uniform random
  position at least :data:`FINE_MARGIN_VOXEL` from the border; with ``augmentation.subvoxel_shift`` that
  position is continuous (trilinear resampling) so that training sees every coordinate class, not only the
  class of the landmark's own fractional position.

With rotation or scaling on, the crop is resampled through one affine ``window -> volume`` map (sub-voxel
shift included) and the landmark coordinates are mapped with the same matrix. Labels are coordinate classes
from :func:`mdgru_keras.geometry.window_voxel_to_class_tf`, the inverse of the decoding used at inference.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import tensorflow as tf

from mdgru_keras import geometry
from mdgru_keras.config import Config
from mdgru_keras.data import augment
from mdgru_keras.data.records import parse_example, read_description
from mdgru_keras.errors import InputError
from mdgru_keras.preprocessing import preprocess

STAGES = ("coarse", "fine")
FINE_MARGIN_VOXEL = 2  # a fine-window landmark is at least this far from the window border
COARSE_MARGIN_VOXEL = 4  # and a coarse-region landmark (plus the coarse stride, see _coarse_margin)
SHUFFLE_BUFFER = 16  # serialized whole-volume examples (about 17 MB each at 1 mm)


def _coarse_margin(config: Config) -> int:
    return max(COARSE_MARGIN_VOXEL, config.coarse.input_stride)


def split_size(dataset_dir: str | Path, split: str) -> int:
    """Number of subjects in ``split`` (for steps per epoch: ``split_size * samples_per_subject / batch``)."""
    description = read_description(dataset_dir)
    return len(_split_entry(description, dataset_dir, split)["subjects"])


def _split_entry(description: dict, dataset_dir: str | Path, split: str) -> dict:
    splits = description["splits"]
    if split not in splits:
        raise InputError(Path(dataset_dir) / "dataset.json",
                         f"no split {split!r} (the dataset has: {', '.join(splits) or 'none'})")
    return splits[split]


def _landmark_indices(description: dict, dataset_dir: str | Path, config: Config) -> list[int]:
    names = list(description["landmarks"])
    missing = [name for name in config.landmarks if name not in names]
    if missing:
        raise InputError(Path(dataset_dir) / "dataset.json",
                         f"no landmark(s) {', '.join(missing)} for config {config.name!r} "
                         f"(the dataset has: {', '.join(names)})")
    return [names.index(name) for name in config.landmarks]


def _check_spacing(description: dict, dataset_dir: str | Path, config: Config) -> float:
    spacing = description.get("spacing_mm")
    if spacing is None or abs(float(spacing) - config.spacing_mm) > 1e-6:
        raise InputError(Path(dataset_dir) / "dataset.json",
                         f"prepared at {spacing} mm but config {config.name!r} expects {config.spacing_mm} mm; "
                         f"prepare it again with --spacing {config.spacing_mm}")
    return float(spacing)


# ---------------------------------------------------------------------------------------------------------
# one sample


@functools.cache
def _compiled_window_sampler(window_size: tuple[int, int, int]):
    """:func:`geometry.sample_window_affine_tf` compiled with XLA, for large (coarse) windows.

    XLA fuses the index, weight and gather arithmetic of the 8 neighbours: on 2 CPU cores a 256^3 window of
    a 193x229x193x2 volume takes ~0.25-0.95 s instead of ~3.5-6.5 s. XLA compiles once per distinct volume
    shape (~1.5 s each); for 64^3 windows it gains nothing, so the fine stage does not use it.
    """
    return tf.function(
        lambda volume, linear, offset: geometry.sample_window_affine_tf(volume, linear, offset, window_size,
                                                                       slab=window_size[0]),
        jit_compile=True,
    )


def coarse_crop(inputs: tf.Tensor, landmarks_voxel: tf.Tensor, seed: tf.Tensor,
                config: Config) -> tuple[tf.Tensor, tf.Tensor]:
    """A random coarse region ``[P, P, P, C]`` of a preprocessed volume and the landmarks in it ``[K, 3]``."""
    size = config.coarse.padded_size
    margin = _coarse_margin(config)
    origin_seed, linear_seed = augment.split_seed(seed, 2)
    low, high = geometry.window_origin_bounds_tf(
        tf.shape(inputs)[:3], landmarks_voxel, size, config.coarse.offset_range_voxel, margin
    )
    origin = augment.uniform_int(origin_seed, low, high)
    if not augment.has_spatial_augmentation(config.augmentation):
        window_voxel = landmarks_voxel - tf.cast(origin, tf.float32)
        return geometry.crop_with_padding_tf(inputs, origin, (size,) * 3), window_voxel
    # rotate and scale about the region's centre; fall back to the plain crop if a landmark would leave it
    centre = tf.fill([3], (size - 1) / 2.0)
    linear = augment.random_linear_map(linear_seed, config.augmentation)
    offset = tf.cast(origin, tf.float32) + centre - tf.linalg.matvec(linear, centre)
    window_voxel = geometry.volume_voxel_to_window_voxel_tf(landmarks_voxel, linear, offset)
    inside = tf.reduce_all((window_voxel >= margin) & (window_voxel <= size - 1 - margin))
    linear = tf.where(inside, linear, tf.eye(3))
    offset = tf.where(inside, offset, tf.cast(origin, tf.float32))
    window_voxel = geometry.volume_voxel_to_window_voxel_tf(landmarks_voxel, linear, offset)
    return _compiled_window_sampler((size,) * 3)(inputs, linear, offset), window_voxel


def fine_crop(inputs: tf.Tensor, landmark_voxel: tf.Tensor, seed: tf.Tensor,
              config: Config) -> tuple[tf.Tensor, tf.Tensor]:
    """A random fine window ``[W, W, W, C]`` holding ``landmark_voxel`` ``[3]``, and its window coordinates."""
    size = config.fine.window_size
    margin = FINE_MARGIN_VOXEL
    position_seed, linear_seed = augment.split_seed(seed, 2)
    aug = config.augmentation
    if aug.subvoxel_shift:
        window_voxel = augment.uniform(position_seed, [3], float(margin), float(size - 1 - margin))
    else:  # integer offsets: the landmark keeps its own fractional position
        fraction = landmark_voxel - tf.floor(landmark_voxel)
        window_voxel = fraction + tf.cast(augment.uniform_int(position_seed, tf.fill([3], margin),
                                                              tf.fill([3], size - 2 - margin)), tf.float32)
    if not augment.has_spatial_augmentation(aug):
        origin = landmark_voxel - window_voxel  # integer-valued without sub-voxel shifts
        if aug.subvoxel_shift:
            window = geometry.crop_with_shift_tf(inputs, origin, (size,) * 3)
        else:
            window = geometry.crop_with_padding_tf(inputs, tf.cast(tf.round(origin), tf.int32), (size,) * 3)
        return window, window_voxel
    linear = augment.random_linear_map(linear_seed, aug)
    offset = landmark_voxel - tf.linalg.matvec(linear, window_voxel)
    return geometry.sample_window_affine_tf(inputs, linear, offset, (size,) * 3), window_voxel


def _axis_labels(window_voxel: tf.Tensor, size: int, superresolution: int, factor: int) -> dict[str, tf.Tensor]:
    classes = geometry.window_voxel_to_class_tf(window_voxel, size, superresolution, factor=factor)
    return {"x": classes[..., 0], "y": classes[..., 1], "z": classes[..., 2]}


def make_sample_fn(config: Config, stage: str, spacing_mm: float, landmark_indices: list[int],
                   base_seed: int, with_metadata: bool):
    """The per-sample function ``(serialized, index) -> (inputs, labels[, metadata])``."""
    aug = config.augmentation
    indices = tf.constant(landmark_indices, tf.int32)
    num_landmarks = len(landmark_indices)

    def sample(serialized: tf.Tensor, index: tf.Tensor):
        record = parse_example(serialized)
        seed = tf.stack([tf.constant(base_seed, tf.int64), tf.cast(index, tf.int64)])
        raw_seed, normalized_seed, crop_seed, landmark_seed = augment.split_seed(seed, 4)
        volume = record["volume"]
        if augment.has_raw_augmentation(aug):
            volume = augment.augment_raw(volume, raw_seed, aug)
        inputs = preprocess(volume, spacing_mm, config.highpass_sigma_mm)
        inputs = augment.augment_normalized(inputs, normalized_seed, aug)
        landmarks_voxel = tf.gather(record["landmarks_voxel"], indices)
        if stage == "coarse":
            crop, window_voxel = coarse_crop(inputs, landmarks_voxel, crop_seed, config)
            size = config.coarse.padded_size
            labels = _axis_labels(window_voxel, size, config.superresolution, config.coarse.input_stride)
            features = {"volume": crop}
        else:
            k = augment.uniform_int(landmark_seed, tf.constant(0), tf.constant(num_landmarks - 1))
            crop, window_voxel = fine_crop(inputs, landmarks_voxel[k], crop_seed, config)
            size = config.fine.window_size
            labels = _axis_labels(window_voxel, size, config.superresolution, 1)
            features = {"window": crop, "landmark_index": k}
        if with_metadata:
            return features, labels, {"window_voxel": window_voxel, "subject": record["subject"]}
        return features, labels

    return sample


# ---------------------------------------------------------------------------------------------------------
# the dataset


def make_dataset(
    dataset_dir: str | Path,
    split: str,
    stage: str,
    config: Config,
    *,
    seed: int | None = None,
    deterministic: bool = False,
    repeat: bool = True,
    batch: bool = True,
    with_metadata: bool = False,
) -> tf.data.Dataset:
    """Random training crops from a prepared dataset (``mdgru-localize prepare``).

    Elements (before batching): coarse ``({"volume": [P,P,P,2]}, {"x","y","z": int32 [K]})``, fine
    ``({"window": [W,W,W,2], "landmark_index": int32 []}, {"x","y","z": int32 []})``; with ``with_metadata``
    a third ``{"window_voxel": float32 [K,3] or [3], "subject": string}``. ``batch=True`` batches
    ``config.training.batch_size`` (whole batches only when repeating).

    Sample ``i`` (counted from the start of the iteration) uses stateless random ops keyed by
    ``(seed, i)``. With ``deterministic=True`` and a seed, two iterations give identical samples in identical
    order; ``deterministic=False`` lets parallel work finish out of order (faster). The record order is
    shuffled in both cases (reshuffled every epoch unless deterministic). ``repeat=False`` gives one pass:
    one sample per subject.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    dataset_dir = Path(dataset_dir)
    description = read_description(dataset_dir)
    entry = _split_entry(description, dataset_dir, split)
    spacing_mm = _check_spacing(description, dataset_dir, config)
    landmark_indices = _landmark_indices(description, dataset_dir, config)
    files = [str(dataset_dir / name) for name in entry["shards"]]
    missing = [name for name in files if not Path(name).is_file()]
    if missing:
        raise InputError(missing[0], f"shard listed in {dataset_dir / 'dataset.json'} is missing")
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0])
    file_seed, record_seed, sample_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(3))
    reshuffle = not deterministic

    dataset = tf.data.Dataset.from_tensor_slices(files)
    dataset = dataset.shuffle(len(files), seed=file_seed, reshuffle_each_iteration=reshuffle)
    if len(files) > 1:
        dataset = dataset.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 4),
                                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    else:
        dataset = dataset.flat_map(tf.data.TFRecordDataset)
    dataset = dataset.shuffle(min(SHUFFLE_BUFFER, max(len(entry["subjects"]), 1)), seed=record_seed,
                              reshuffle_each_iteration=reshuffle)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.enumerate()
    sample = make_sample_fn(config, stage, spacing_mm, landmark_indices, sample_seed, with_metadata)
    dataset = dataset.map(lambda index, serialized: sample(serialized, index),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    if batch:
        dataset = dataset.batch(config.training.batch_size, drop_remainder=repeat)
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = deterministic
    return dataset.with_options(options)
