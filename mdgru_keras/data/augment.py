"""Training augmentation in TensorFlow, each part switched by ``config.augmentation`` (0 or false: off).

All randomness is stateless: every function takes a ``seed`` tensor ``[2]`` (int32/int64), so a sample is a
pure function of (dataset seed, sample index) and deterministic runs repeat exactly.

Where each part acts, and why:

* on the raw volume, before :func:`mdgru_keras.preprocessing.preprocess` (:func:`augment_raw`): gamma, a
  smooth multiplicative bias field and Gaussian noise -- non-linear or spatially varying changes that survive
  z-normalization and pass through the high-pass filter like real scanner effects;
* on the preprocessed (z-normalized) volume (:func:`augment_normalized`): intensity scale and shift, in
  standard deviations. Applied to the raw volume they would be undone exactly by z-normalization; applied
  before cropping they leave the zero padding of the crop at zero, as at inference;
* geometry (:func:`random_linear_map`): a rotation and an isotropic scaling, used by the pipeline as part of
  the single affine ``window -> volume`` map of each crop (see :mod:`mdgru_keras.geometry.training_crops`), so
  that only the crop is resampled and the landmarks move with the image exactly.
"""

from __future__ import annotations

import math

import tensorflow as tf

from mdgru_keras.config import AugmentationConfig
from mdgru_keras.geometry import affine_maps


def split_seed(seed: tf.Tensor, count: int) -> list[tf.Tensor]:
    """``count`` independent stateless seeds ``[2]`` derived from ``seed``."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=count)
    return [seeds[i] for i in range(count)]


def uniform(seed: tf.Tensor, shape: list[int] | tuple[int, ...], low: float | tf.Tensor,
            high: float | tf.Tensor) -> tf.Tensor:
    """Stateless float32 uniform samples in ``[low, high)``."""
    return tf.random.stateless_uniform(shape, seed, minval=low, maxval=high, dtype=tf.float32)


def uniform_int(seed: tf.Tensor, low: tf.Tensor, high: tf.Tensor) -> tf.Tensor:
    """Stateless uniform integers in the inclusive range ``[low, high]`` (elementwise, any shape, int32)."""
    low, high = tf.cast(low, tf.int32), tf.cast(high, tf.int32)
    u = tf.random.stateless_uniform(tf.shape(low), seed, dtype=tf.float32)
    span = tf.cast(high - low + 1, tf.float32)
    return low + tf.minimum(tf.cast(tf.floor(u * span), tf.int32), high - low)


# ---------------------------------------------------------------------------------------------------------
# raw volume


def random_gamma(volume: tf.Tensor, seed: tf.Tensor, max_log_gamma: float) -> tf.Tensor:
    """``min + range * ((v - min) / range) ** gamma`` with ``gamma = exp(U(-a, a))``."""
    gamma = tf.exp(uniform(seed, [], -max_log_gamma, max_log_gamma))
    low, high = tf.reduce_min(volume), tf.reduce_max(volume)
    extent = tf.maximum(high - low, 1e-12)
    return low + extent * tf.pow((volume - low) / extent, gamma)


def smooth_field(seed: tf.Tensor, shape: tf.Tensor, order: int = 2) -> tf.Tensor:
    """A smooth random field ``[x, y, z]`` in ``[-1, 1]``: cosines up to ``order`` half-periods per axis with
    uniform random coefficients, divided by the sum of their magnitudes (a bound of the field's maximum)."""
    terms = order + 1
    coefficients = uniform(seed, [terms, terms, terms], -1.0, 1.0)
    coefficients /= tf.maximum(tf.reduce_sum(tf.abs(coefficients)), 1e-6)

    def basis(size: tf.Tensor) -> tf.Tensor:  # [size, terms]
        position = tf.cast(tf.range(size), tf.float32) / tf.cast(tf.maximum(size - 1, 1), tf.float32)
        return tf.cos(math.pi * position[:, None] * tf.range(terms, dtype=tf.float32)[None, :])

    field = tf.einsum("ijk,zk->ijz", coefficients, basis(shape[2]))
    field = tf.einsum("ijz,yj->iyz", field, basis(shape[1]))
    return tf.einsum("iyz,xi->xyz", field, basis(shape[0]))


def random_bias_field(volume: tf.Tensor, seed: tf.Tensor, amplitude: float) -> tf.Tensor:
    """Multiply ``v - min`` by ``exp(amplitude * field)`` with a smooth field in ``[-1, 1]``."""
    low = tf.reduce_min(volume)
    field = smooth_field(seed, tf.shape(volume))
    return low + (volume - low) * tf.exp(amplitude * field)


def random_noise(volume: tf.Tensor, seed: tf.Tensor, std_fraction: float) -> tf.Tensor:
    """Add Gaussian noise of ``std_fraction`` times the volume's standard deviation."""
    std = tf.math.reduce_std(volume)
    return volume + std_fraction * std * tf.random.stateless_normal(tf.shape(volume), seed, dtype=volume.dtype)


def augment_raw(volume: tf.Tensor, seed: tf.Tensor, config: AugmentationConfig) -> tf.Tensor:
    """Gamma, bias field and noise on the raw volume ``[x, y, z]`` (each only if switched on)."""
    gamma_seed, bias_seed, noise_seed = split_seed(seed, 3)
    if config.gamma > 0:
        volume = random_gamma(volume, gamma_seed, config.gamma)
    if config.bias_field > 0:
        volume = random_bias_field(volume, bias_seed, config.bias_field)
    if config.noise_std > 0:
        volume = random_noise(volume, noise_seed, config.noise_std)
    return volume


def has_raw_augmentation(config: AugmentationConfig) -> bool:
    return config.gamma > 0 or config.bias_field > 0 or config.noise_std > 0


# ---------------------------------------------------------------------------------------------------------
# preprocessed volume


def augment_normalized(inputs: tf.Tensor, seed: tf.Tensor, config: AugmentationConfig) -> tf.Tensor:
    """Intensity scale (both channels, ``1 + U(-a, a)``) and shift (channel 0, ``U(-b, b)`` standard
    deviations) of a preprocessed ``[x, y, z, 2]`` volume."""
    scale_seed, shift_seed = split_seed(seed, 2)
    if config.intensity_scale > 0:
        inputs = inputs * (1.0 + uniform(scale_seed, [], -config.intensity_scale, config.intensity_scale))
    if config.intensity_shift > 0:
        shift = uniform(shift_seed, [], -config.intensity_shift, config.intensity_shift)
        inputs = inputs + tf.stack([shift, tf.zeros_like(shift)])
    return inputs


def augment_normalized_window(window: tf.Tensor, inside: tf.Tensor, seed: tf.Tensor,
                              config: AugmentationConfig) -> tf.Tensor:
    """:func:`augment_normalized` of the volume followed by an axis-aligned crop, computed on the crop alone.

    ``window`` ``[W, W, W, 2]`` is the crop of the unaugmented volume, ``inside`` ``[W, W, W]`` the same crop of
    a volume of ones (:func:`~mdgru_keras.geometry.training_crops.window_inside_weight_tf`). Scaling commutes
    with cropping and interpolation; the shift reaches a window voxel in proportion to its inside weight (the
    zero padding stays zero). Same random numbers as :func:`augment_normalized`, window-sized work instead of
    whole-volume work (the whole-volume form made the training pipeline, not the network, the bottleneck of a
    training step).
    """
    scale_seed, shift_seed = split_seed(seed, 2)
    if config.intensity_scale > 0:
        window = window * (1.0 + uniform(scale_seed, [], -config.intensity_scale, config.intensity_scale))
    if config.intensity_shift > 0:
        shift = uniform(shift_seed, [], -config.intensity_shift, config.intensity_shift)
        window = window + tf.stack([shift * inside, tf.zeros_like(inside)], axis=-1)
    return window


# ---------------------------------------------------------------------------------------------------------
# geometry


def has_spatial_augmentation(config: AugmentationConfig) -> bool:
    return config.rotation_deg > 0 or config.scaling > 0


def random_linear_map(seed: tf.Tensor, config: AugmentationConfig) -> tf.Tensor:
    """Linear part ``[3, 3]`` of a crop's ``window -> volume`` map: ``(1 + U(-s, s)) * R`` with ``R`` a
    rotation by ``U(-a, a)`` degrees about each axis. Identity when both are off."""
    angle_seed, scale_seed = split_seed(seed, 2)
    linear = tf.eye(3, dtype=tf.float32)
    if config.rotation_deg > 0:
        limit = math.radians(config.rotation_deg)
        linear = affine_maps.rotation_matrix_tf(uniform(angle_seed, [3], -limit, limit))
    if config.scaling > 0:
        linear = linear * (1.0 + uniform(scale_seed, [], -config.scaling, config.scaling))
    return linear
