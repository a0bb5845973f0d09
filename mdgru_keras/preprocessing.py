"""Input preprocessing in TensorFlow: the volume and a high-pass copy, each z-normalized; and the clip of a scan's
intensity outliers that comes before it, on the scan's own voxels (:func:`clip_outliers_tf`).

The same function runs in the training pipeline, in local prediction and inside the exported SavedModel, so
that every stage sees identically prepared inputs.

The Gaussian smoothing behind the high-pass channel is separable: one 1D filter per axis. Each 1D filter is
applied as a matrix product with a banded ``[n, n]`` matrix that already contains the boundary handling
(``scipy.ndimage``'s ``mode="reflect"``: ``d c b a | a b c d | d c b a``, repeated for short axes). The dense
product wastes multiplications on zeros, but a single large matmul is what oneDNN does fastest; on a
193x229x193 volume it is about twice as fast as three ``conv3d`` calls with explicit padding (see
``docs/BENCH_DATA.md``), handles dynamic shapes (serving) and short axes without special cases.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

# Gaussian kernels are cut at this many standard deviations (scipy.ndimage's default).
TRUNCATE = 4.0


def gaussian_kernel_1d(sigma_voxel: float, truncate: float = TRUNCATE) -> np.ndarray:
    """Normalized 1D Gaussian weights of radius ``int(truncate * sigma + 0.5)`` (scipy's rule), float32.

    ``sigma_voxel <= 0`` gives the identity kernel ``[1.0]``.
    """
    if sigma_voxel <= 0:
        return np.ones(1, np.float32)
    radius = int(truncate * float(sigma_voxel) + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (offsets / float(sigma_voxel)) ** 2)
    return (weights / weights.sum()).astype(np.float32)


def reflect_band_matrix(size: tf.Tensor, kernel: np.ndarray) -> tf.Tensor:
    """``[size, size]`` float32 matrix ``B`` with ``(B @ signal)[i] = sum_t kernel[t] * signal[reflect(i + t - r)]``.

    ``reflect`` is scipy's ``mode="reflect"`` (the edge sample repeated), applied as often as needed, so any
    ``size >= 1`` works. ``size`` may be a dynamic scalar tensor.
    """
    size = tf.cast(size, tf.int32)
    length = int(kernel.shape[0])
    radius = length // 2
    rows = tf.range(size)[:, None] + tf.zeros([1, length], tf.int32)  # [n, L]
    source = rows + tf.range(length)[None, :] - radius
    period = 2 * size
    folded = tf.math.floormod(source, period)
    folded = tf.where(folded >= size, period - 1 - folded, folded)
    indices = tf.reshape(tf.stack([rows, folded], axis=-1), [-1, 2])
    weights = tf.reshape(tf.broadcast_to(tf.constant(kernel, tf.float32)[None, :], tf.shape(rows)), [-1])
    # scatter_nd sums duplicate indices: reflected taps that land on the same sample add up.
    return tf.scatter_nd(indices, weights, tf.stack([size, size]))


def gaussian_smooth_tf(volume: tf.Tensor, sigma_voxel: Sequence[float]) -> tf.Tensor:
    """Gaussian smoothing of ``volume[x, y, z]`` (float32) with per-axis ``sigma_voxel`` (Python floats).

    Matches ``scipy.ndimage.gaussian_filter(volume, sigma_voxel, mode="reflect", truncate=4.0)`` to float32
    round-off.
    """
    volume = tf.convert_to_tensor(volume, tf.float32)
    shape = tf.shape(volume)
    kx, ky, kz = (gaussian_kernel_1d(s) for s in sigma_voxel)
    out = volume
    if kx.shape[0] > 1:  # x: [X, X] @ [X, Y*Z]
        out = tf.reshape(tf.matmul(reflect_band_matrix(shape[0], kx), tf.reshape(out, [shape[0], -1])), shape)
    if ky.shape[0] > 1:  # y: [1, Y, Y] @ [X, Y, Z], the matrix broadcast over x
        out = tf.matmul(reflect_band_matrix(shape[1], ky)[None], out)
    if kz.shape[0] > 1:  # z: [X*Y, Z] @ [Z, Z]^T
        out = tf.reshape(
            tf.matmul(tf.reshape(out, [-1, shape[2]]), reflect_band_matrix(shape[2], kz), transpose_b=True), shape
        )
    return tf.ensure_shape(out, volume.shape)


def z_normalize_tf(volume: tf.Tensor, min_std: float | tf.Tensor = 0.0) -> tf.Tensor:
    """Zero mean and unit standard deviation over the whole tensor; zeros where the standard deviation is
    at most ``min_std`` (a constant tensor, up to round-off)."""
    mean, variance = tf.nn.moments(volume, axes=list(range(len(volume.shape))))
    std = tf.sqrt(variance)
    factor = tf.where(std > min_std, 1.0 / tf.maximum(std, 1e-30), 0.0)  # a scalar: one pass over the volume
    return (volume - mean) * factor


# The robust intensity range: the values at these percentiles of a strided subsample of the scan (every
# OUTLIER_SAMPLE_STRIDE-th voxel per axis; about 130k values of a 1 mm head, which top_k orders in 4 ms).
OUTLIER_PERCENTILE = 0.5
OUTLIER_SAMPLE_STRIDE = 4
# Smaller samples (a few thousand voxels or less: test volumes, not scans) are left as they are.
OUTLIER_MIN_SAMPLE = 200


def clip_outliers_tf(volume: tf.Tensor) -> tf.Tensor:
    """A scan ``[i, j, k]`` (float32, as its file stores it) clipped to ``[low - spread, high + spread]``, where
    ``low`` and ``high`` are its :data:`OUTLIER_PERCENTILE` and ``100 - OUTLIER_PERCENTILE`` percentiles and
    ``spread = high - low``.

    Why: z-normalization (:func:`preprocess`) divides by the standard deviation, and a few hot voxels (0.1 % of
    a head at 30 times its brightest tissue: spikes, a broken coil element) multiply it, so that the head itself
    is squashed towards zero: the shipped model then missed the landmarks of a rotated, resampled template by
    18.7 mm on average, and 0.65 mm with the clip (0.68 mm without hot voxels; ``tests/test_pretrained.py``). It
    acts on the scan's own voxels, before resampling spreads a hot voxel over its neighbours
    (:func:`mdgru_keras.io.read_volume` and the exported graph). None of 160 synthetic heads (the 88 training
    heads of ``make model-afids``, the benchmark's and the selection heads), nor ``make demo``'s scans, nor the two
    templates has a voxel beyond these limits (the brightest of the 72 benchmark and selection heads lies 0.57
    spreads above ``high``): for them the clip changes nothing, and trained models see what they were trained
    on.

    The percentiles are order statistics of the strided sample of ``n`` values: its ``k``-th smallest and largest,
    ``k = floor(n * OUTLIER_PERCENTILE / 100) + 1``. A sample of fewer than :data:`OUTLIER_MIN_SAMPLE` values, or
    with ``spread == 0`` (a mostly constant volume), leaves the volume as it is.
    """
    volume = tf.convert_to_tensor(volume, tf.float32)
    sample = tf.reshape(volume[::OUTLIER_SAMPLE_STRIDE, ::OUTLIER_SAMPLE_STRIDE, ::OUTLIER_SAMPLE_STRIDE], [-1])
    count = tf.size(sample)
    k = tf.cast(tf.cast(count, tf.float64) * (OUTLIER_PERCENTILE / 100.0), tf.int32) + 1
    high = tf.reduce_min(tf.math.top_k(sample, k, sorted=False).values)  # k <= n for any non-empty volume
    low = -tf.reduce_min(tf.math.top_k(-sample, k, sorted=False).values)
    spread = high - low
    usable = tf.logical_and(count >= OUTLIER_MIN_SAMPLE, spread > 0.0)
    infinity = tf.constant(np.inf, tf.float32)
    lowest, highest = tf.where(usable, low - spread, -infinity), tf.where(usable, high + spread, infinity)
    return tf.clip_by_value(volume, lowest, highest)


# Standard deviations below this fraction of the volume's largest magnitude are float32 round-off (e.g. the
# high-pass of a constant volume), not signal.
RELATIVE_STD_FLOOR = 1e-6


def _per_axis(value: float | Sequence[float], name: str) -> tuple[float, float, float]:
    values = np.broadcast_to(np.asarray(value, dtype=np.float64), (3,))
    if np.any(values <= 0) and name == "spacing_mm":
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return tuple(float(v) for v in values)


def preprocess(
    volume: tf.Tensor, spacing_mm: float | Sequence[float], highpass_sigma_mm: float
) -> tf.Tensor:
    """Network input ``[x, y, z, 2]`` float32 from a volume ``[x, y, z]``.

    Channel 0 is the volume, channel 1 a high-pass copy (the volume minus its Gaussian smoothing with
    ``highpass_sigma_mm / spacing_mm`` voxels standard deviation per axis); each channel is z-normalized over
    the whole volume (zero mean, unit standard deviation; a channel that is constant up to float32 round-off
    becomes zeros).

    ``spacing_mm`` (one number or one per axis) and ``highpass_sigma_mm`` are Python numbers: they fix the
    filter at trace time. The volume's shape may be dynamic.
    """
    spacing = _per_axis(spacing_mm, "spacing_mm")
    sigma_voxel = tuple(max(float(highpass_sigma_mm), 0.0) / s for s in spacing)
    volume = tf.cast(tf.convert_to_tensor(volume), tf.float32)
    highpass = volume - gaussian_smooth_tf(volume, sigma_voxel)
    min_std = RELATIVE_STD_FLOOR * tf.reduce_max(tf.abs(volume))
    return tf.stack([z_normalize_tf(volume, min_std), z_normalize_tf(highpass, min_std)], axis=-1)
