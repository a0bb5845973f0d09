"""The ``tf.data`` pipeline of random training crops (contract: ``docs/ARCHITECTURE.md``, "tf.data pipeline").

Per sample: parse and decode the volume -> raw-intensity augmentation -> :func:`preprocess` of the whole
volume -> intensity scale/shift -> one crop:

* ``coarse``: a ``P = config.coarse.padded_size`` region centred on the volume plus a uniform random integer
  offset of up to ``config.coarse.offset_range_voxel`` per axis, restricted so that all landmarks stay at
  least :data:`COARSE_MARGIN_VOXEL` inside; zero-padded outside the volume.
* ``fine``: a ``W = config.fine.window_size`` window placed for landmark ``k`` (uniform), labelled for every
  landmark inside it (a mask marks which), with landmark ``k`` at a uniform random
  position at least :data:`FINE_MARGIN_VOXEL` from the border; with ``augmentation.subvoxel_shift`` that
  position is continuous (trilinear resampling) so that training sees every coordinate class, not only the
  class of the landmark's own fractional position.

With rotation or scaling on, the crop is resampled through one affine ``window -> volume`` map (sub-voxel
shift included) and the landmark coordinates are mapped with the same matrix. Labels are coordinate classes
from :func:`~mdgru_keras.geometry.coordinate_classes.window_voxel_to_class_tf`, the inverse of the decoding used
at inference.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import tensorflow as tf

from mdgru_keras.config import Config
from mdgru_keras.data import augment
from mdgru_keras.data.records import parse_example, read_description
from mdgru_keras.errors import InputError
from mdgru_keras.geometry.coordinate_classes import window_voxel_to_class_tf
from mdgru_keras.geometry.training_crops import (
    crop_with_shift_tf,
    mass_centred_window_origin_tf,
    sample_window_affine_tf,
    volume_voxel_to_window_voxel_tf,
    window_inside_weight_tf,
    window_origin_bounds_tf,
)
from mdgru_keras.geometry.windows import centered_window_origin_tf, crop_with_padding_tf
from mdgru_keras.preprocessing import preprocess

STAGES = ("coarse", "fine")
FINE_MARGIN_VOXEL = 2  # a fine-window landmark is at least this far from the window border
COARSE_MARGIN_VOXEL = 4  # and a coarse-region landmark (plus the coarse stride, see _coarse_margin)
SHUFFLE_BUFFER = 16  # serialized whole-volume examples (about 17 MB each at 1 mm)
# Preprocessed subjects kept in memory (about 70 MB each at 193x229x193; 45 MB for the AFIDs population's
# 175x201x162 heads, 3.6 GB for its 80). Without the cache every sample decodes and high-pass filters a whole
# volume: about 0.3 CPU-s per sample, which made model-afids's training steps twice as slow as the network.
# A fixed count, not a share of this machine's memory: the cache changes the record order, and every machine
# must train the same model.
CACHE_MAX_SUBJECTS = 128


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
    """:func:`sample_window_affine_tf` compiled with XLA, for large (coarse) windows.

    XLA fuses the index, weight and gather arithmetic of the 8 neighbours: on 2 CPU cores a 256^3 window of
    a 193x229x193x2 volume takes ~0.25-0.95 s instead of ~3.5-6.5 s. XLA compiles once per distinct volume
    shape (~1.5 s each); for 64^3 windows it gains nothing, so the fine stage does not use it.
    """
    return tf.function(
        lambda volume, linear, offset: sample_window_affine_tf(
            volume, linear, offset, window_size, slab=window_size[0]
        ),
        jit_compile=True,
    )


def coarse_centre_origin(inputs: tf.Tensor, config: Config) -> tf.Tensor:
    """The origin ``[3]`` of the coarse region before any offset, as inference places it (``coarse.centre``)."""
    size = config.coarse.padded_size
    if config.coarse.centre == "mass":
        return mass_centred_window_origin_tf(inputs[..., 0], size)
    return centered_window_origin_tf(tf.shape(inputs)[:3], size)


def coarse_crop(inputs: tf.Tensor, landmarks_voxel: tf.Tensor, seed: tf.Tensor,
                config: Config, intensity_seed: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """A random coarse region ``[P, P, P, C]`` of a preprocessed volume and the landmarks in it ``[K, 3]``.

    ``intensity_seed``: also apply :func:`augment.augment_normalized` (as if to the whole volume first)."""
    size = config.coarse.padded_size
    margin = _coarse_margin(config)
    origin_seed, linear_seed = augment.split_seed(seed, 2)
    low, high = window_origin_bounds_tf(
        tf.shape(inputs)[:3], landmarks_voxel, size, config.coarse.offset_range_voxel, margin,
        centre_origin=coarse_centre_origin(inputs, config),
    )
    origin = augment.uniform_int(origin_seed, low, high)
    if not augment.has_spatial_augmentation(config.augmentation):
        window_voxel = landmarks_voxel - tf.cast(origin, tf.float32)
        window = crop_with_padding_tf(inputs, origin, (size,) * 3)
        if intensity_seed is not None:
            inside = window_inside_weight_tf(tf.shape(inputs)[:3], origin, (size,) * 3)
            window = augment.augment_normalized_window(window, inside, intensity_seed, config.augmentation)
        return window, window_voxel
    if intensity_seed is not None:
        inputs = augment.augment_normalized(inputs, intensity_seed, config.augmentation)
    # rotate and scale about the region's centre; fall back to the plain crop if a landmark would leave it
    centre = tf.fill([3], (size - 1) / 2.0)
    linear = augment.random_linear_map(linear_seed, config.augmentation)
    offset = tf.cast(origin, tf.float32) + centre - tf.linalg.matvec(linear, centre)
    window_voxel = volume_voxel_to_window_voxel_tf(landmarks_voxel, linear, offset)
    inside = tf.reduce_all((window_voxel >= margin) & (window_voxel <= size - 1 - margin))
    linear = tf.where(inside, linear, tf.eye(3))
    offset = tf.where(inside, offset, tf.cast(origin, tf.float32))
    window_voxel = volume_voxel_to_window_voxel_tf(landmarks_voxel, linear, offset)
    return _compiled_window_sampler((size,) * 3)(inputs, linear, offset), window_voxel


def fine_crop(inputs: tf.Tensor, landmarks_voxel: tf.Tensor, k: tf.Tensor, seed: tf.Tensor,
              config: Config, intensity_seed: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """A random fine window ``[W, W, W, C]`` holding landmark ``k`` of ``landmarks_voxel`` ``[K, 3]`` at a random
    position, and the window coordinates of *all* K landmarks ``[K, 3]`` (those of the others may lie outside:
    :func:`fine_landmark_mask`). ``intensity_seed``: as in :func:`coarse_crop`."""
    size = config.fine.window_size
    margin = FINE_MARGIN_VOXEL
    landmark_voxel = landmarks_voxel[k]
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
            window = crop_with_shift_tf(inputs, origin, (size,) * 3)
        else:
            origin = tf.round(origin)
            window = crop_with_padding_tf(inputs, tf.cast(origin, tf.int32), (size,) * 3)
        if intensity_seed is not None:
            inside = window_inside_weight_tf(tf.shape(inputs)[:3], origin, (size,) * 3)
            window = augment.augment_normalized_window(window, inside, intensity_seed, aug)
        return window, landmarks_voxel - origin[None, :]
    if intensity_seed is not None:
        inputs = augment.augment_normalized(inputs, intensity_seed, aug)
    linear = augment.random_linear_map(linear_seed, aug)
    offset = landmark_voxel - tf.linalg.matvec(linear, window_voxel)
    all_window_voxel = volume_voxel_to_window_voxel_tf(landmarks_voxel, linear, offset)
    return sample_window_affine_tf(inputs, linear, offset, (size,) * 3), all_window_voxel


def fine_landmark_mask(window_voxel: tf.Tensor, window_size: int) -> tf.Tensor:
    """float32 ``[..., K]``: 1 where a landmark's window coordinates ``[..., K, 3]`` lie at least
    :data:`FINE_MARGIN_VOXEL` inside the window on every axis (the range the sampled landmark is drawn from, so
    every trained position is one the network also sees as the window's own landmark), 0 elsewhere."""
    inside = (window_voxel >= FINE_MARGIN_VOXEL) & (window_voxel <= window_size - 1 - FINE_MARGIN_VOXEL)
    return tf.cast(tf.reduce_all(inside, axis=-1), tf.float32)


def _axis_labels(window_voxel: tf.Tensor, size: int, superresolution: int, factor: int) -> dict[str, tf.Tensor]:
    classes = window_voxel_to_class_tf(window_voxel, size, superresolution, factor=factor)
    return {"x": classes[..., 0], "y": classes[..., 1], "z": classes[..., 2]}


def make_sample_fn(config: Config, stage: str, spacing_mm: float, landmark_indices: list[int],
                   base_seed: int, with_metadata: bool):
    """The per-sample function ``(serialized, index) -> (inputs, labels[, metadata])``."""
    aug = config.augmentation
    indices = tf.constant(landmark_indices, tf.int32)
    num_landmarks = len(landmark_indices)

    def sample_from(inputs: tf.Tensor, landmarks_all_voxel: tf.Tensor, subject: tf.Tensor, index: tf.Tensor):
        """Crop sample ``index`` from a preprocessed volume ``[x,y,z,2]``."""
        seed = tf.stack([tf.constant(base_seed, tf.int64), tf.cast(index, tf.int64)])
        _, normalized_seed, crop_seed, landmark_seed = augment.split_seed(seed, 4)
        # intensity scale/shift: applied by the crop functions to the crop alone (same result as to the volume)
        landmarks_voxel = tf.gather(landmarks_all_voxel, indices)
        if stage == "coarse":
            crop, window_voxel = coarse_crop(inputs, landmarks_voxel, crop_seed, config, normalized_seed)
            size = config.coarse.padded_size
            labels = _axis_labels(window_voxel, size, config.superresolution, config.coarse.input_stride)
            features = {"volume": crop}
        else:
            # the window is placed for landmark k (uniform over landmarks) and trains every landmark inside it
            k = augment.uniform_int(landmark_seed, tf.constant(0), tf.constant(num_landmarks - 1))
            crop, window_voxel = fine_crop(inputs, landmarks_voxel, k, crop_seed, config, normalized_seed)
            size = config.fine.window_size
            labels = _axis_labels(window_voxel, size, config.superresolution, 1)
            mask = fine_landmark_mask(window_voxel, size)
            labels["mask"] = tf.tensor_scatter_nd_update(mask, [[k]], [1.0])  # k itself: always (float rounding)
            features = {"window": crop}
            if with_metadata:
                return features, labels, {"window_voxel": window_voxel, "subject": subject, "landmark_index": k}
            return features, labels
        if with_metadata:
            return features, labels, {"window_voxel": window_voxel, "subject": subject}
        return features, labels

    def sample(serialized: tf.Tensor, index: tf.Tensor):
        record = parse_example(serialized)
        seed = tf.stack([tf.constant(base_seed, tf.int64), tf.cast(index, tf.int64)])
        raw_seed = augment.split_seed(seed, 4)[0]
        volume = record["volume"]
        if augment.has_raw_augmentation(aug):
            volume = augment.augment_raw(volume, raw_seed, aug)
        inputs = preprocess(volume, spacing_mm, config.highpass_sigma_mm)
        return sample_from(inputs, record["landmarks_voxel"], record["subject"], index)

    def preprocessed(serialized: tf.Tensor):
        """The per-subject part that does not depend on the sample (no raw-intensity augmentation)."""
        record = parse_example(serialized)
        inputs = preprocess(record["volume"], spacing_mm, config.highpass_sigma_mm)
        return inputs, record["landmarks_voxel"], record["subject"]

    sample.sample_from = sample_from
    sample.preprocessed = preprocessed
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
    start_index: int = 0,
    cache_preprocessed: bool | None = None,
) -> tf.data.Dataset:
    """Random training crops from a prepared dataset (``mdgru-localize prepare``).

    Elements (before batching): coarse ``({"volume": [P,P,P,2]}, {"x","y","z": int32 [K]})``, fine
    ``({"window": [W,W,W,2]}, {"x","y","z": int32 [K], "mask": float32 [K]})`` (the window is placed for one
    landmark, drawn uniformly, and ``mask`` marks every landmark inside it: :func:`fine_landmark_mask`); with
    ``with_metadata`` a third ``{"window_voxel": float32 [K,3], "subject": string}``, for fine samples also
    ``"landmark_index": int32 []``, the landmark the window was placed for. ``batch=True`` batches
    ``config.training.batch_size`` (whole batches only when repeating).

    Sample ``i`` (counted from the start of the iteration) uses stateless random ops keyed by
    ``(seed, i)``. With ``deterministic=True`` and a seed, two iterations give identical samples in identical
    order; ``deterministic=False`` lets parallel work finish out of order (faster). The record order is
    shuffled in both cases (reshuffled every epoch unless deterministic). ``repeat=False`` gives one pass:
    one sample per subject.

    ``start_index`` (with ``repeat`` and ``deterministic``): begin at sample ``start_index`` of that endless
    sequence, exactly as if that many samples had been drawn before (how a resumed training run continues).
    It reads and skips ``start_index mod N`` serialized records (N: subjects in the split); nothing is decoded.

    ``cache_preprocessed`` (default: when there is no raw-intensity augmentation and at most
    ``CACHE_MAX_SUBJECTS`` subjects): decode and preprocess each subject once and keep the result in memory
    (about 70 MB per 193x229x193 subject), so later epochs only crop. Crops are the same as without the cache.
    """
    if start_index and not (repeat and deterministic):
        raise ValueError("start_index needs repeat=True and deterministic=True")
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

    sample = make_sample_fn(config, stage, spacing_mm, landmark_indices, sample_seed, with_metadata)
    subjects = max(len(entry["subjects"]), 1)
    if cache_preprocessed is None:
        cache_preprocessed = not augment.has_raw_augmentation(config.augmentation) and subjects <= CACHE_MAX_SUBJECTS
    if cache_preprocessed and augment.has_raw_augmentation(config.augmentation):
        raise ValueError("cache_preprocessed needs a config without raw-intensity augmentation")

    if cache_preprocessed:
        # Subjects are decoded and preprocessed once (in file order), kept in memory, then shuffled per pass.
        dataset = tf.data.Dataset.from_tensor_slices(files).flat_map(tf.data.TFRecordDataset)
        dataset = dataset.map(sample.preprocessed, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        dataset = dataset.cache()
        dataset = dataset.shuffle(subjects, seed=record_seed, reshuffle_each_iteration=reshuffle)
        if repeat:
            dataset = dataset.repeat()
        if start_index:
            dataset = dataset.skip(start_index % subjects)
        dataset = dataset.enumerate(start=start_index)
        dataset = dataset.map(lambda index, element: sample.sample_from(*element, index),
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    else:
        dataset = tf.data.Dataset.from_tensor_slices(files)
        dataset = dataset.shuffle(len(files), seed=file_seed, reshuffle_each_iteration=reshuffle)
        if len(files) > 1:
            dataset = dataset.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 4),
                                         num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
        else:
            dataset = dataset.flat_map(tf.data.TFRecordDataset)
        dataset = dataset.shuffle(min(SHUFFLE_BUFFER, subjects), seed=record_seed,
                                  reshuffle_each_iteration=reshuffle)
        if repeat:
            dataset = dataset.repeat()
        if start_index:  # every pass has the same record order (deterministic): skip within the first pass only
            dataset = dataset.skip(start_index % subjects)
        dataset = dataset.enumerate(start=start_index)
        dataset = dataset.map(lambda index, serialized: sample(serialized, index),
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    if batch:
        dataset = dataset.batch(config.training.batch_size, drop_remainder=repeat)
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = deterministic
    return dataset.with_options(options)
