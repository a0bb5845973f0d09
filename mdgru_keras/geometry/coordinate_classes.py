"""Coordinate classes: a window coordinate coded as a class per axis, and per-axis class probabilities
decoded back to a coordinate.

A window of ``size`` input voxels seen by a network with input downsampling ``factor`` (4 for the coarse stage,
1 for the fine stage) and superresolution ``n`` has ``C = n * size / factor`` classes per axis. Class ``k``
covers the window interval ``[k * w - 0.5, (k + 1) * w - 0.5)`` with width ``w = factor / n`` voxels, and
decodes to its *centre* ``(k + 0.5) * w - 0.5``. For ``factor = 1, n = 1`` class ``k`` is voxel ``k``.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

# ---------------------------------------------------------------------------------------------------------
# coordinate <-> class


def num_classes(window_size: int, superresolution: int, factor: int = 1) -> int:
    """Number of coordinate classes along an axis of ``window_size`` voxels (see module docstring)."""
    if window_size % factor:
        raise ValueError(f"window size {window_size} is not a multiple of the downsampling factor {factor}")
    return superresolution * window_size // factor


def class_width_voxel(superresolution: int, factor: int = 1) -> float:
    """Width of one coordinate class in input voxels."""
    return factor / superresolution


def window_voxel_to_class(
    window_voxel: np.ndarray, window_size: int, superresolution: int, factor: int = 1
) -> np.ndarray:
    """Class index (int) of continuous window coordinates; clipped to the valid classes."""
    width = class_width_voxel(superresolution, factor)
    classes = num_classes(window_size, superresolution, factor)
    index = np.floor((np.asarray(window_voxel, dtype=np.float64) + 0.5) / width).astype(np.int64)
    return np.clip(index, 0, classes - 1)


def window_voxel_to_class_tf(
    window_voxel: tf.Tensor, window_size: int, superresolution: int, factor: int = 1
) -> tf.Tensor:
    """TensorFlow form of :func:`window_voxel_to_class` (int32)."""
    width = class_width_voxel(superresolution, factor)
    classes = num_classes(window_size, superresolution, factor)
    index = tf.cast(tf.floor((tf.cast(window_voxel, tf.float32) + 0.5) / width), tf.int32)
    return tf.clip_by_value(index, 0, classes - 1)


def class_to_window_voxel(class_index: np.ndarray, superresolution: int, factor: int = 1) -> np.ndarray:
    """Window coordinate of a (possibly fractional) class index: the class centre."""
    width = class_width_voxel(superresolution, factor)
    return (np.asarray(class_index, dtype=np.float64) + 0.5) * width - 0.5


def class_to_window_voxel_tf(class_index: tf.Tensor, superresolution: int, factor: int = 1) -> tf.Tensor:
    """TensorFlow form of :func:`class_to_window_voxel` (float32)."""
    width = class_width_voxel(superresolution, factor)
    return (tf.cast(class_index, tf.float32) + 0.5) * width - 0.5


# ---------------------------------------------------------------------------------------------------------
# decoding of per-axis probability vectors


def parabola_peak(probabilities: np.ndarray) -> np.ndarray:
    """Sub-class position of the peak of ``probabilities[..., C]``: argmax plus the vertex offset of the
    parabola through the peak and its two neighbours.

    Guards: at the first and last class, and where the three points are flat or not concave, the argmax is
    returned unchanged; the offset is clipped to ``[-0.5, 0.5]``.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    peak = np.argmax(p, axis=-1)
    classes = p.shape[-1]
    left = np.take_along_axis(p, np.clip(peak - 1, 0, classes - 1)[..., None], -1)[..., 0]
    mid = np.take_along_axis(p, peak[..., None], -1)[..., 0]
    right = np.take_along_axis(p, np.clip(peak + 1, 0, classes - 1)[..., None], -1)[..., 0]
    curvature = left - 2.0 * mid + right
    interior = (peak > 0) & (peak < classes - 1)
    valid = interior & (curvature < -1e-12)
    offset = np.where(valid, 0.5 * (left - right) / np.where(valid, curvature, -1.0), 0.0)
    return peak + np.clip(offset, -0.5, 0.5)


def parabola_peak_tf(probabilities: tf.Tensor) -> tf.Tensor:
    """TensorFlow form of :func:`parabola_peak` (float32)."""
    p = tf.cast(probabilities, tf.float32)
    classes = tf.shape(p)[-1]
    peak = tf.argmax(p, axis=-1, output_type=tf.int32)
    left = tf.gather(p, tf.clip_by_value(peak - 1, 0, classes - 1), batch_dims=len(p.shape) - 1)
    mid = tf.gather(p, peak, batch_dims=len(p.shape) - 1)
    right = tf.gather(p, tf.clip_by_value(peak + 1, 0, classes - 1), batch_dims=len(p.shape) - 1)
    curvature = left - 2.0 * mid + right
    interior = tf.logical_and(peak > 0, peak < classes - 1)
    valid = tf.logical_and(interior, curvature < -1e-12)
    safe = tf.where(valid, curvature, -tf.ones_like(curvature))
    offset = tf.where(valid, 0.5 * (left - right) / safe, tf.zeros_like(curvature))
    return tf.cast(peak, tf.float32) + tf.clip_by_value(offset, -0.5, 0.5)


def decode_axis(probabilities: np.ndarray, superresolution: int, factor: int = 1, parabola: bool = True) -> np.ndarray:
    """Window coordinate decoded from per-axis class probabilities ``[..., C]``."""
    position = parabola_peak(probabilities) if parabola else np.argmax(probabilities, axis=-1)
    return class_to_window_voxel(position, superresolution, factor)


def decode_axis_tf(probabilities: tf.Tensor, superresolution: int, factor: int = 1, parabola: bool = True) -> tf.Tensor:
    """TensorFlow form of :func:`decode_axis` (float32)."""
    if parabola:
        position = parabola_peak_tf(probabilities)
    else:
        position = tf.cast(tf.argmax(probabilities, axis=-1), tf.float32)
    return class_to_window_voxel_tf(position, superresolution, factor)


# ---------------------------------------------------------------------------------------------------------
# peak mass: the per-axis ingredient of the localizer's confidence


def peak_mass(probabilities: np.ndarray) -> np.ndarray:
    """Probability mass of the argmax class and its two neighbours, ``probabilities[..., C]`` -> ``[...]``.

    The per-axis ingredient of the localizer's confidence: the probability that the coordinate lies within
    one class of the decoded peak (with superresolution several classes share a voxel, so the peak class
    alone understates a sharp prediction).
    """
    p = np.asarray(probabilities, dtype=np.float64)
    classes = p.shape[-1]
    peak = np.argmax(p, axis=-1)[..., None]
    total = np.take_along_axis(p, peak, -1)[..., 0]
    for shift in (-1, 1):
        neighbour = peak + shift
        inside = (neighbour >= 0) & (neighbour < classes)
        value = np.take_along_axis(p, np.clip(neighbour, 0, classes - 1), -1)
        total = total + np.where(inside, value, 0.0)[..., 0]
    return total


def peak_mass_tf(probabilities: tf.Tensor) -> tf.Tensor:
    """TensorFlow form of :func:`peak_mass` (float32)."""
    p = tf.cast(probabilities, tf.float32)
    classes = tf.shape(p)[-1]
    batch_dims = len(p.shape) - 1
    peak = tf.argmax(p, axis=-1, output_type=tf.int32)
    total = tf.gather(p, peak, batch_dims=batch_dims)
    for shift in (-1, 1):
        neighbour = peak + shift
        inside = tf.logical_and(neighbour >= 0, neighbour < classes)
        value = tf.gather(p, tf.clip_by_value(neighbour, 0, classes - 1), batch_dims=batch_dims)
        total = total + tf.where(inside, value, tf.zeros_like(value))
    return total


# ---------------------------------------------------------------------------------------------------------
# pooled decoding: the n = 1 rows of Table 1a from a model trained with superresolution n
#
# With superresolution ``n`` the classes are aligned with the classes of ``n = 1``: class ``k`` (width
# ``w = factor / n``) lies inside the ``n = 1`` class ``k // n`` (width ``factor``), so ``n = 1`` class ``j``
# is exactly the union of the ``n`` classes ``j*n .. j*n + n - 1`` (for the fine stage, ``factor = 1``: voxel
# ``j``). Summing each group of ``n`` probabilities therefore gives the model's own distribution over ``n = 1``
# classes, which decodes with ``superresolution = 1`` (:func:`decode_axis`) like the output of a model trained
# with ``n = 1``.


def pool_classes(probabilities: np.ndarray, superresolution: int) -> np.ndarray:
    """Probabilities of the ``n = 1`` classes: ``probabilities[..., C]`` -> ``[..., C // n]``, summing each
    class group ``j*n .. j*n + n - 1``. ``C`` must be a multiple of ``n``."""
    p = np.asarray(probabilities, dtype=np.float64)
    classes = p.shape[-1]
    if superresolution < 1 or classes % superresolution:
        raise ValueError(f"{classes} classes cannot be pooled in groups of superresolution {superresolution}")
    return p.reshape(p.shape[:-1] + (classes // superresolution, superresolution)).sum(axis=-1)


def pool_classes_tf(probabilities: tf.Tensor, superresolution: int) -> tf.Tensor:
    """TensorFlow form of :func:`pool_classes` (float32)."""
    p = tf.cast(probabilities, tf.float32)
    if superresolution == 1:
        return p
    shape = tf.shape(p)
    grouped = tf.reshape(p, tf.concat([shape[:-1], [shape[-1] // superresolution, superresolution]], axis=0))
    return tf.reduce_sum(grouped, axis=-1)
