"""The model's grid of a scan: closest canonical (RAS) orientation, resampling to the model's spacing, and the
exported model's bounded central region of that grid.

A file's voxel grid is brought to the model's grid in two exact steps that compose into one 4x4 map
``new_to_old`` (new voxel coordinates -> the file's voxel coordinates):

1. reorientation to the closest RAS-canonical axis order: a signed permutation of the axes (exact);
2. resampling of each canonical axis to ``spacing_mm``: a per-axis scale and shift (trilinear).

``new_to_old`` therefore always has exactly one non-zero entry per row and column of its linear part, which lets
the resampling run separably, one axis at a time (:func:`resample_axis_aligned`), with the same result as full
trilinear interpolation (which the tests check against ``scipy.ndimage.affine_transform``).
"""

from __future__ import annotations

import numpy as np

from mdgru_keras.geometry._tensorflow import tf
from mdgru_keras.geometry.affine_maps import translation_affine, translation_affine_tf, voxel_spacing_mm
from mdgru_keras.geometry.windows import centered_window_origin, centered_window_origin_tf

# Spacings closer than this (relative) are taken as equal, so a 1 mm image is not interpolated for 1e-7 mm.
SPACING_RELATIVE_TOLERANCE = 1e-5


# ---------------------------------------------------------------------------------------------------------
# closest canonical (RAS) orientation and the model's grid


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


# ---------------------------------------------------------------------------------------------------------
# separable trilinear resampling


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

    def interpolate() -> tf.Tensor:
        below = tf.gather(volume, lower, axis=axis)
        above = tf.gather(volume, tf.minimum(lower + 1, size - 1), axis=axis)
        view = [1, 1, 1]
        view[axis] = -1
        return below + tf.reshape(weight, view) * (above - below)

    def take() -> tf.Tensor:
        # Whole-voxel positions (a 1 mm scan on the 1 mm model grid): the values themselves, as in the NumPy
        # form. A run of consecutive voxels, forwards or backwards (a flipped axis), is a slice, else a gather.
        count = tf.shape(lower)[0]
        steps = tf.range(count)
        extent = tf.tensor_scatter_nd_update(tf.shape(volume), [[axis]], [count])

        def run_from(first: tf.Tensor) -> tf.Tensor:
            return tf.slice(volume, tf.one_hot(axis, 3, on_value=first, off_value=0, dtype=tf.int32), extent)

        return tf.case(
            [
                (tf.reduce_all(tf.equal(lower, lower[0] + steps)), lambda: run_from(lower[0])),
                (tf.reduce_all(tf.equal(lower, lower[0] - steps)), lambda: tf.reverse(run_from(lower[-1]), [axis])),
            ],
            default=lambda: tf.gather(volume, lower, axis=axis),
        )

    return tf.cond(tf.reduce_any(tf.not_equal(weight, 0.0)), interpolate, take)


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
# the exported model's grid: a bounded central region of the resampled scan
#
# The exported SavedModel resamples a scan of any size to the model's grid (``canonical_resampling_grid``), but
# it only ever looks at the central ``max_size^3`` voxels of that grid: the coarse stage sees the central
# ``P^3`` region and the fine windows (``W^3``) around its estimates reach at most ``W/2`` beyond it, so
# ``max_size = P + W`` covers everything the two stages can see while bounding time and memory for huge
# inputs. The crop is a shift of the grid, folded into ``new_to_old``, so only the kept voxels are resampled.
# With ``max_size - P`` even, the coarse region of the cropped grid is exactly that of the full grid.


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
