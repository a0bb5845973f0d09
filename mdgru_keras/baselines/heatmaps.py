"""Gaussian heatmaps of points in a window, and their sub-voxel decoding: the targets and the output of the
3D U-Net baseline (:mod:`mdgru_keras.baselines.unet`).

A heatmap of a point at continuous ``window_voxel`` is the isotropic Gaussian
``amplitude * exp(-|v - window_voxel|^2 / (2 sigma^2))`` sampled at the voxel centres ``v`` (integers) of a
``size^3`` window. Its logarithm is a quadratic in each axis, so a parabola through the log-values at the peak
voxel and its two neighbours recovers a sub-voxel centre exactly; that is how it is decoded.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def gaussian_heatmap(
    window_voxel: np.ndarray, window_size: int, sigma_voxel: float, amplitude: float = 1.0
) -> np.ndarray:
    """Gaussian heatmaps ``[..., W, W, W]`` (float32) centred at continuous ``window_voxel[..., 3]``."""
    centre = np.asarray(window_voxel, dtype=np.float64)[..., None]  # [..., 3, 1]
    grid = np.arange(window_size, dtype=np.float64)
    per_axis = np.exp(-((grid - centre) ** 2) / (2.0 * sigma_voxel**2))  # [..., 3, W]
    heatmap = per_axis[..., 0, :, None, None] * per_axis[..., 1, None, :, None] * per_axis[..., 2, None, None, :]
    return (amplitude * heatmap).astype(np.float32)


def gaussian_heatmap_tf(
    window_voxel: tf.Tensor, window_size: int, sigma_voxel: float, amplitude: float = 1.0
) -> tf.Tensor:
    """TensorFlow form of :func:`gaussian_heatmap` (float32)."""
    centre = tf.cast(window_voxel, tf.float32)[..., None]
    grid = tf.range(window_size, dtype=tf.float32)
    per_axis = tf.exp(-tf.square(grid - centre) / (2.0 * sigma_voxel**2))
    heatmap = per_axis[..., 0, :, None, None] * per_axis[..., 1, None, :, None] * per_axis[..., 2, None, None, :]
    return amplitude * heatmap


def heatmap_peak(heatmap: np.ndarray, floor_fraction: float = 1e-3) -> np.ndarray:
    """Sub-voxel window coordinate ``[..., 3]`` of the maximum of ``heatmap[..., W, W, W]``.

    The integer argmax, refined per axis by the vertex of the parabola through the *log* values at the peak
    and its two neighbours along that axis (exact for a Gaussian). Values below ``floor_fraction`` of the
    peak are raised to it first, so a network output that is zero or negative beside its peak still gives a
    finite log; at the window border, or where the three points are not concave, that axis keeps the integer
    peak. The offset is clipped to ``[-0.5, 0.5]``.
    """
    h = np.asarray(heatmap, dtype=np.float64)
    batch_shape, spatial = h.shape[:-3], h.shape[-3:]
    flat = h.reshape((-1,) + spatial)
    result = np.zeros((flat.shape[0], 3), dtype=np.float64)
    for b, volume in enumerate(flat):
        peak = np.array(np.unravel_index(np.argmax(volume), spatial))
        result[b] = peak
        top = volume[tuple(peak)]
        if not top > 0:  # no positive peak: nothing to refine on a log scale
            continue
        floor = top * floor_fraction
        for axis in range(3):
            if peak[axis] == 0 or peak[axis] == spatial[axis] - 1:
                continue
            index = list(peak)
            index[axis] = peak[axis] - 1
            left = np.log(max(volume[tuple(index)], floor))
            index[axis] = peak[axis] + 1
            right = np.log(max(volume[tuple(index)], floor))
            mid = np.log(top)
            curvature = left - 2.0 * mid + right
            if curvature < -1e-12:
                result[b, axis] += np.clip(0.5 * (left - right) / curvature, -0.5, 0.5)
    return result.reshape(batch_shape + (3,))
