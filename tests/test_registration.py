"""Atlas-registration baseline: the RAS<->LPS plumbing and recovery of a known rigid motion."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813 (the usual SimpleITK alias)
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from mdgru_keras.baselines.registration import register_landmarks, to_sitk_image, transform_world_mm
from mdgru_keras.geometry import affine_maps

# A smooth phantom defined in world mm (RAS), so that a moved copy can be evaluated analytically on any grid.
# (centre mm, semi-axes mm, rotation about z in degrees, intensity)
ELLIPSOIDS = [
    ((0.0, 0.0, 0.0), (34.0, 30.0, 26.0), 0.0, 1.0),  # "head"
    ((12.0, 8.0, 6.0), (10.0, 6.0, 5.0), 30.0, 1.5),
    ((-14.0, -6.0, 4.0), (7.0, 11.0, 6.0), -20.0, 2.2),
    ((2.0, 14.0, -10.0), (6.0, 5.0, 9.0), 60.0, 0.4),
    ((-4.0, -16.0, 12.0), (5.0, 5.0, 5.0), 0.0, 3.0),
]


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    """Rotation by ``degrees`` about ``axis`` (any length)."""
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    return Rotation.from_rotvec(np.deg2rad(degrees) * axis).as_matrix()


def phantom(world_mm_ras: np.ndarray) -> np.ndarray:
    """Intensity at RAS points ``[..., 3]``: soft-edged ellipsoids (edge width ~1.5 mm)."""
    out = np.zeros(world_mm_ras.shape[:-1])
    for centre, axes, angle, value in ELLIPSOIDS:
        local = (world_mm_ras - np.asarray(centre)) @ _rotation([0, 0, 1], angle)
        radius = np.sqrt(((local / np.asarray(axes)) ** 2).sum(-1))
        out += value / (1.0 + np.exp((radius - 1.0) * min(axes) / 1.5))
    return out


def grid_world_mm(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    voxel = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    return affine_maps.voxel_to_world(voxel, affine)


def test_to_sitk_image_puts_voxels_at_their_ras_positions() -> None:
    # An LAS-oriented, anisotropic, rotated grid: every convention mistake would move the probed voxel.
    affine = np.eye(4)
    affine[:3, :3] = _rotation([1, 2, 3], 25.0) @ np.diag([-1.2, 0.9, 2.0])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    volume = np.zeros((7, 5, 4), np.float32)
    voxel = (5, 1, 2)
    volume[voxel] = 1.0
    image = to_sitk_image(volume, affine)
    assert image.GetSize() == (7, 5, 4)
    assert image.GetPixel(*voxel) == 1.0
    world_lps = np.array(image.TransformIndexToPhysicalPoint(voxel))
    np.testing.assert_allclose(affine_maps.lps_to_ras(world_lps), affine_maps.voxel_to_world(voxel, affine), atol=1e-9)
    np.testing.assert_allclose(
        affine_maps.affine_from_itk_geometry(image.GetOrigin(), image.GetSpacing(), image.GetDirection()),
        affine,
        atol=1e-9,
    )


def test_sheared_affine_is_refused() -> None:
    affine = np.eye(4)
    affine[0, 1] = 0.3
    with pytest.raises(ValueError, match="shear"):
        to_sitk_image(np.zeros((3, 3, 3)), affine)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-500, 500, allow_nan=False), min_size=3, max_size=3))
def test_ras_lps_round_trip(point: list[float]) -> None:
    ras = np.array(point)
    lps = affine_maps.ras_to_lps(ras)
    np.testing.assert_allclose(lps[:2], -ras[:2])
    np.testing.assert_allclose(lps[2], ras[2])
    np.testing.assert_allclose(affine_maps.lps_to_ras(lps), ras)


def test_transform_world_mm_speaks_ras() -> None:
    # A pure translation of +5 mm to the right (RAS x) is -5 mm along ITK's LPS x.
    transform = sitk.TranslationTransform(3, (-5.0, 0.0, 0.0))
    np.testing.assert_allclose(transform_world_mm(transform, np.array([1.0, 2.0, 3.0])), [6.0, 2.0, 3.0])


def test_registration_recovers_known_rigid_motion() -> None:
    template_affine = np.diag([1.5, 1.5, 1.5, 1.0])
    template_affine[:3, 3] = -1.5 * 31.5  # grid centred on the world origin
    template_shape = (64, 64, 64)
    template = phantom(grid_world_mm(template_shape, template_affine))

    # The scan shows the phantom moved by world_mm -> R @ world_mm + t: 10 degrees about an oblique axis
    # and 8 mm of translation, on a different, anisotropic grid.
    rotation = _rotation([1.0, 0.5, 0.3], 10.0)
    translation = 8.0 * np.array([0.6, -0.48, 0.64])
    target_affine = np.diag([1.6, 1.4, 1.8, 1.0])
    target_affine[:3, 3] = [-48.0, -44.0, -50.0]
    target_shape = (60, 64, 56)
    target_world = grid_world_mm(target_shape, target_affine)
    target = phantom((target_world - translation) @ rotation)  # phantom(R^-1 (p - t)), R^-1 = R.T

    names = ["A", "B", "C", "D", "E"]
    landmarks = {name: np.asarray(e[0], dtype=np.float64) for name, e in zip(names, ELLIPSOIDS)}
    landmarks["off-centre"] = np.array([20.0, -15.0, 10.0])
    expected = {name: rotation @ p + translation for name, p in landmarks.items()}

    found = register_landmarks(template, template_affine, landmarks, target, target_affine, seed=0)
    assert list(found) == list(landmarks)
    errors_mm = {name: float(np.linalg.norm(found[name] - expected[name])) for name in landmarks}
    # Without registration the landmarks are off by the motion itself (8 mm and more).
    assert min(np.linalg.norm(expected[n] - landmarks[n]) for n in landmarks) > 7.0
    assert max(errors_mm.values()) < 1.0, errors_mm
    # Seeded: the same call gives the same answer.
    again = register_landmarks(template, template_affine, landmarks, target, target_affine, seed=0)
    for name in landmarks:
        np.testing.assert_allclose(again[name], found[name], atol=1e-3)


# ---------------------------------------------------------------------------------------------------------
# small (48^3) synthetic pairs with a known map from template to scan world


def small_phantom(world_mm_ras: np.ndarray) -> np.ndarray:
    """:func:`phantom` shrunk to 3/4 (head semi-axes 25.5 x 22.5 x 19.5 mm), to fit a 48^3 grid of 1.5 mm."""
    return phantom(world_mm_ras / 0.75)


def centred_grid(shape: tuple[int, int, int], spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """RAS affine of a grid with the given voxel size whose centre is the world origin."""
    affine = np.diag([*spacing_mm, 1.0])
    affine[:3, 3] = -np.asarray(spacing_mm) * (np.asarray(shape) - 1) / 2
    return affine


SMALL_LANDMARKS = {
    **{f"E{i}": 0.75 * np.asarray(e[0], dtype=np.float64) for i, e in enumerate(ELLIPSOIDS)},
    "edge": np.array([18.0, -6.0, 3.0]),  # on the "head" outline
    "inner": np.array([-8.0, 10.0, -8.0]),
}
SMALL_SHAPE = (48, 48, 48)
SMALL_SPACING_MM = (1.5, 1.5, 1.5)


def scan_through(world_to_template: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A 48^3 scan (1.6 x 1.5 x 1.7 mm voxels) of the small phantom seen through ``world_to_template``
    (scan world -> template world), and its affine."""
    affine = centred_grid(SMALL_SHAPE, (1.6, 1.5, 1.7))
    return small_phantom(world_to_template(grid_world_mm(SMALL_SHAPE, affine))), affine


def landmark_errors_mm(found: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> np.ndarray:
    assert list(found) == list(expected)
    return np.array([np.linalg.norm(found[name] - expected[name]) for name in expected])


def test_registration_recovers_rigid_motion_and_scaling_of_small_volume() -> None:
    template_affine = centred_grid(SMALL_SHAPE, SMALL_SPACING_MM)
    template = small_phantom(grid_world_mm(SMALL_SHAPE, template_affine))
    # template world -> scan world: p -> M p + t, M = rotation @ anisotropic scaling
    linear = _rotation([0.3, -1.0, 0.6], 9.0) @ np.diag([0.92, 1.08, 1.04])
    translation = np.array([4.0, -3.0, 2.5])
    target, target_affine = scan_through(lambda p: (p - translation) @ np.linalg.inv(linear).T)
    expected = {name: linear @ p + translation for name, p in SMALL_LANDMARKS.items()}

    found = register_landmarks(template, template_affine, SMALL_LANDMARKS, target, target_affine, seed=0)
    errors = landmark_errors_mm(found, expected)
    unregistered = landmark_errors_mm(SMALL_LANDMARKS, expected)
    assert unregistered.mean() > 3.0, unregistered
    assert errors.max() < 1.0, errors  # below one template voxel (1.5 mm)


# ---------------------------------------------------------------------------------------------------------
# the ANTs (SyN) baseline: optional, needs antspyx

needs_ants = pytest.mark.skipif(
    importlib.util.find_spec("ants") is None,
    reason="antspyx (ANTsPy) is not installed: pip install 'mdgru-keras[ants]'",
)


@needs_ants
def test_to_ants_image_puts_voxels_at_their_ras_positions() -> None:
    import ants

    from mdgru_keras.baselines.ants_registration import to_ants_image

    affine = np.eye(4)
    affine[:3, :3] = _rotation([1, 2, 3], 25.0) @ np.diag([-1.2, 0.9, 2.0])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    volume = np.zeros((7, 5, 4), np.float32)
    voxel = (5, 1, 2)
    volume[voxel] = 1.0
    image = to_ants_image(volume, affine)
    assert image.shape == (7, 5, 4)
    assert image.numpy()[voxel] == 1.0
    world_lps = np.array(ants.transform_index_to_physical_point(image, voxel))
    np.testing.assert_allclose(affine_maps.lps_to_ras(world_lps), affine_maps.voxel_to_world(voxel, affine), atol=1e-4)


def smooth_bump(world_mm: np.ndarray) -> np.ndarray:
    """A smooth local displacement (mm, RAS) no affine map can follow: 5.4 mm at the centre of ellipsoid E1,
    falling off as a Gaussian of 10 mm."""
    centre = 0.75 * np.asarray(ELLIPSOIDS[1][0])
    weight = np.exp(-((world_mm - centre) ** 2).sum(-1) / (2 * 10.0**2))
    return weight[..., None] * np.array([3.5, -3.0, 2.8])


@needs_ants
def test_ants_syn_follows_a_deformation_that_affine_registration_cannot() -> None:
    from mdgru_keras.baselines import ants_registration

    template_affine = centred_grid(SMALL_SHAPE, SMALL_SPACING_MM)
    template = small_phantom(grid_world_mm(SMALL_SHAPE, template_affine))
    # template world -> scan world: p -> M p + t + bump(p); scan world -> template world by fixed-point
    # iteration of p = M^-1 (q - t - bump(p)) (a contraction: the bump's slope is below 0.25).
    linear = _rotation([1.0, 0.2, -0.4], 7.0) @ np.diag([1.05, 0.97, 1.02])
    translation = np.array([-3.0, 4.0, 2.0])
    inverse = np.linalg.inv(linear)

    def world_to_template(q: np.ndarray) -> np.ndarray:
        p = (q - translation) @ inverse.T
        for _ in range(40):
            p = (q - translation - smooth_bump(p)) @ inverse.T
        return p

    target, target_affine = scan_through(world_to_template)
    expected = {name: linear @ p + translation + smooth_bump(p) for name, p in SMALL_LANDMARKS.items()}
    np.testing.assert_allclose(world_to_template(np.stack(list(expected.values()))),
                               np.stack(list(SMALL_LANDMARKS.values())), atol=1e-6)  # fmt: skip

    affine_only = register_landmarks(template, template_affine, SMALL_LANDMARKS, target, target_affine, seed=0)
    syn = ants_registration.register_landmarks(template, template_affine, SMALL_LANDMARKS, target, target_affine)
    affine_errors = landmark_errors_mm(affine_only, expected)
    syn_errors = landmark_errors_mm(syn, expected)
    assert syn_errors.mean() < 0.75 * affine_errors.mean(), (syn_errors, affine_errors)
    assert syn_errors.max() < 1.5, syn_errors  # one template voxel
