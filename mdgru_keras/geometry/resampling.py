"""All coordinate math of mdgru-keras, in one place.

Conventions (see ``docs/GEOMETRY.md`` for pictures):

* Volumes are arrays ``[x, y, z]`` in RAS voxel order (after :func:`mdgru_keras.io.nifti.read_volume`).
* Continuous voxel coordinates put voxel *centres* at integers (nibabel's convention): voxel ``i`` covers
  ``[i - 0.5, i + 0.5)``.
* ``world_mm`` is RAS millimetres, reached through a 4x4 ``voxel_to_world`` affine.
* A *window* is an axis-aligned block of a volume: ``window_voxel = volume_voxel - window_origin_voxel``.
* A window of ``size`` input voxels seen by a network with input downsampling ``factor`` (4 for the coarse
  stage, 1 for the fine stage) and superresolution ``n`` has ``C = n * size / factor`` classes per axis.
  Class ``k`` covers the window interval ``[k * w - 0.5, (k + 1) * w - 0.5)`` with width ``w = factor / n``
  voxels, and decodes to its *centre* ``(k + 0.5) * w - 0.5``. For ``factor = 1, n = 1`` class ``k`` is voxel ``k``.

Every function here has a NumPy form; those that run inside the exported graph also have a TensorFlow form
(suffix ``_tf``), and the tests check that both agree.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

# ---------------------------------------------------------------------------------------------------------
# voxel <-> world


def voxel_to_world(voxel: np.ndarray, voxel_to_world_affine: np.ndarray) -> np.ndarray:
    """Map voxel coordinates ``[..., 3]`` to world millimetres ``[..., 3]`` through a 4x4 affine.

    The one point map of the package: it applies any 4x4 affine to points, also voxel -> voxel maps (such as
    ``new_to_old``) and world -> world motions.
    """
    voxel = np.asarray(voxel, dtype=np.float64)
    affine = np.asarray(voxel_to_world_affine, dtype=np.float64)
    return voxel @ affine[:3, :3].T + affine[:3, 3]


def world_to_voxel(world_mm: np.ndarray, voxel_to_world_affine: np.ndarray) -> np.ndarray:
    """Map world millimetres ``[..., 3]`` to continuous voxel coordinates ``[..., 3]``."""
    world_mm = np.asarray(world_mm, dtype=np.float64)
    affine = np.asarray(voxel_to_world_affine, dtype=np.float64)
    inverse = np.linalg.inv(affine)
    return world_mm @ inverse[:3, :3].T + inverse[:3, 3]


def voxel_to_world_tf(voxel: tf.Tensor, voxel_to_world_affine: tf.Tensor) -> tf.Tensor:
    """TensorFlow form of :func:`voxel_to_world` (float64 math, result in the affine's dtype)."""
    affine = tf.cast(voxel_to_world_affine, tf.float64)
    voxel = tf.cast(voxel, tf.float64)
    return tf.linalg.matvec(affine[:3, :3], voxel) + affine[:3, 3]


def voxel_spacing_mm(voxel_to_world_affine: np.ndarray) -> np.ndarray:
    """Voxel edge lengths ``[3]`` in mm: the column norms of the affine's linear part."""
    affine = np.asarray(voxel_to_world_affine, dtype=np.float64)
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


# ---------------------------------------------------------------------------------------------------------
# windows and padding


def centered_window_origin(volume_shape: np.ndarray, window_size: np.ndarray) -> np.ndarray:
    """Integer origin (in volume voxels) of a ``window_size`` window centred on the volume.

    Negative where the window is larger than the volume (it is padded there), positive where the volume
    is larger than the window (then the central region is used: the rule for oversized inputs).
    """
    volume_shape = np.asarray(volume_shape, dtype=np.int64)
    window_size = np.asarray(window_size, dtype=np.int64)
    return (volume_shape - window_size) // 2


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
# training crops: window placement and affine resampling of windows
#
# A training crop is a window of ``window_size`` voxels per axis whose voxel ``c`` (window coordinates) shows
# the volume at ``volume_voxel = linear @ c + offset`` (one affine map ``window -> volume``; zero outside the
# volume). Integer crops have ``linear = I`` and an integer offset (the window origin); sub-voxel shifts,
# rotations and scalings change ``offset`` and ``linear``. Landmarks move with the image exactly:
# ``window_voxel = linear^-1 @ (volume_voxel - offset)``.


def centered_window_origin_tf(volume_shape: tf.Tensor, window_size: int | tf.Tensor) -> tf.Tensor:
    """TensorFlow form of :func:`centered_window_origin` (int32)."""
    return (tf.cast(volume_shape, tf.int32) - tf.cast(window_size, tf.int32)) // 2


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

    The origin is the centred origin (:func:`centered_window_origin`) plus at most ``offset_range_voxel`` per
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


def rotation_matrix(angles_rad: np.ndarray) -> np.ndarray:
    """3x3 rotation ``Rz @ Ry @ Rx`` for angles ``[3]`` (radians) about the x, y and z axes."""
    ax, ay, az = (float(a) for a in angles_rad)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def rotation_matrix_tf(angles_rad: tf.Tensor) -> tf.Tensor:
    """TensorFlow form of :func:`rotation_matrix` (float32)."""
    angles = tf.cast(angles_rad, tf.float32)
    c, s = tf.cos(angles), tf.sin(angles)
    one, zero = tf.ones([], tf.float32), tf.zeros([], tf.float32)
    rx = tf.stack([[one, zero, zero], [zero, c[0], -s[0]], [zero, s[0], c[0]]])
    ry = tf.stack([[c[1], zero, s[1]], [zero, one, zero], [-s[1], zero, c[1]]])
    rz = tf.stack([[c[2], -s[2], zero], [s[2], c[2], zero], [zero, zero, one]])
    return rz @ ry @ rx


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


# ---------------------------------------------------------------------------------------------------------
# closest canonical (RAS) orientation and resampling to a model spacing
#
# A file's voxel grid is brought to the model's grid in two exact steps that compose into one 4x4 map
# ``new_to_old`` (new voxel coordinates -> the file's voxel coordinates):
#   1. reorientation to the closest RAS-canonical axis order: a signed permutation of the axes (exact);
#   2. resampling of each canonical axis to ``spacing_mm``: a per-axis scale and shift (trilinear).
# ``new_to_old`` therefore always has exactly one non-zero entry per row and column of its linear part, which
# lets the resampling run separably, one axis at a time (``resample_axis_aligned``), with the same result as
# full trilinear interpolation (which the tests check against ``scipy.ndimage.affine_transform``).

# Spacings closer than this (relative) are taken as equal, so a 1 mm image is not interpolated for 1e-7 mm.
SPACING_RELATIVE_TOLERANCE = 1e-5


def closest_canonical_orientation(voxel_to_world_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each voxel axis of a file, the RAS world axis it runs closest to, and whether it runs backwards.

    The same rule as ``nibabel.orientations.io_orientation``: the linear part, with unit columns, is replaced
    by its closest orthogonal matrix (polar factor of the SVD); voxel axes 0, 1, 2 in turn take the world
    axis of their largest absolute component among the world axes not taken yet.
    Returns ``(world_axis int64 [3], flip bool [3])``.
    """
    linear = np.asarray(voxel_to_world_affine, dtype=np.float64)[:3, :3]
    spacing = voxel_spacing_mm(voxel_to_world_affine)
    unit = linear / np.where(spacing > 0, spacing, 1.0)
    u, _, vt = np.linalg.svd(unit)
    rotation = u @ vt
    world_axis = np.zeros(3, dtype=np.int64)
    flip = np.zeros(3, dtype=bool)
    for voxel_axis in range(3):
        column = rotation[:, voxel_axis]
        axis = int(np.argmax(np.abs(column)))
        world_axis[voxel_axis] = axis
        flip[voxel_axis] = column[axis] < 0
        rotation[axis, :] = 0.0
    return world_axis, flip


def canonical_to_file_voxel(
    shape: tuple[int, int, int], voxel_to_world_affine: np.ndarray
) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray]:
    """The RAS-canonical grid of a file: ``(canonical_shape, canonical_voxel_to_world, canonical_to_file)``.

    ``canonical_to_file`` (4x4, a signed permutation plus shift) maps canonical voxel coordinates to the
    file's voxel coordinates; ``canonical_voxel_to_world = voxel_to_world_affine @ canonical_to_file``.
    """
    world_axis, flip = closest_canonical_orientation(voxel_to_world_affine)
    shape = tuple(int(n) for n in shape)
    canonical_to_file = np.zeros((4, 4))
    canonical_to_file[3, 3] = 1.0
    canonical_shape = [0, 0, 0]
    for file_axis in range(3):
        axis = int(world_axis[file_axis])
        canonical_shape[axis] = shape[file_axis]
        canonical_to_file[file_axis, axis] = -1.0 if flip[file_axis] else 1.0
        canonical_to_file[file_axis, 3] = shape[file_axis] - 1.0 if flip[file_axis] else 0.0
    canonical_affine = np.asarray(voxel_to_world_affine, dtype=np.float64) @ canonical_to_file
    return tuple(canonical_shape), canonical_affine, canonical_to_file


def _axis_scale(old_spacing_mm: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Old voxels per new voxel along each axis; exactly 1 where the spacings agree within the tolerance."""
    scale = spacing_mm / old_spacing_mm
    return np.where(np.abs(scale - 1.0) < SPACING_RELATIVE_TOLERANCE, 1.0, scale)


def canonical_resampling_grid(
    shape: tuple[int, int, int], voxel_to_world_affine: np.ndarray, spacing_mm: float | None
) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray]:
    """The model's grid for a file: RAS-canonical axes, isotropic ``spacing_mm`` voxels (None: keep spacing).

    Returns ``(new_shape, new_voxel_to_world, new_to_old)``; ``new_to_old`` maps new voxel coordinates to the
    file's voxel coordinates. Along each canonical axis the new grid covers the file's field of view from its
    first voxel *corner* and keeps that corner: new voxel ``j`` has its centre at canonical coordinate
    ``(j + 0.5) * scale - 0.5`` with ``scale = spacing_mm / old_spacing``.
    """
    canonical_shape, canonical_affine, canonical_to_file = canonical_to_file_voxel(shape, voxel_to_world_affine)
    if spacing_mm is None:
        return canonical_shape, canonical_affine, canonical_to_file
    scale = _axis_scale(voxel_spacing_mm(canonical_affine), float(spacing_mm))
    extent = np.asarray(canonical_shape, dtype=np.float64) / scale
    new_shape = tuple(int(max(1, np.round(e))) for e in extent)
    new_to_canonical = np.eye(4)
    new_to_canonical[:3, :3] = np.diag(scale)
    new_to_canonical[:3, 3] = 0.5 * scale - 0.5
    new_to_old = canonical_to_file @ new_to_canonical
    return new_shape, canonical_affine @ new_to_canonical, new_to_old


def canonical_resampling_grid_tf(
    shape: tf.Tensor, voxel_to_world_affine: tf.Tensor, spacing_mm: float | None
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """TensorFlow form of :func:`canonical_resampling_grid` for the exported graph.

    ``shape`` int [3] (e.g. ``tf.shape(volume)``), ``voxel_to_world_affine`` float [4, 4]. Returns
    ``(new_shape int32 [3], new_voxel_to_world float64 [4, 4], new_to_old float64 [4, 4])``.
    """
    affine = tf.cast(voxel_to_world_affine, tf.float64)
    shape_f = tf.cast(tf.reshape(shape, [3]), tf.float64)
    linear = affine[:3, :3]
    spacing = tf.sqrt(tf.reduce_sum(linear**2, axis=0))
    unit = linear / tf.where(spacing > 0, spacing, tf.ones_like(spacing))
    _, u, v = tf.linalg.svd(unit)
    rotation = tf.matmul(u, v, adjoint_b=True)
    # Greedy assignment as in the NumPy form, unrolled over the three voxel axes.
    taken = tf.zeros([3], tf.float64)  # 1 where a world axis is taken
    columns = []
    for voxel_axis in range(3):
        column = rotation[:, voxel_axis] * (1.0 - taken)
        axis = tf.argmax(tf.abs(column), output_type=tf.int32)
        one_hot = tf.one_hot(axis, 3, dtype=tf.float64)
        sign = tf.where(tf.gather(column, axis) < 0, tf.constant(-1.0, tf.float64), tf.constant(1.0, tf.float64))
        taken = taken + one_hot
        columns.append((one_hot, sign))
    # canonical_to_file[file_axis, world_axis] = sign; rows are the file axes.
    signed_rows = tf.stack([one_hot * sign for one_hot, sign in columns])  # [file_axis, canonical_axis]
    flips = tf.stack([sign < 0 for _, sign in columns])
    shift = tf.where(flips, shape_f - 1.0, tf.zeros_like(shape_f))
    canonical_to_file = tf.concat(
        [tf.concat([signed_rows, shift[:, None]], axis=1), tf.constant([[0.0, 0.0, 0.0, 1.0]], tf.float64)], axis=0
    )
    canonical_shape = tf.linalg.matvec(tf.abs(signed_rows), shape_f, transpose_a=True)
    canonical_affine = tf.matmul(affine, canonical_to_file)
    if spacing_mm is None:
        return tf.cast(tf.round(canonical_shape), tf.int32), canonical_affine, canonical_to_file
    canonical_spacing = tf.sqrt(tf.reduce_sum(canonical_affine[:3, :3] ** 2, axis=0))
    scale = tf.constant(float(spacing_mm), tf.float64) / canonical_spacing
    scale = tf.where(tf.abs(scale - 1.0) < SPACING_RELATIVE_TOLERANCE, tf.ones_like(scale), scale)
    new_shape = tf.maximum(tf.round(canonical_shape / scale), 1.0)
    new_to_canonical = tf.concat(
        [
            tf.concat([tf.linalg.diag(scale), (0.5 * scale - 0.5)[:, None]], axis=1),
            tf.constant([[0.0, 0.0, 0.0, 1.0]], tf.float64),
        ],
        axis=0,
    )
    return (
        tf.cast(new_shape, tf.int32),
        tf.matmul(canonical_affine, new_to_canonical),
        tf.matmul(canonical_to_file, new_to_canonical),
    )


def _interpolate_axis(volume: np.ndarray, old_coordinate: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of ``volume`` along ``axis`` at continuous positions; clamped at the edges."""
    size = volume.shape[axis]
    coordinate = np.clip(old_coordinate, 0.0, size - 1.0)
    lower = np.floor(coordinate).astype(np.int64)  # at the last voxel: weight 0, so edge values stay exact
    weight = (coordinate - lower).astype(volume.dtype)
    below = np.take(volume, lower, axis=axis)
    if size == 1 or not np.any(weight):
        return below
    above = np.take(volume, np.minimum(lower + 1, size - 1), axis=axis)
    view = [1] * volume.ndim
    view[axis] = -1
    weight = weight.reshape(view)
    return below + weight * (above - below)


def resample_axis_aligned(volume: np.ndarray, new_to_old: np.ndarray, new_shape: tuple[int, int, int]) -> np.ndarray:
    """Trilinear resampling of ``volume[x, y, z, ...]`` for a ``new_to_old`` whose linear part is a signed,
    scaled permutation (as made by :func:`canonical_resampling_grid`); separable, one axis at a time.

    Positions outside the old grid take the value of the nearest edge voxel (coordinates clamped).
    """
    new_to_old = np.asarray(new_to_old, dtype=np.float64)
    linear = new_to_old[:3, :3]
    old_axis = np.argmax(np.abs(linear), axis=0)  # the old axis feeding each new axis
    if sorted(old_axis.tolist()) != [0, 1, 2] or np.count_nonzero(np.abs(linear) > 0) != 3:
        raise ValueError(f"new_to_old is not axis aligned: {new_to_old.tolist()}")
    out = np.transpose(volume, tuple(old_axis.tolist()) + tuple(range(3, volume.ndim)))
    for new_axis in range(3):
        old = int(old_axis[new_axis])
        positions = linear[old, new_axis] * np.arange(new_shape[new_axis]) + new_to_old[old, 3]
        out = _interpolate_axis(out, positions, new_axis)
    return np.ascontiguousarray(out)


def _interpolate_axis_tf(volume: tf.Tensor, old_coordinate: tf.Tensor, axis: int) -> tf.Tensor:
    size = tf.shape(volume)[axis]
    upper = tf.cast(size - 1, tf.float64)
    coordinate = tf.clip_by_value(old_coordinate, 0.0, upper)
    lower = tf.floor(coordinate)
    weight = tf.cast(coordinate - lower, volume.dtype)
    lower = tf.cast(lower, tf.int32)
    below = tf.gather(volume, lower, axis=axis)
    above = tf.gather(volume, tf.minimum(lower + 1, size - 1), axis=axis)
    view = [1, 1, 1]
    view[axis] = -1
    return below + tf.reshape(weight, view) * (above - below)


def resample_axis_aligned_tf(volume: tf.Tensor, new_to_old: tf.Tensor, new_shape: tf.Tensor) -> tf.Tensor:
    """TensorFlow form of :func:`resample_axis_aligned` for a 3D ``volume`` (float32 result).

    ``new_to_old`` must be axis aligned (as made by :func:`canonical_resampling_grid_tf`); the axes are
    permuted with a (data-dependent) transpose, then interpolated one at a time.
    """
    volume = tf.cast(volume, tf.float32)
    matrix = tf.cast(new_to_old, tf.float64)
    new_shape = tf.cast(tf.reshape(new_shape, [3]), tf.int32)
    linear = matrix[:3, :3]
    old_axis = tf.argmax(tf.abs(linear), axis=0, output_type=tf.int32)
    out = tf.transpose(volume, old_axis)
    for new_axis in range(3):
        old = old_axis[new_axis]
        slope = tf.gather(linear[:, new_axis], old)
        positions = slope * tf.range(new_shape[new_axis], dtype=tf.float64) + tf.gather(matrix[:3, 3], old)
        out = _interpolate_axis_tf(out, positions, new_axis)
    return out


# ---------------------------------------------------------------------------------------------------------
# rigid poses and smooth deformations (the synthetic population)
#
# A synthetic subject is made by a *pull-back* map from subject world to template world,
#   template_mm = rigid^-1(subject_mm + displacement(subject_mm)),
# which resamples the template image directly. Landmarks need the *forward* map: rigid forward, then
# the displacement inverted numerically at the point (:func:`invert_displacement`).


def rigid_affine(rotation: np.ndarray, translation_mm: np.ndarray, centre_mm: np.ndarray) -> np.ndarray:
    """4x4 world map ``x -> rotation @ (x - centre) + centre + translation`` (rotation about ``centre_mm``)."""
    rotation = np.asarray(rotation, dtype=np.float64)
    centre = np.asarray(centre_mm, dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = rotation
    affine[:3, 3] = centre - rotation @ centre + np.asarray(translation_mm, dtype=np.float64)
    return affine


def interpolate_at(field: np.ndarray, voxel: np.ndarray) -> np.ndarray:
    """Trilinear value of ``field[x, y, z, ...]`` at continuous voxel positions ``[N, 3]`` -> ``[N, ...]``.

    Positions are clamped to the grid, exactly as in :func:`resample_axis_aligned`, so a field evaluated here
    and a field resampled there agree.
    """
    field = np.asarray(field)
    voxel = np.asarray(voxel, dtype=np.float64).reshape(-1, 3)
    shape = np.asarray(field.shape[:3])
    voxel = np.clip(voxel, 0.0, shape - 1.0)
    lower = np.floor(voxel).astype(np.int64)
    upper = np.minimum(lower + 1, shape - 1)
    weight = voxel - lower
    result = 0.0
    for corner in range(8):
        pick = [(corner >> (2 - axis)) & 1 for axis in range(3)]
        index = tuple(np.where(pick[axis], upper[:, axis], lower[:, axis]) for axis in range(3))
        corner_weight = np.prod([weight[:, a] if pick[a] else 1.0 - weight[:, a] for a in range(3)], axis=0)
        corner_weight = corner_weight.reshape((-1,) + (1,) * (field.ndim - 3))
        result = result + corner_weight * field[index]
    return np.asarray(result, dtype=np.float64)


def invert_displacement(
    target_mm: np.ndarray,
    displacement_at: Callable[[np.ndarray], np.ndarray],
    tolerance_mm: float = 1e-6,
    max_iterations: int = 200,
) -> np.ndarray:
    """Points ``y [N, 3]`` with ``y + displacement_at(y) = target_mm``, by the fixed-point iteration
    ``y <- target - displacement_at(y)``.

    Converges when the displacement's Jacobian has norm < 1 (a smooth, moderate deformation); raises
    ``ValueError`` otherwise.
    """
    target = np.asarray(target_mm, dtype=np.float64).reshape(-1, 3)
    points = target - displacement_at(target)
    for _ in range(max_iterations):
        updated = target - displacement_at(points)
        change = np.max(np.abs(updated - points)) if len(points) else 0.0
        points = updated
        if change < tolerance_mm:
            return points
    raise ValueError(f"displacement inversion did not converge in {max_iterations} iterations (step {change:g} mm)")


# ---------------------------------------------------------------------------------------------------------
# two-stage localization: the coarse region of a volume and the stage decodings (networks / localizer)


def window_to_volume_voxel(window_voxel: np.ndarray, window_origin_voxel: np.ndarray) -> np.ndarray:
    """Volume coordinates of window coordinates: ``window_voxel + window_origin_voxel`` (broadcasting)."""
    return np.asarray(window_voxel, dtype=np.float64) + np.asarray(window_origin_voxel, dtype=np.float64)


def window_to_volume_voxel_tf(window_voxel: tf.Tensor, window_origin_voxel: tf.Tensor) -> tf.Tensor:
    """TensorFlow form of :func:`window_to_volume_voxel` (float32)."""
    return tf.cast(window_voxel, tf.float32) + tf.cast(window_origin_voxel, tf.float32)


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
# the exported model's grid: a bounded central region of the resampled scan
#
# The exported SavedModel resamples a scan of any size to the model's grid (``canonical_resampling_grid``), but
# it only ever looks at the central ``max_size^3`` voxels of that grid: the coarse stage sees the central
# ``P^3`` region and the fine windows (``W^3``) around its estimates reach at most ``W/2`` beyond it, so
# ``max_size = P + W`` covers everything the two stages can see while bounding time and memory for huge
# inputs. The crop is a shift of the grid, folded into ``new_to_old``, so only the kept voxels are resampled.
# With ``max_size - P`` even, the coarse region of the cropped grid is exactly that of the full grid.


def translation_affine(offset_voxel: np.ndarray) -> np.ndarray:
    """4x4 float64 map ``v -> v + offset_voxel``."""
    matrix = np.eye(4)
    matrix[:3, 3] = np.asarray(offset_voxel, dtype=np.float64)
    return matrix


def translation_affine_tf(offset_voxel: tf.Tensor) -> tf.Tensor:
    """TensorFlow form of :func:`translation_affine` (float64)."""
    offset = tf.reshape(tf.cast(offset_voxel, tf.float64), [3, 1])
    top = tf.concat([tf.eye(3, dtype=tf.float64), offset], axis=1)
    return tf.concat([top, tf.constant([[0.0, 0.0, 0.0, 1.0]], tf.float64)], axis=0)


def central_grid_crop(
    new_shape: tuple[int, int, int], new_to_old: np.ndarray, max_size: int
) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray]:
    """Crop a resampling grid to its central ``max_size`` voxels along each axis that is longer.

    Returns ``(cropped_shape, cropped_to_old, origin_voxel int64 [3])``: cropped voxel ``c`` is voxel
    ``c + origin_voxel`` of the uncropped grid (origin 0 along axes that fit), and
    ``cropped_to_old = new_to_old @ translation_affine(origin_voxel)``. The origin follows
    :func:`centered_window_origin`.
    """
    shape = np.asarray(new_shape, dtype=np.int64)
    origin = np.maximum(centered_window_origin(shape, np.full(3, max_size)), 0)
    cropped_shape = tuple(int(n) for n in np.minimum(shape, max_size))
    return cropped_shape, np.asarray(new_to_old, dtype=np.float64) @ translation_affine(origin), origin


def central_grid_crop_tf(
    new_shape: tf.Tensor, new_to_old: tf.Tensor, max_size: int
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """TensorFlow form of :func:`central_grid_crop`: ``(cropped_shape int32 [3], cropped_to_old float64 [4, 4],
    origin_voxel int32 [3])``."""
    shape = tf.cast(tf.reshape(new_shape, [3]), tf.int32)
    origin = tf.maximum(centered_window_origin_tf(shape, max_size), 0)
    cropped_to_old = tf.matmul(tf.cast(new_to_old, tf.float64), translation_affine_tf(origin))
    return tf.minimum(shape, max_size), cropped_to_old, origin


# ---------------------------------------------------------------------------------------------------------
# RAS <-> LPS (ITK / SimpleITK world convention)
#
# Our world coordinates are RAS millimetres (NIfTI, nibabel, 3D Slicer): +x right, +y anterior, +z superior.
# ITK and SimpleITK use LPS: +x left, +y posterior, +z superior. The two differ by negating x and y. Every
# crossing between the two conventions goes through the functions below and nowhere else.

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # 4x4; its own inverse


def ras_to_lps(world_mm_ras: np.ndarray) -> np.ndarray:
    """RAS millimetres ``[..., 3]`` to LPS millimetres ``[..., 3]`` (negate x and y)."""
    return np.asarray(world_mm_ras, dtype=np.float64) * np.array([-1.0, -1.0, 1.0])


def lps_to_ras(world_mm_lps: np.ndarray) -> np.ndarray:
    """LPS millimetres ``[..., 3]`` to RAS millimetres ``[..., 3]`` (negate x and y)."""
    return np.asarray(world_mm_lps, dtype=np.float64) * np.array([-1.0, -1.0, 1.0])


def itk_geometry_from_affine(
    voxel_to_world_affine: np.ndarray, atol: float = 1e-4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ITK image geometry of an array ``[x, y, z]`` with a RAS ``voxel_to_world`` affine.

    Returns ``(origin_lps [3], spacing_mm [3], direction_lps [3, 3])``: ITK's physical point of index
    ``(i, j, k)`` is ``origin + direction @ (spacing * (i, j, k))`` in LPS mm, with ITK's index ``(i, j, k)``
    being our voxel ``[i, j, k]`` (SimpleITK's *NumPy view* is ``[k, j, i]``, i.e. the array transposed).
    Raises ``ValueError`` for a sheared affine, which an ITK image cannot represent.
    """
    affine_lps = RAS_TO_LPS @ np.asarray(voxel_to_world_affine, dtype=np.float64)
    spacing = voxel_spacing_mm(voxel_to_world_affine)
    direction = affine_lps[:3, :3] / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=atol):
        raise ValueError("the voxel_to_world affine has shear; ITK images need orthogonal axes")
    return affine_lps[:3, 3].copy(), spacing, direction


def affine_from_itk_geometry(origin_lps: np.ndarray, spacing_mm: np.ndarray, direction_lps: np.ndarray) -> np.ndarray:
    """Inverse of :func:`itk_geometry_from_affine`: the RAS ``voxel_to_world`` 4x4 of an ITK image.

    ``direction_lps`` may be given flat (9 values, row-major as SimpleITK's ``GetDirection()``) or ``[3, 3]``.
    """
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = np.asarray(direction_lps, dtype=np.float64).reshape(3, 3) * np.asarray(spacing_mm)
    affine_lps[:3, 3] = np.asarray(origin_lps, dtype=np.float64)
    return RAS_TO_LPS @ affine_lps


# ---------------------------------------------------------------------------------------------------------
# heatmaps (the 3D U-Net baseline, ``mdgru_keras/baselines/unet.py``)
#
# A heatmap of a point at continuous ``window_voxel`` is the isotropic Gaussian
# ``amplitude * exp(-|v - window_voxel|^2 / (2 sigma^2))`` sampled at the voxel centres ``v`` (integers) of a
# ``size^3`` window. Its logarithm is a quadratic in each axis, so a parabola through the log-values at the
# peak voxel and its two neighbours recovers a sub-voxel centre exactly; that is how it is decoded.


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


# ---------------------------------------------------------------------------------------------------------
# pooled decoding: the n = 1 rows of Table 1a from a model trained with superresolution n
#
# With superresolution ``n`` the classes are aligned with the classes of ``n = 1``: class ``k`` (width
# ``w = factor / n``) lies inside the ``n = 1`` class ``k // n`` (width ``factor``), so ``n = 1`` class ``j``
# is exactly the union of the ``n`` classes ``j*n .. j*n + n - 1`` (for the fine stage, ``factor = 1``: voxel
# ``j``). Summing each group of ``n`` probabilities therefore gives the model's own distribution over ``n = 1``
# classes, which decodes with ``superresolution = 1`` like the output of a model trained with ``n = 1``.


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


# ---------------------------------------------------------------------------------------------------------
# shared fine windows (localizer)


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
