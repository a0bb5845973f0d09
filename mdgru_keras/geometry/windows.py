"""Windows: axis-aligned blocks of a volume, where they are placed and how they are cut out.

A *window* of ``window_size`` voxels per axis starts at an integer ``window_origin_voxel``:
``window_voxel = volume_voxel - window_origin_voxel``. Where it reaches outside the volume it is zero-padded.
The coarse stage's window is centred on the volume (:func:`centered_window_origin`), each fine window on a
point (:func:`window_origin_around`), and points close together share one fine window
(:func:`shared_window_groups`).
"""

from __future__ import annotations

import numpy as np

from mdgru_keras.geometry._tensorflow import tf

# ---------------------------------------------------------------------------------------------------------
# window origins


def centered_window_origin(volume_shape: np.ndarray, window_size: np.ndarray) -> np.ndarray:
    """Integer origin (in volume voxels) of a ``window_size`` window centred on the volume.

    Negative where the window is larger than the volume (it is padded there), positive where the volume
    is larger than the window (then the central region is used: the rule for oversized inputs).
    """
    volume_shape = np.asarray(volume_shape, dtype=np.int64)
    window_size = np.asarray(window_size, dtype=np.int64)
    return (volume_shape - window_size) // 2


def centered_window_origin_tf(volume_shape: tf.Tensor, window_size: int | tf.Tensor) -> tf.Tensor:
    """TensorFlow form of :func:`centered_window_origin` (int32)."""
    return (tf.cast(volume_shape, tf.int32) - tf.cast(window_size, tf.int32)) // 2


def window_origin_around(center_voxel: np.ndarray, window_size: np.ndarray) -> np.ndarray:
    """Integer origin of a ``window_size`` window whose centre voxel is the nearest to ``center_voxel``.

    The point lands at window coordinate ``center_voxel - origin`` which lies in
    ``[window_size/2 - 0.5, window_size/2 + 0.5]``: always well inside the window.
    """
    center_voxel = np.asarray(center_voxel, dtype=np.float64)
    window_size = np.asarray(window_size, dtype=np.int64)
    return np.floor(center_voxel + 0.5).astype(np.int64) - window_size // 2


def window_origin_around_tf(center_voxel: tf.Tensor, window_size: tf.Tensor) -> tf.Tensor:
    """TensorFlow form of :func:`window_origin_around` (int32 result)."""
    center = tf.cast(center_voxel, tf.float32)
    return tf.cast(tf.floor(center + 0.5), tf.int32) - tf.cast(window_size, tf.int32) // 2


def window_to_volume_voxel(window_voxel: np.ndarray, window_origin_voxel: np.ndarray) -> np.ndarray:
    """Volume coordinates of window coordinates: ``window_voxel + window_origin_voxel`` (broadcasting)."""
    return np.asarray(window_voxel, dtype=np.float64) + np.asarray(window_origin_voxel, dtype=np.float64)


def window_to_volume_voxel_tf(window_voxel: tf.Tensor, window_origin_voxel: tf.Tensor) -> tf.Tensor:
    """TensorFlow form of :func:`window_to_volume_voxel` (float32)."""
    return tf.cast(window_voxel, tf.float32) + tf.cast(window_origin_voxel, tf.float32)


# ---------------------------------------------------------------------------------------------------------
# cutting a window out, zero-padded outside the volume


def crop_with_padding(volume: np.ndarray, origin_voxel: np.ndarray, window_size: tuple[int, int, int]) -> np.ndarray:
    """NumPy form of :func:`crop_with_padding_tf`."""
    origin = np.asarray(origin_voxel, dtype=np.int64)
    size = np.asarray(window_size, dtype=np.int64)
    shape = np.asarray(volume.shape[:3], dtype=np.int64)
    out = np.zeros(tuple(size) + volume.shape[3:], dtype=volume.dtype)
    start = np.clip(origin, 0, shape)
    stop = np.clip(origin + size, 0, shape)
    if np.any(stop <= start):
        return out
    dst = start - origin
    sl_src = tuple(slice(a, b) for a, b in zip(start, stop))
    sl_dst = tuple(slice(d, d + (b - a)) for d, a, b in zip(dst, start, stop))
    out[sl_dst] = volume[sl_src]
    return out


def crop_with_padding_tf(volume: tf.Tensor, origin_voxel: tf.Tensor, window_size: tuple[int, int, int]) -> tf.Tensor:
    """Crop ``volume[x, y, z, ...]`` at integer ``origin_voxel`` to ``window_size``, zero-padded outside.

    Works for any origin, also far outside the volume. Static output shape ``window_size + rest``.
    """
    origin = tf.cast(origin_voxel, tf.int32)
    size = tf.constant(window_size, tf.int32)
    shape = tf.shape(volume)[:3]
    start = tf.clip_by_value(origin, 0, shape)
    stop = tf.clip_by_value(origin + size, 0, shape)
    inner = volume[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]]
    pad_before = start - origin
    pad_after = size - (stop - start) - pad_before
    # pad_before/after can only be negative when the window lies fully outside; clip keeps the math valid.
    pad_before = tf.clip_by_value(pad_before, 0, size)
    pad_after = size - (stop - start) - pad_before
    rank = tf.rank(volume)
    paddings = tf.concat(
        [tf.stack([pad_before, pad_after], axis=1), tf.zeros(tf.stack([rank - 3, 2]), tf.int32)], axis=0
    )
    cropped = tf.pad(inner, paddings)
    static_rest = volume.shape[3:]
    return tf.ensure_shape(cropped, tuple(window_size) + tuple(static_rest))


# ---------------------------------------------------------------------------------------------------------
# shared fine windows (localizer)


def largest_share_margin(window_size: int) -> int:
    """The largest ``margin_voxel`` that :func:`shared_window_groups` accepts for ``window_size`` windows (a
    group then spans 0 or 1 voxels)."""
    return (window_size - 3) // 2


def shared_window_groups(
    center_voxel: np.ndarray, window_size: int, margin_voxel: int
) -> tuple[np.ndarray, np.ndarray]:
    """Group points ``[K, 3]`` so that each group fits one ``window_size`` window with ``margin_voxel`` to spare.

    Greedy in point order: a point joins the first group whose bounding box, with the point added, spans at most
    ``window_size - 3 - 2 * margin_voxel`` voxels on every axis, else it opens a new group. Each group's window
    is :func:`window_origin_around` the centre of its bounding box, which puts every member in
    ``[margin_voxel, window_size - 1 - margin_voxel]`` window voxels. A group of one point gets exactly the
    point's own centred window. Returns ``(group_of_point [K] int, group_origin_voxel [G, 3] int)``.
    """
    centers = np.asarray(center_voxel, dtype=np.float64)
    limit = window_size - 3 - 2 * margin_voxel
    if limit < 0:
        raise ValueError(f"margin {margin_voxel} leaves no room in a window of {window_size} voxels")
    low: list[np.ndarray] = []
    high: list[np.ndarray] = []
    group_of_point = np.zeros(len(centers), dtype=np.int64)
    for k, point in enumerate(centers):
        for g in range(len(low)):
            new_low, new_high = np.minimum(low[g], point), np.maximum(high[g], point)
            if np.all(new_high - new_low <= limit):
                low[g], high[g] = new_low, new_high
                group_of_point[k] = g
                break
        else:
            group_of_point[k] = len(low)
            low.append(point.copy())
            high.append(point.copy())
    middle = (np.array(low) + np.array(high)) / 2.0
    return group_of_point, window_origin_around(middle.reshape(-1, 3), window_size)


def shared_window_groups_tf(
    center_voxel: tf.Tensor, window_size: int, margin_voxel: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """TensorFlow form of :func:`shared_window_groups` (K static; int32 results, G dynamic)."""
    centers = tf.cast(center_voxel, tf.float32)
    count_points = int(centers.shape[0])
    limit = float(window_size - 3 - 2 * margin_voxel)
    if limit < 0:
        raise ValueError(f"margin {margin_voxel} leaves no room in a window of {window_size} voxels")
    slots = tf.range(count_points)
    low = tf.fill([count_points, 3], np.inf)
    high = tf.fill([count_points, 3], -np.inf)
    groups = tf.constant(0)
    group_of_point = []
    for k in range(count_points):  # K is small and static: an unrolled greedy pass
        new_low, new_high = tf.minimum(low, centers[k]), tf.maximum(high, centers[k])
        fits = tf.logical_and(tf.reduce_all(new_high - new_low <= limit, axis=1), slots < groups)
        first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
        g = tf.where(tf.reduce_any(fits), first, groups)
        chosen = (slots == g)[:, None]
        low, high = tf.where(chosen, new_low, low), tf.where(chosen, new_high, high)
        groups = tf.maximum(groups, g + 1)
        group_of_point.append(g)
    middle = (low[:groups] + high[:groups]) / 2.0
    return tf.stack(group_of_point), window_origin_around_tf(middle, window_size)
