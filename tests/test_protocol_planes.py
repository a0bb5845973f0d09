"""The AFIDs landmarks defined by the coronal planes of AC and PC: projection of estimates onto the planes, and
synthetic labels placed where a moved ventricle edge meets the moved plane."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import tensorflow as tf

from mdgru_keras.data.synth import Template, make_subject, subject_landmarks
from mdgru_keras.geometry import affine_maps
from mdgru_keras.geometry.protocol_planes import (
    PLANE_ANCHORS,
    place_on_planes,
    plane_constraints,
    project_onto_planes,
    project_onto_planes_tf,
)
from tests.test_synth import SMALL, marker_template

NAMES = ["AC", "PC", "RLVAC", "LLVAC", "RLVPC", "LLVPC", "GENU"]


def _template_points() -> np.ndarray:
    """AC-PC along y (27 mm apart), the ventricle points in the coronal planes of AC and PC (as in AFIDs)."""
    return np.array([
        [0.0, 2.0, -3.0],     # AC
        [0.0, -25.0, -3.0],   # PC
        [13.0, 2.0, 14.0],    # RLVAC: AC's plane
        [-12.0, 2.0, 15.0],   # LLVAC
        [17.0, -25.0, 16.0],  # RLVPC: PC's plane
        [-16.0, -25.0, 15.0],  # LLVPC
        [0.0, 28.0, 10.0],    # GENU: no plane
    ])


def _plane_distance(points: np.ndarray, names: list[str]) -> np.ndarray:
    """Signed distance of each plane-defined landmark to its plane (AC-PC direction of ``points`` itself)."""
    ac, pc = points[names.index("AC")], points[names.index("PC")]
    direction = (pc - ac) / np.linalg.norm(pc - ac)
    return np.array([np.dot(points[landmark] - points[anchor], direction)
                     for landmark, anchor in plane_constraints(names)])


def test_constraints_need_ac_and_pc() -> None:
    assert plane_constraints(NAMES) == [(2, 0), (3, 0), (4, 1), (5, 1)]
    assert plane_constraints(["AC", "RLVAC", "RLVPC"]) == []
    assert plane_constraints(["PMJ", "AC", "PC"]) == []
    assert set(PLANE_ANCHORS.values()) == {"AC", "PC"}


def test_projection_moves_only_the_plane_landmarks_along_ac_pc_onto_their_planes() -> None:
    rng = np.random.default_rng(0)
    points = _template_points() + rng.normal(0.0, 3.0, size=(len(NAMES), 3))
    projected = project_onto_planes(points, NAMES)
    np.testing.assert_allclose(_plane_distance(projected, NAMES), 0.0, atol=1e-9)
    assert np.abs(_plane_distance(points, NAMES)).min() > 0.01  # they were off their planes
    direction = (points[1] - points[0]) / np.linalg.norm(points[1] - points[0])
    moves = projected - points
    np.testing.assert_allclose(np.cross(moves, direction), 0.0, atol=1e-9)  # along the AC-PC line only
    np.testing.assert_array_equal(projected[[0, 1, 6]], points[[0, 1, 6]])
    np.testing.assert_allclose(project_onto_planes(projected, NAMES), projected, atol=1e-9)  # idempotent
    # the TensorFlow form agrees, also in float32
    np.testing.assert_allclose(project_onto_planes_tf(tf.constant(points), NAMES).numpy(), projected, atol=1e-9)
    np.testing.assert_allclose(
        project_onto_planes_tf(tf.constant(points, tf.float32), NAMES).numpy(), projected, atol=1e-4
    )
    without_pc = [name for name in NAMES if name != "PC"]
    rows = [NAMES.index(name) for name in without_pc]
    np.testing.assert_array_equal(project_onto_planes(points[rows], without_pc), points[rows])


def _smooth_map(strength: float):
    """A template -> subject map: scaling along oblique axes (no longer perpendicular to AC-PC), rotation,
    shift and a smooth nonlinear displacement."""
    rotation = affine_maps.rotation_matrix(np.deg2rad([8.0, -5.0, 12.0]))
    oblique = affine_maps.rotation_matrix(np.deg2rad([25.0, 0.0, 30.0]))
    linear = rotation @ oblique.T @ np.diag([1.08, 0.92, 1.03]) @ oblique

    def to_subject(points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64)
        bend = strength * np.stack([np.sin(points[:, 1] / 9.0), np.sin(points[:, 2] / 11.0 + 0.5),
                                    np.cos(points[:, 0] / 10.0)], axis=1)
        return (points + bend) @ linear.T + np.array([3.0, -7.0, 2.0])

    return to_subject


def test_a_rigid_map_keeps_the_moved_labels() -> None:
    rotation = affine_maps.rotation_matrix(np.deg2rad([10.0, 20.0, -15.0]))

    def rigid(points: np.ndarray) -> np.ndarray:
        return np.asarray(points) @ rotation.T + np.array([5.0, -3.0, 8.0])

    template = _template_points()
    np.testing.assert_allclose(place_on_planes(template, NAMES, rigid), rigid(template), atol=1e-6)


@pytest.mark.parametrize("strength", [0.0, 2.0, 4.0])
def test_placed_labels_lie_on_the_moved_edge_and_the_subjects_planes(strength: float) -> None:
    to_subject = _smooth_map(strength)
    template = _template_points()
    moved = to_subject(template)
    placed = place_on_planes(template, NAMES, to_subject)
    np.testing.assert_allclose(_plane_distance(placed, NAMES), 0.0, atol=1e-4)
    assert np.abs(_plane_distance(moved, NAMES)).max() > 0.3  # the map moves the tissue off the planes
    np.testing.assert_array_equal(placed[[0, 1, 6]], moved[[0, 1, 6]])
    # each placed label is the image of a point on the template's line through the landmark along AC-PC
    direction = (template[1] - template[0]) / np.linalg.norm(template[1] - template[0])
    slides = np.linspace(-15.0, 15.0, 30001)
    for landmark, _ in plane_constraints(NAMES):
        curve = to_subject(template[landmark] + slides[:, None] * direction)
        assert np.linalg.norm(curve - placed[landmark], axis=1).min() < 2e-3


def test_synthetic_labels_on_the_protocol_planes() -> None:
    """``SynthOptions.protocol_planes``: the same subject (image and other labels), the ventricle points on the
    subject's planes; without it they move with the tissue, off the planes."""
    markers = marker_template()
    points = _template_points() * 0.5 + np.array([0.0, 0.0, 5.0])  # inside the 40 mm marker template
    template = Template(markers.images, markers.voxel_to_world, dict(zip(NAMES, points)), markers.sources)
    options = replace(SMALL, max_rotation_deg=5.0, landmark_margin_mm=1.0)
    tissue = make_subject(template, options, np.random.default_rng(3))
    protocol = make_subject(template, replace(options, protocol_planes=True), np.random.default_rng(3))
    np.testing.assert_array_equal(tissue.data, protocol.data)
    tissue_mm = np.stack([tissue.landmarks_world_mm[name] for name in NAMES])
    protocol_mm = np.stack([protocol.landmarks_world_mm[name] for name in NAMES])
    np.testing.assert_array_equal(tissue_mm[[0, 1, 6]], protocol_mm[[0, 1, 6]])
    np.testing.assert_allclose(_plane_distance(protocol_mm, NAMES), 0.0, atol=1e-4)
    assert np.abs(_plane_distance(tissue_mm, NAMES)).max() > 0.05
    # the labels alone, without the image, from the same random state (how bench-pretrained relabels heads)
    for subject, subject_options in ((tissue, options), (protocol, replace(options, protocol_planes=True))):
        labels = subject_landmarks(template, subject_options, np.random.default_rng(3))
        for name in NAMES:
            np.testing.assert_array_equal(labels[name], subject.landmarks_world_mm[name])
