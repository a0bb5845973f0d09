"""Landmarks that the AFIDs protocol places in a plane given by other landmarks.

The AFIDs protocol places the lateral ventricles' landmarks at AC and at PC (``RLVAC``, ``LLVAC``; ``RLVPC``,
``LLVPC``) on the coronal slice of AC or PC in AC-PC space: in the plane through AC (or PC) perpendicular to
the AC-PC line. In the MNI152NLin2009cAsym template that the AFIDs raters labelled, all four lie within 0.08 mm
of those planes. Locally the ventricle's edge runs anterior-posterior, so a window of the image hardly says
where along that edge the point is: the plane does (docs/MODEL_CARD.md: their errors are anterior-posterior).

Two uses:

* :func:`project_onto_planes` / :func:`project_onto_planes_tf`: move estimates of these landmarks along the
  AC-PC line onto their planes, through estimated AC and PC (the localizer's ``protocol_planes`` option);
* :func:`place_on_planes`: the labels of a deformed template (the synthetic population): where the template's
  ventricle edge, mapped into the subject, crosses the subject's plane, rather than where the tissue of the
  template's point went (an elastic deformation moves that point off the plane, and a rater would not follow
  it there).

Points are ``[K, 3]`` in millimetres of a space with orthonormal axes (world mm, or the voxels of an isotropic
grid), in the order of ``names``. Landmarks other than those four, and all of them when AC or PC is missing,
are left where they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from mdgru_keras.geometry._tensorflow import tf

# landmark -> the landmark whose coronal plane (perpendicular to the AC-PC line) it lies in
PLANE_ANCHORS = {"RLVAC": "AC", "LLVAC": "AC", "RLVPC": "PC", "LLVPC": "PC"}


def plane_constraints(names: Sequence[str]) -> list[tuple[int, int]]:
    """``(landmark, anchor)`` index pairs of the plane-defined landmarks in ``names``; empty unless both AC and
    PC are there (their line gives the planes' normal)."""
    index = {name: k for k, name in enumerate(names)}
    if "AC" not in index or "PC" not in index:
        return []
    return [(index[name], index[anchor]) for name, anchor in PLANE_ANCHORS.items() if name in index]


def _axis(names: Sequence[str]) -> tuple[int, int]:
    return list(names).index("AC"), list(names).index("PC")


def project_onto_planes(points: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """``points`` ``[K, 3]`` with each plane-defined landmark moved along the AC-PC line onto its plane."""
    result = np.array(points, dtype=np.float64, copy=True)
    constraints = plane_constraints(names)
    if not constraints:
        return result
    ac, pc = _axis(names)
    direction = (result[pc] - result[ac]) / np.linalg.norm(result[pc] - result[ac])
    for landmark, anchor in constraints:
        result[landmark] += np.dot(result[anchor] - result[landmark], direction) * direction
    return result


def project_onto_planes_tf(points: tf.Tensor, names: Sequence[str]) -> tf.Tensor:
    """:func:`project_onto_planes` in a TensorFlow graph (``points`` ``[K, 3]``, any float dtype)."""
    constraints = plane_constraints(names)
    if not constraints:
        return points
    ac, pc = _axis(names)
    direction = tf.math.l2_normalize(points[pc] - points[ac])
    landmarks = [landmark for landmark, _ in constraints]
    anchors = tf.gather(points, [anchor for _, anchor in constraints])
    moved = tf.gather(points, landmarks)
    moved += tf.reduce_sum((anchors - moved) * direction, axis=-1, keepdims=True) * direction
    return tf.tensor_scatter_nd_update(points, [[landmark] for landmark in landmarks], moved)


def place_on_planes(
    template_mm: np.ndarray,
    names: Sequence[str],
    to_subject: Callable[[np.ndarray], np.ndarray],
    tolerance_mm: float = 1e-4,
    max_iterations: int = 50,
) -> np.ndarray:
    """Subject positions ``[K, 3]`` of the template's landmarks ``template_mm`` ``[K, 3]`` under the point map
    ``to_subject`` (``[N, 3] -> [N, 3]``, template mm to subject mm), the plane-defined ones on their planes.

    Each plane-defined landmark slides along the template's AC-PC direction (its ventricle edge, which runs
    anterior-posterior) by the ``t`` mm for which ``to_subject(point + t * direction)`` lies in the subject's
    plane: through the subject's anchor, perpendicular to the subject's AC-PC line. Solved by the secant method
    from ``t = 0`` (a rigid map keeps a template point that lies in its plane where it is). Raises
    ``ValueError`` when it does not converge.
    """
    template = np.asarray(template_mm, dtype=np.float64)
    subject = np.asarray(to_subject(template), dtype=np.float64)
    constraints = plane_constraints(names)
    if not constraints:
        return subject
    ac, pc = _axis(names)
    template_direction = (template[pc] - template[ac]) / np.linalg.norm(template[pc] - template[ac])
    subject_direction = (subject[pc] - subject[ac]) / np.linalg.norm(subject[pc] - subject[ac])
    landmarks = np.array([landmark for landmark, _ in constraints])
    anchors = subject[[anchor for _, anchor in constraints]]

    def offset(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Subject points at slide ``t`` [L] and their signed distances [L] to their planes."""
        moved = np.asarray(to_subject(template[landmarks] + t[:, None] * template_direction), dtype=np.float64)
        return moved, (moved - anchors) @ subject_direction

    t_old = np.zeros(len(landmarks))
    points, f_old = offset(t_old)
    t = -f_old  # a first guess: the map stretches the AC-PC direction by about 1
    for _ in range(max_iterations):
        points, f = offset(t)
        if np.max(np.abs(f)) < tolerance_mm:
            subject[landmarks] = points
            return subject
        # secant slope per landmark; 1 (a plain fixed-point step) where the last step or the slope vanished
        step = t - t_old
        stepped = np.abs(step) > 1e-12
        slope = np.ones_like(t)
        slope[stepped] = (f - f_old)[stepped] / step[stepped]
        slope[np.abs(slope) <= 1e-6] = 1.0
        t_old, f_old = t, f
        t = t - f / slope
    raise ValueError(f"placing landmarks on their protocol planes did not converge in {max_iterations} steps "
                     f"({np.max(np.abs(f)):g} mm off)")
