"""Rigid poses and smooth deformations of the synthetic population (:mod:`mdgru_keras.data.synth`).

A synthetic subject is made by a *pull-back* map from subject world to template world,
``template_mm = rigid^-1(subject_mm + displacement(subject_mm))``, which resamples the template image directly.
Landmarks need the *forward* map: rigid forward, then the displacement inverted numerically at the point
(:func:`invert_displacement`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


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

    Positions are clamped to the grid, exactly as in
    :func:`~mdgru_keras.geometry.resampling.resample_axis_aligned`, so a field evaluated here and a field
    resampled there agree.
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
