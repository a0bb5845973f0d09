"""Training crops: where a training window is placed, and how it is resampled from the volume.

A training crop is a window of ``window_size`` voxels per axis whose voxel ``c`` (window coordinates) shows the
volume at ``volume_voxel = linear @ c + offset`` (one affine map ``window -> volume``; zero outside the volume).
Integer crops have ``linear = I`` and an integer offset (the window origin); sub-voxel shifts, rotations and
scalings change ``offset`` and ``linear``. Landmarks move with the image exactly:
``window_voxel = linear^-1 @ (volume_voxel - offset)``. All of it runs in the ``tf.data`` pipeline, so only the
TensorFlow forms exist.
"""

from __future__ import annotations

import tensorflow as tf

from mdgru_keras.geometry.windows import centered_window_origin_tf, crop_with_padding_tf

# ---------------------------------------------------------------------------------------------------------
# window placement


def mass_centred_window_origin_tf(normalized_volume: tf.Tensor, window_size: int) -> tf.Tensor:
    """int32 ``[3]`` origin of a ``window_size^3`` window centred on the intensity centroid of the head.

    ``normalized_volume`` ``[X, Y, Z]`` is z-normalized (:func:`mdgru_keras.preprocessing.preprocess`'s first
    channel): voxels brighter than the volume's mean (tissue, not air) weigh by how much brighter. Unlike the
    volume's centre, this follows the head when a field of view reaches the neck or is placed off-centre. A
    volume with no such voxel falls back to :func:`centered_window_origin_tf`.
    """
    volume = tf.convert_to_tensor(normalized_volume, tf.float32)
    weights = tf.nn.relu(volume)
    total = tf.reduce_sum(weights)
    shape = tf.shape(volume)
    centroid = []
    for axis in range(3):
        others = [a for a in range(3) if a != axis]
        profile = tf.reduce_sum(weights, axis=others)  # [n]
        position = tf.cast(tf.range(shape[axis]), tf.float32)
        centroid.append(tf.reduce_sum(profile * position) / tf.maximum(total, 1e-12))
    origin = tf.cast(tf.round(tf.stack(centroid) - (window_size - 1) / 2.0), tf.int32)
    return tf.where(total > 0, origin, centered_window_origin_tf(shape, window_size))


def window_origin_bounds_tf(
    volume_shape: tf.Tensor, landmarks_voxel: tf.Tensor, window_size: int, offset_range_voxel: int, margin_voxel: int,
    centre_origin: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Inclusive integer bounds ``(low, high)`` ``[3]`` for the origin of a training window.

    The origin is the centred origin (:func:`centered_window_origin_tf`) plus at most ``offset_range_voxel`` per
    axis, restricted so that every landmark ``[K, 3]`` lies in ``[margin, window_size - 1 - margin]`` window
    voxels. Where both cannot hold (landmarks spread wider than the window), the bounds collapse to the
    middle of the landmark-derived range, which keeps the landmarks as central as possible. ``centre_origin``
    replaces the centred origin (e.g. :func:`mass_centred_window_origin_tf`).
    """
    if centre_origin is None:
        centre = centered_window_origin_tf(volume_shape, window_size)
    else:
        centre = tf.cast(centre_origin, tf.int32)
    landmarks = tf.cast(landmarks_voxel, tf.float32)
    need_low = tf.cast(tf.math.ceil(tf.reduce_max(landmarks, axis=0) - (window_size - 1 - margin_voxel)), tf.int32)
    need_high = tf.cast(tf.floor(tf.reduce_min(landmarks, axis=0) - margin_voxel), tf.int32)
    low = tf.maximum(centre - offset_range_voxel, need_low)
    high = tf.minimum(centre + offset_range_voxel, need_high)
    feasible = low <= high
    nearest = tf.clip_by_value(centre, need_low, tf.maximum(need_low, need_high))
    fallback = tf.where(need_low <= need_high, nearest, (need_low + need_high) // 2)
    return tf.where(feasible, low, fallback), tf.where(feasible, high, fallback)


# ---------------------------------------------------------------------------------------------------------
# the window -> volume map and resampling of windows


def volume_voxel_to_window_voxel_tf(volume_voxel: tf.Tensor, linear: tf.Tensor, offset: tf.Tensor) -> tf.Tensor:
    """Window coordinates ``[..., 3]`` of volume voxels under the window map ``volume = linear @ c + offset``."""
    linear = tf.cast(linear, tf.float32)
    shifted = tf.cast(volume_voxel, tf.float32) - tf.cast(offset, tf.float32)
    return tf.linalg.matvec(tf.linalg.inv(linear), shifted)


def crop_with_shift_tf(volume: tf.Tensor, origin_voxel: tf.Tensor, window_size: tuple[int, int, int]) -> tf.Tensor:
    """Window at a continuous ``origin_voxel`` [3] (``linear = I``), trilinear, zero outside the volume.

    Separable and cheap: an integer crop one voxel larger, then linear interpolation along each axis. Equal to
    :func:`sample_window_affine_tf` with the identity matrix.
    """
    origin = tf.cast(origin_voxel, tf.float32)
    base = tf.floor(origin)
    fraction = origin - base
    region = crop_with_padding_tf(volume, tf.cast(base, tf.int32), tuple(s + 1 for s in window_size))
    for axis in range(3):
        lower = region[(slice(None),) * axis + (slice(0, -1),)]
        upper = region[(slice(None),) * axis + (slice(1, None),)]
        region = lower + fraction[axis] * (upper - lower)
    return tf.ensure_shape(region, tuple(window_size) + tuple(volume.shape[3:]))


def window_inside_weight_tf(volume_shape: tf.Tensor, origin_voxel: tf.Tensor, window_size: tuple[int, int, int]
                            ) -> tf.Tensor:
    """``[*window_size]`` float32: :func:`crop_with_shift_tf` (or, for an integer origin, ``crop_with_padding_tf``)
    of a volume of ones: 1 inside the volume, 0 in the zero padding, the interpolation weight at the border.

    Computed per axis and multiplied (trilinear interpolation of a separable function is the product of the 1D
    interpolations), so it costs window-sized work only: what adding a constant to the volume before the crop
    adds to each window voxel.
    """
    origin = tf.cast(origin_voxel, tf.float32)
    base = tf.floor(origin)
    fraction = origin - base
    shape = tf.cast(volume_shape, tf.float32)
    weights = []
    for axis in range(3):
        position = base[axis] + tf.range(window_size[axis], dtype=tf.float32)
        lower = tf.cast((position >= 0) & (position <= shape[axis] - 1), tf.float32)
        upper = tf.cast((position + 1 >= 0) & (position + 1 <= shape[axis] - 1), tf.float32)
        weights.append(lower + fraction[axis] * (upper - lower))
    return weights[0][:, None, None] * weights[1][None, :, None] * weights[2][None, None, :]


def sample_window_affine_tf(
    volume: tf.Tensor, linear: tf.Tensor, offset: tf.Tensor, window_size: tuple[int, int, int], slab: int = 32
) -> tf.Tensor:
    """Window ``[*window_size, C]`` of ``volume[x, y, z, C]`` under ``volume_voxel = linear @ c + offset``.

    Trilinear interpolation with the volume zero-padded outside (each of the 8 neighbours outside counts as
    0, as in :func:`crop_with_padding_tf`). Only window-sized work: the volume itself is never resampled.
    Processes ``slab`` window planes along x at a time to bound memory for large windows.
    """
    linear = tf.cast(linear, tf.float32)
    offset = tf.cast(offset, tf.float32)
    channels = volume.shape[-1]
    shape = tf.shape(volume)[:3]
    flat = tf.reshape(volume, [-1, channels])
    strides = tf.stack([shape[1] * shape[2], shape[2], 1])
    sx, sy, sz = window_size
    slab = min(slab, sx)
    if sx % slab:
        slab = sx
    y = tf.range(sy, dtype=tf.float32)[None, :, None]
    z = tf.range(sz, dtype=tf.float32)[None, None, :]

    def one_slab(start: tf.Tensor) -> tf.Tensor:
        x = tf.cast(tf.range(slab) + start, tf.float32)[:, None, None]
        # per source axis: the two neighbours' flat-index parts and their weights (0 outside the volume)
        parts, weights = [], []
        for axis in range(3):
            source = linear[axis, 0] * x + linear[axis, 1] * y + linear[axis, 2] * z + offset[axis]  # [slab, sy, sz]
            base = tf.floor(source)
            upper_weight = source - base
            lower = tf.cast(base, tf.int32)
            upper = lower + 1
            size = shape[axis]
            parts.append([tf.clip_by_value(i, 0, size - 1) * strides[axis] for i in (lower, upper)])
            weights.append(
                [
                    tf.where((lower >= 0) & (lower < size), 1.0 - upper_weight, 0.0),
                    tf.where((upper >= 0) & (upper < size), upper_weight, 0.0),
                ]
            )
        out = tf.zeros([slab, sy, sz, channels], volume.dtype)
        for a in range(2):
            for b in range(2):
                index_xy = parts[0][a] + parts[1][b]
                weight_xy = weights[0][a] * weights[1][b]
                for c in range(2):
                    values = tf.gather(flat, index_xy + parts[2][c])
                    out += tf.cast(weight_xy * weights[2][c], volume.dtype)[..., None] * values
        return out

    if slab == sx:
        window = one_slab(tf.constant(0))
    else:
        slabs = tf.map_fn(
            one_slab, tf.range(0, sx, slab), fn_output_signature=tf.TensorSpec([slab, sy, sz, channels], volume.dtype)
        )
        window = tf.reshape(slabs, [sx, sy, sz, channels])
    return tf.ensure_shape(window, tuple(window_size) + (channels,))
