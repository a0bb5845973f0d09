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

import numpy as np
import tensorflow as tf

# ---------------------------------------------------------------------------------------------------------
# voxel <-> world


def voxel_to_world(voxel: np.ndarray, voxel_to_world_affine: np.ndarray) -> np.ndarray:
    """Map voxel coordinates ``[..., 3]`` to world millimetres ``[..., 3]`` through a 4x4 affine."""
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


def world_to_voxel_tf(world_mm: tf.Tensor, voxel_to_world_affine: tf.Tensor) -> tf.Tensor:
    """TensorFlow form of :func:`world_to_voxel` (float64 math)."""
    inverse = tf.linalg.inv(tf.cast(voxel_to_world_affine, tf.float64))
    return tf.linalg.matvec(inverse[:3, :3], tf.cast(world_mm, tf.float64)) + inverse[:3, 3]


def voxel_spacing_mm(voxel_to_world_affine: np.ndarray) -> np.ndarray:
    """Voxel edge lengths ``[3]`` in mm: the column norms of the affine's linear part."""
    affine = np.asarray(voxel_to_world_affine, dtype=np.float64)
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


# ---------------------------------------------------------------------------------------------------------
# resampling grids


def resampled_shape_and_affine(
    shape: tuple[int, int, int], voxel_to_world_affine: np.ndarray, spacing_mm: float
) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray]:
    """Grid of isotropic ``spacing_mm`` voxels covering the same field of view as ``shape``.

    The new grid keeps the axis directions of the input and its first voxel *corner*; voxel centres move
    to half the new spacing inside that corner. Returns ``(new_shape, new_voxel_to_world, new_to_old)``
    where ``new_to_old`` is the 4x4 map from new voxel coordinates to old voxel coordinates (a pure
    scaling and shift), which is the exact coordinate mapping used for resampling and for mapping
    predictions back.
    """
    old_spacing = voxel_spacing_mm(voxel_to_world_affine)
    scale = spacing_mm / old_spacing  # old voxels per new voxel
    extent = np.asarray(shape, dtype=np.float64) / scale
    new_shape = tuple(int(max(1, np.round(e))) for e in extent)
    # new voxel j covers old [ (j)*scale - 0.5 , (j+1)*scale - 0.5 ) -> centre (j + 0.5) * scale - 0.5
    new_to_old = np.eye(4)
    new_to_old[:3, :3] = np.diag(scale)
    new_to_old[:3, 3] = 0.5 * scale - 0.5
    new_affine = np.asarray(voxel_to_world_affine, dtype=np.float64) @ new_to_old
    return new_shape, new_affine, new_to_old


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


def window_origin_bounds_tf(
    volume_shape: tf.Tensor, landmarks_voxel: tf.Tensor, window_size: int, offset_range_voxel: int, margin_voxel: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """Inclusive integer bounds ``(low, high)`` ``[3]`` for the origin of a training window.

    The origin is the centred origin (:func:`centered_window_origin`) plus at most ``offset_range_voxel`` per
    axis, restricted so that every landmark ``[K, 3]`` lies in ``[margin, window_size - 1 - margin]`` window
    voxels. Where both cannot hold (landmarks spread wider than the window), the bounds collapse to the
    middle of the landmark-derived range, which keeps the landmarks as central as possible.
    """
    centre = centered_window_origin_tf(volume_shape, window_size)
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
    sx, sy, sz = window_size
    slab = min(slab, sx)
    if sx % slab:
        slab = sx
    yz = tf.stack(tf.meshgrid(tf.range(sy, dtype=tf.float32), tf.range(sz, dtype=tf.float32), indexing="ij"), -1)

    def one_slab(start: tf.Tensor) -> tf.Tensor:
        x = tf.cast(tf.range(slab) + start, tf.float32)
        grid = tf.concat(
            [tf.broadcast_to(x[:, None, None, None], [slab, sy, sz, 1]), tf.broadcast_to(yz[None], [slab, sy, sz, 2])],
            axis=-1,
        )
        source = tf.reshape(grid, [-1, 3]) @ tf.transpose(linear) + offset
        base = tf.floor(source)
        fraction = source - base
        base = tf.cast(base, tf.int32)
        out = tf.zeros([slab * sy * sz, channels], volume.dtype)
        for corner in range(8):
            step = tf.constant([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1], tf.int32)
            index = base + step
            inside = tf.reduce_all((index >= 0) & (index < shape), axis=1)
            linear_index = (index[:, 0] * shape[1] + index[:, 1]) * shape[2] + index[:, 2]
            weight = tf.reduce_prod(tf.where(step > 0, fraction, 1.0 - fraction), axis=1)
            weight = tf.where(inside, weight, 0.0)
            values = tf.gather(flat, tf.where(inside, linear_index, 0))
            out += tf.cast(weight, volume.dtype)[:, None] * values
        return tf.reshape(out, [slab, sy, sz, channels])

    if slab == sx:
        window = one_slab(tf.constant(0))
    else:
        slabs = tf.map_fn(one_slab, tf.range(0, sx, slab), fn_output_signature=tf.TensorSpec([slab, sy, sz, channels],
                                                                                              volume.dtype))
        window = tf.reshape(slabs, [sx, sy, sz, channels])
    return tf.ensure_shape(window, tuple(window_size) + (channels,))


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
