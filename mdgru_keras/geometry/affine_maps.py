"""4x4 affine maps of points between coordinate spaces: voxel <-> world, spacing, translations, rotations,
and RAS <-> LPS for ITK.

``world_mm`` is RAS millimetres, reached from continuous voxel coordinates through a 4x4 ``voxel_to_world``
affine. :func:`voxel_to_world` is the one function that applies a 4x4 affine to points, whatever the spaces
(``new_to_old`` voxel maps and rigid motions included).
"""

from __future__ import annotations

import numpy as np

from mdgru_keras.geometry._tensorflow import tf

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


def voxel_to_world_tf(voxel: tf.Tensor, voxel_to_world_affine: tf.Tensor) -> tf.Tensor:
    """TensorFlow form of :func:`voxel_to_world` (float64 math, result in the affine's dtype)."""

    affine = tf.cast(voxel_to_world_affine, tf.float64)
    voxel = tf.cast(voxel, tf.float64)
    return tf.linalg.matvec(affine[:3, :3], voxel) + affine[:3, 3]


def world_to_voxel(world_mm: np.ndarray, voxel_to_world_affine: np.ndarray) -> np.ndarray:
    """Map world millimetres ``[..., 3]`` to continuous voxel coordinates ``[..., 3]``."""
    world_mm = np.asarray(world_mm, dtype=np.float64)
    affine = np.asarray(voxel_to_world_affine, dtype=np.float64)
    inverse = np.linalg.inv(affine)
    return world_mm @ inverse[:3, :3].T + inverse[:3, 3]


def voxel_spacing_mm(voxel_to_world_affine: np.ndarray) -> np.ndarray:
    """Voxel edge lengths ``[3]`` in mm: the column norms of the affine's linear part."""
    affine = np.asarray(voxel_to_world_affine, dtype=np.float64)
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


# ---------------------------------------------------------------------------------------------------------
# translations and rotations


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
