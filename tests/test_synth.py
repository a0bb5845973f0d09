"""Synthetic population: landmarks move with the image, reproducibility, files on disk, the command."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

from mdgru_keras.cli import main
from mdgru_keras.data.deformation import interpolate_at, invert_displacement, rigid_affine
from mdgru_keras.data.synth import (
    CONTRAST_SEGMENTS,
    FAMILY_SPLIT,
    SynthOptions,
    Template,
    _displacement_field,
    acquisition_sigma_voxel,
    contrast_curve,
    contrast_knots,
    load_template,
    make_subject,
    remap_intensities,
    sample_parameters,
    synthesize_population,
)
from mdgru_keras.geometry import affine_maps
from mdgru_keras.geometry.resampling import resample_axis_aligned
from mdgru_keras.io import check_landmarks_inside, read_landmarks, read_volume, write_landmarks, write_volume

SHAPE = (40, 40, 40)
MARKER_SIGMA_VOXEL = 1.2
# small moves for a 40 mm template; strong enough that the scaling, rotation and deformation matter. No
# intensity change and 1 mm voxels: the markers keep their shape, so their centroids show where the image went.
SMALL = SynthOptions(
    max_scale=0.1,
    max_rotation_deg=15.0,
    max_translation_mm=3.0,
    elastic_mm=1.5,
    elastic_smoothness_mm=10.0,
    max_elastic_large_mm=2.0,
    elastic_large_smoothness_mm=25.0,
    elastic_grid_mm=4.0,
    lowres_probability=0.0,
    anisotropic_probability=0.0,
    max_contrast_log_slope=0.0,
    strong_contrast_probability=0.0,
    max_log_gamma=0.0,
    max_sharpen=0.0,
    max_blur_mm=0.0,
    bias_std=0.0,
    max_noise=0.0,
    landmark_margin_mm=5.0,
    neck_probability=0.5,
)


def template_affine() -> np.ndarray:
    affine = np.eye(4)
    affine[:3, 3] = [-20.0, -22.0, -15.0]
    return affine


def marker_template() -> Template:
    """Dark volume with a bright Gaussian marker at each (off-grid) landmark."""
    affine = template_affine()
    landmarks_voxel = {
        "A": [12.3, 14.6, 20.2],
        "B": [27.7, 13.1, 16.8],
        "C": [19.4, 27.9, 24.6],
        "D": [15.2, 22.5, 11.9],
    }
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij"), axis=-1)
    data = np.zeros(SHAPE, np.float32)
    for voxel in landmarks_voxel.values():
        squared = ((grid - np.asarray(voxel)) ** 2).sum(-1)
        data += (1000.0 * np.exp(-0.5 * squared / MARKER_SIGMA_VOXEL**2)).astype(np.float32)
    landmarks = {name: affine_maps.voxel_to_world(np.asarray(v), affine) for name, v in landmarks_voxel.items()}
    return Template({"T1w": data}, affine, landmarks, {"T1w": "memory"})


def marker_centroid_voxel(data: np.ndarray, around_voxel: np.ndarray, radius: int = 4) -> np.ndarray:
    centre = np.round(around_voxel).astype(int)
    lower = np.maximum(centre - radius, 0)
    upper = np.minimum(centre + radius + 1, data.shape)
    window = data[lower[0] : upper[0], lower[1] : upper[1], lower[2] : upper[2]].astype(np.float64)
    window = np.clip(window - 0.05 * window.max(), 0, None)
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lower, upper)], indexing="ij"), axis=-1)
    return (grid * window[..., None]).sum(axis=(0, 1, 2)) / window.sum()


@pytest.mark.parametrize("seed", range(5))
def test_landmarks_move_with_the_image(seed: int) -> None:
    template = marker_template()
    subject = make_subject(template, SMALL, np.random.default_rng(seed))
    assert subject.parameters["thick_axis"] is None
    for name, world_mm in subject.landmarks_world_mm.items():
        expected_voxel = affine_maps.world_to_voxel(world_mm, subject.voxel_to_world)
        found_voxel = marker_centroid_voxel(subject.data, expected_voxel)
        error = np.linalg.norm(found_voxel - expected_voxel)
        assert error < 0.35, (name, found_voxel, expected_voxel, subject.parameters)


def test_landmarks_move_with_the_image_with_thick_slices() -> None:
    template = marker_template()
    options = SynthOptions(**{**SMALL.__dict__, "anisotropic_probability": 1.0, "slice_thickness_mm": (2.0, 2.5)})
    for seed in range(3):
        subject = make_subject(template, options, np.random.default_rng(seed))
        spacing = np.asarray(subject.parameters["spacing_mm"])
        assert subject.parameters["thick_axis"] is not None and spacing.max() >= 2.0
        for world_mm in subject.landmarks_world_mm.values():
            expected_voxel = affine_maps.world_to_voxel(world_mm, subject.voxel_to_world)
            found_voxel = marker_centroid_voxel(subject.data, expected_voxel, radius=3)
            assert np.linalg.norm((found_voxel - expected_voxel) * spacing) < 0.6  # mm


def test_the_deformation_is_not_rigid() -> None:
    """Without the elastic part the markers' pairwise distances are kept; with it they change."""
    template = marker_template()
    names = list(template.landmarks_world_mm)

    def distances(landmarks: dict[str, np.ndarray]) -> np.ndarray:
        points = np.stack([landmarks[n] for n in names])
        return np.linalg.norm(points[:, None] - points[None], axis=-1)

    before = distances(template.landmarks_world_mm)
    no_elastic = {"elastic_mm": 0.0, "max_elastic_large_mm": 0.0, "max_scale": 0.0}
    rigid = make_subject(template, SynthOptions(**{**SMALL.__dict__, **no_elastic}), np.random.default_rng(1))
    np.testing.assert_allclose(distances(rigid.landmarks_world_mm), before, atol=1e-9)
    elastic = make_subject(template, SMALL, np.random.default_rng(1))
    assert np.abs(distances(elastic.landmarks_world_mm) - before).max() > 0.3


def test_invert_displacement_solves_the_forward_map(rng: np.random.Generator) -> None:
    def displacement_at(points_mm: np.ndarray) -> np.ndarray:
        return 2.0 * np.sin(points_mm[:, [1, 2, 0]] / 7.0)  # Jacobian norm <= 2/7

    target = rng.uniform(-50, 50, size=(20, 3))
    points = invert_displacement(target, displacement_at)
    np.testing.assert_allclose(points + displacement_at(points), target, atol=1e-6)
    with pytest.raises(ValueError, match="did not converge"):
        invert_displacement(target, lambda p: -3.0 * p)  # folds space: no fixed point iteration


def test_point_interpolation_matches_grid_resampling(rng: np.random.Generator) -> None:
    field = rng.normal(size=(6, 7, 5, 3))
    new_to_old = np.diag([0.37, 0.41, 0.29, 1.0])
    new_to_old[:3, 3] = [-0.6, 0.2, 0.1]  # also outside the grid: clamped alike
    new_shape = (17, 15, 19)
    resampled = resample_axis_aligned(field, new_to_old, new_shape)
    voxel = np.stack(np.meshgrid(*[np.arange(n) for n in new_shape], indexing="ij"), -1).reshape(-1, 3)
    at_points = interpolate_at(field, affine_maps.voxel_to_world(voxel, new_to_old))
    np.testing.assert_allclose(at_points, resampled.reshape(-1, 3), atol=1e-12)


def test_rotation_and_rigid_affine() -> None:
    rotation = affine_maps.rotation_matrix(np.deg2rad([10.0, -20.0, 30.0]))
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
    assert np.isclose(np.linalg.det(rotation), 1.0)
    np.testing.assert_allclose(affine_maps.rotation_matrix(np.deg2rad([0, 0, 90])) @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    centre = np.array([1.0, 2.0, 3.0])
    affine = rigid_affine(rotation, [4.0, 5.0, 6.0], centre)
    np.testing.assert_allclose(affine_maps.voxel_to_world(centre, affine), centre + [4.0, 5.0, 6.0])


def test_fields_of_view_centred_and_lowered() -> None:
    template = marker_template()
    low, high = template.world_bounds_mm()
    for neck, seed in [(0.0, 3), (1.0, 3)]:
        options = SynthOptions(
            **{**SMALL.__dict__, "neck_probability": neck, "max_translation_mm": 0.0, "max_scale": 0.0}
        )
        subject = make_subject(template, options, np.random.default_rng(seed))
        assert subject.parameters["neck"] is bool(neck)
        shape = np.asarray(subject.data.shape)
        bottom = affine_maps.voxel_to_world(np.array([0, 0, -0.5]), subject.voxel_to_world)[2]
        top = affine_maps.voxel_to_world(np.array([0, 0, shape[2] - 0.5]), subject.voxel_to_world)[2]
        if neck:
            assert bottom < low[2] - 0.05 * (high[2] - low[2]) and top - bottom >= high[2] - low[2]
        else:
            assert bottom > low[2] - 0.1 * (high[2] - low[2]) and top - bottom <= high[2] - low[2] + 1


# ---------------------------------------------------------------------------------------------------------
# head size, two elastic scales, appearance, resolution, families


def ramp_template(axis: int) -> Template:
    """The marker template's grid and landmarks with an image equal to the voxel index along ``axis``."""
    markers = marker_template()
    ramp = np.broadcast_to(
        np.arange(SHAPE[axis], dtype=np.float32).reshape([-1 if a == axis else 1 for a in range(3)]), SHAPE
    )
    return Template({"T1w": np.ascontiguousarray(ramp)}, markers.voxel_to_world, markers.landmarks_world_mm)


@pytest.mark.parametrize(("seed", "coarse"), [(0, False), (1, False), (2, False), (3, True), (4, True), (5, True)])
def test_landmarks_follow_a_coordinate_ramp(seed: int, coarse: bool) -> None:
    """Three subjects of one seed from ramp images are the template-voxel coordinates of every subject voxel:
    read at a landmark they give back its template voxel, with scaling, both elastic fields, blur or sharpening
    (a Gaussian and an unsharp mask leave a ramp as it is) and, ``coarse``, lower resolution or thick slices.
    What is left is the trilinear reading between subject voxels (larger between coarse ones)."""
    options = replace(SMALL, max_blur_mm=1.2, max_sharpen=1.0)
    if coarse:
        options = replace(options, lowres_probability=1.0, anisotropic_probability=0.5)
    subjects = [make_subject(ramp_template(axis), options, np.random.default_rng(seed)) for axis in range(3)]
    first = subjects[0]
    assert all(np.array_equal(s.voxel_to_world, first.voxel_to_world) for s in subjects)  # same draws
    assert (max(first.parameters["spacing_mm"]) > 1.0) is coarse
    template = marker_template()
    for name, world_mm in first.landmarks_world_mm.items():
        subject_voxel = affine_maps.world_to_voxel(world_mm, first.voxel_to_world)
        found = [ndimage.map_coordinates(s.data, subject_voxel[:, None], order=1)[0] for s in subjects]
        expected = affine_maps.world_to_voxel(template.landmarks_world_mm[name], template.voxel_to_world)
        error_voxel = np.abs(np.asarray(found) - expected).max()
        assert error_voxel < (0.1 if coarse else 0.02), (name, found, expected, first.parameters)


def test_scaling_about_the_template_centre() -> None:
    """With scaling alone the landmarks are exactly ``c + S (x - c)``, S the recorded per-axis factors."""
    template = marker_template()
    options = replace(
        SMALL, max_rotation_deg=0.0, max_translation_mm=0.0, elastic_mm=0.0, max_elastic_large_mm=0.0, max_scale=0.1
    )
    low, high = template.world_bounds_mm()
    centre = 0.5 * (low + high)
    for seed in range(3):
        subject = make_subject(template, options, np.random.default_rng(seed))
        scale = np.asarray(subject.parameters["scale"])
        assert np.all(np.abs(scale - 1) <= 0.1) and np.abs(scale - 1).max() > 0.01
        for name, world_mm in template.landmarks_world_mm.items():
            np.testing.assert_allclose(
                subject.landmarks_world_mm[name], centre + scale * (world_mm - centre), atol=1e-9
            )


def test_the_large_elastic_field_moves_landmarks_non_rigidly() -> None:
    template = marker_template()
    names = list(template.landmarks_world_mm)
    only_large = replace(SMALL, elastic_mm=0.0, max_scale=0.0, family="heldout")  # std >= 60 % of the largest

    def distances(options: SynthOptions) -> np.ndarray:
        subject = make_subject(template, options, np.random.default_rng(2))
        points = np.stack([subject.landmarks_world_mm[n] for n in names])
        return np.linalg.norm(points[:, None] - points[None], axis=-1)

    rigid = distances(replace(only_large, max_elastic_large_mm=0.0))
    assert np.abs(distances(only_large) - rigid).max() > 0.2


def test_a_field_smoother_than_its_grid_is_a_bounded_shift() -> None:
    """A correlation length beyond the control grid (a small template with the 50 mm default) gives a random
    shift of about the asked std, not a nearly constant field blown up to it."""
    shifts = np.stack([_displacement_field((9, 9, 9), 4.0, 50.0, 4.0, np.random.default_rng(s)) for s in range(20)])
    assert shifts.std(axis=(1, 2, 3)).max() < 0.4  # nearly constant over the grid
    assert 2.0 < shifts.mean(axis=(1, 2, 3)).std() < 6.0  # a shift of ~4 mm std across subjects


@pytest.mark.parametrize("family", ["all", "train", "heldout"])
def test_default_ranges_on_a_small_template(family: str) -> None:
    """Every default range on the 40 mm marker template: the landmarks stay landmark_margin_mm inside the field
    of view."""
    template = marker_template()
    options = SynthOptions(family=family, landmark_margin_mm=5.0, elastic_grid_mm=4.0)
    for seed in range(6):
        subject = make_subject(template, options, np.random.default_rng(seed))
        spacing = np.asarray(subject.parameters["spacing_mm"])
        shape = np.asarray(subject.data.shape)
        for world_mm in subject.landmarks_world_mm.values():
            voxel = affine_maps.world_to_voxel(world_mm, subject.voxel_to_world)
            inside_mm = np.minimum(voxel + 0.5, shape - 0.5 - voxel) * spacing
            assert inside_mm.min() > 5.0 - 1e-6, (seed, inside_mm, subject.parameters)
        assert np.isfinite(subject.data).all() and subject.data.min() >= 0


def tissue_template() -> Template:
    """Nested boxes of five intensities (background 0, 'scalp' 900, 'CSF' 150, 'grey' 500, 'white' 800) with
    a striped inner part (fine texture for the sharpness statistics), on the marker template's grid."""
    markers = marker_template()
    data = np.zeros(SHAPE, np.float32)
    data[4:36, 4:36, 3:37] = 900.0
    data[7:33, 7:33, 6:34] = 150.0
    data[9:31, 9:31, 8:32] = 500.0
    data[12:28, 12:28, 11:29] = 800.0
    data[12:28, 12:28, 11:29:3] = 500.0
    return Template({"T1w": data}, markers.voxel_to_world, markers.landmarks_world_mm)


def high_frequency(data: np.ndarray) -> float:
    return float(np.abs(data - ndimage.gaussian_filter(data, 1.0)).mean() / data.mean())


BASELINE = replace(SMALL, family="heldout")  # heldout: every drawn magnitude at least 60 % of its range


@pytest.mark.parametrize(
    "change",
    ["contrast", "strong_contrast", "gamma", "sharpen", "blur", "lowres", "thick_slices", "bias", "noise"],
)
def test_each_appearance_option_changes_the_image(change: str) -> None:
    """Against a subject of the same seed without it (same geometry: the draws do not depend on the options)."""
    template = tissue_template()
    overrides = {
        "contrast": {"max_contrast_log_slope": 0.4},
        "strong_contrast": {"strong_contrast_probability": 1.0},
        "gamma": {"max_log_gamma": 0.3},
        "sharpen": {"max_sharpen": 1.0, "sharpen_probability": 1.0},
        "blur": {"max_blur_mm": 1.2, "sharpen_probability": 0.0},
        "lowres": {"lowres_probability": 1.0},
        "thick_slices": {"anisotropic_probability": 1.0},
        "bias": {"bias_std": 0.3},
        "noise": {"max_noise": 0.06},
    }[change]
    seed = 4
    base = make_subject(template, BASELINE, np.random.default_rng(seed))
    changed = make_subject(template, replace(BASELINE, **overrides), np.random.default_rng(seed))
    if change in ("lowres", "thick_slices"):
        spacing = np.asarray(changed.parameters["spacing_mm"])
        assert spacing.max() >= (1.36 if change == "lowres" else 3.0)  # heldout: the upper part of the range
        assert np.prod(changed.data.shape) < 0.8 * np.prod(base.data.shape)
        return  # the matching blur: test_acquisition_blur
    assert base.data.shape == changed.data.shape
    np.testing.assert_array_equal(base.voxel_to_world, changed.voxel_to_world)
    tissue = {level: np.abs(base.data - level) < 1.0 for level in (0.0, 150.0, 500.0, 800.0, 900.0)}
    assert all(mask.sum() > 50 for mask in tissue.values())

    def mean_of(data: np.ndarray, level: float) -> float:
        return float(data[tissue[level]].mean())

    if change in ("contrast", "strong_contrast", "gamma"):
        ratios = [mean_of(d, 500.0) / mean_of(d, 800.0) for d in (base.data, changed.data)]
        assert abs(np.log(ratios[1] / ratios[0])) > 0.05, ratios
        if change != "strong_contrast":  # monotone: tissue ordering kept
            levels = [mean_of(changed.data, level) for level in (150.0, 500.0, 800.0, 900.0)]
            assert levels == sorted(levels)
    elif change == "sharpen":
        assert high_frequency(changed.data) > 1.2 * high_frequency(base.data)
    elif change == "blur":
        assert high_frequency(changed.data) < 0.8 * high_frequency(base.data)
    elif change == "bias":
        spread = [d[tissue[800.0]].std() / mean_of(d, 800.0) for d in (base.data, changed.data)]
        assert spread[1] > spread[0] + 0.05
    else:  # noise: the background is no longer dark
        assert mean_of(changed.data, 0.0) > mean_of(base.data, 0.0) + 0.03 * 900


def test_acquisition_blur() -> None:
    """The Gaussian (template voxels) that makes the template look acquired with the subject's voxels."""
    fwhm = 2 * np.sqrt(2 * np.log(2))
    identity = np.eye(4)
    np.testing.assert_allclose(acquisition_sigma_voxel(identity, identity, [1, 1, 3], 0.0), [0, 0, np.sqrt(8) / fwhm])
    np.testing.assert_allclose(acquisition_sigma_voxel(identity, identity, [1.5] * 3, 0.0), [np.sqrt(1.25) / fwhm] * 3)
    quarter_turn = rigid_affine(affine_maps.rotation_matrix(np.deg2rad([0, 0, 90])), [5, 0, 0], [1, 2, 3])
    np.testing.assert_allclose(  # thick subject x slices cut the template's y axis
        acquisition_sigma_voxel(identity, quarter_turn, [3, 1, 1], 0.0), [0, np.sqrt(8) / fwhm, 0], atol=1e-12
    )
    doubled = np.diag([2.0, 2.0, 2.0, 1.0])  # a head twice the template's size: 1 mm there is 0.5 mm here
    np.testing.assert_allclose(acquisition_sigma_voxel(identity, doubled, [1, 1, 1], 1.0), [0.5] * 3)
    fine = np.diag([0.5, 0.5, 0.5, 1.0])  # 0.5 mm template voxels
    np.testing.assert_allclose(
        acquisition_sigma_voxel(fine, identity, [1, 1, 1], 0.3), [np.hypot(np.sqrt(0.75) / fwhm, 0.3) / 0.5] * 3
    )


def test_contrast_curve_and_lookup(rng: np.random.Generator) -> None:
    volume = tissue_template().images["T1w"] + rng.uniform(0, 50, SHAPE).astype(np.float32)
    knots = contrast_knots(volume)
    assert len(knots) == CONTRAST_SEGMENTS + 1 and np.all(np.diff(knots) >= 0)
    log_slopes = rng.uniform(-0.4, 0.4, CONTRAST_SEGMENTS)
    values = contrast_curve(knots, {"contrast": "monotone", "contrast_log_slopes": log_slopes.tolist()})
    assert values[0] == knots[0] and np.all(np.diff(values) >= 0)  # monotone: ordering kept
    widths = np.diff(knots) > 1
    np.testing.assert_allclose(np.log(np.diff(values)[widths] / np.diff(knots)[widths]), log_slopes[widths])
    inside = np.linspace(knots[0], knots[-1], 101).astype(np.float32)
    remapped = remap_intensities(inside, knots, values, 1.0)
    np.testing.assert_allclose(remapped, np.interp(inside, knots, values), rtol=1e-4, atol=0.05 * np.ptp(knots) / 2048)
    identity = remap_intensities(inside, knots, knots, 1.7)  # gamma alone, on intensities normalized to [min, p99]
    normalized = (inside - knots[0]) / (knots[-2] - knots[0])
    expected = knots[0] + (knots[-2] - knots[0]) * normalized**1.7
    np.testing.assert_allclose(identity, expected, rtol=1e-3, atol=1e-3 * np.ptp(knots))
    strong = contrast_curve(knots, {"contrast": "strong", "contrast_values": [0.9, 0.1, 0.5, 0.2, 0.7, 0.3, 1.0, 0.4]})
    assert np.any(np.diff(strong) < 0)  # a strong curve need not keep the ordering


def test_families_draw_disjoint_ranges() -> None:
    draws = {
        family: [sample_parameters(SynthOptions(family=family), np.random.default_rng([9, i])) for i in range(400)]
        for family in ("all", "train", "heldout")
    }

    def values(family: str, key: str) -> np.ndarray:
        return np.concatenate([np.ravel(d[key]) for d in draws[family] if key in d])

    split = {  # magnitude of each split draw
        "scale": lambda family: np.abs(values(family, "scale") - 1),
        "elastic_large_mm": lambda family: values(family, "elastic_large_mm"),
        "contrast_log_slopes": lambda family: np.abs(values(family, "contrast_log_slopes")),
        "gamma": lambda family: np.abs(np.log(values(family, "gamma"))),
        "sharpen_amount": lambda family: values(family, "sharpen_amount")[values(family, "sharpen_amount") > 0],
        "blur_sigma_mm": lambda family: values(family, "blur_sigma_mm")[values(family, "blur_sigma_mm") > 0],
        "noise_fraction": lambda family: values(family, "noise_fraction"),
        "lowres_spacing_mm": lambda family: np.array([min(d["spacing_mm"]) for d in draws[family] if d["lowres"]]),
        "slice_thickness_mm": lambda family: np.array(
            [d["spacing_mm"][d["thick_axis"]] for d in draws[family] if d["thick_axis"] is not None]
        ),
    }
    for key, magnitude in split.items():
        train, heldout, everything = magnitude("train"), magnitude("heldout"), magnitude("all")
        assert len(train) > 20 and len(heldout) > 20, key
        assert train.max() < heldout.min(), (key, train.max(), heldout.min())
        assert everything.min() < train.max() and everything.max() > heldout.min(), key  # all spans both
    defaults = SynthOptions()
    assert np.abs(values("train", "scale") - 1).max() <= FAMILY_SPLIT * defaults.max_scale
    assert np.abs(values("heldout", "scale") - 1).min() >= FAMILY_SPLIT * defaults.max_scale
    strong = {family: sum(d["contrast"] == "strong" for d in draws[family]) for family in draws}
    assert strong["train"] == 0 and strong["heldout"] > 5 and strong["all"] > 5  # random curves only outside train


def test_switching_options_off_keeps_the_other_draws() -> None:
    """sample_parameters takes the same random numbers whatever the options, so that a subject with one option
    switched off has the same geometry and later draws as with it on."""
    off = SynthOptions(
        max_scale=0.0, max_elastic_large_mm=0.0, lowres_probability=0.0, anisotropic_probability=0.0,
        max_contrast_log_slope=0.0, strong_contrast_probability=0.0, max_log_gamma=0.0, max_sharpen=0.0,
        max_blur_mm=0.0, max_noise=0.0,
    )  # fmt: skip
    drawn, next_draw = [], []
    for options in (off, SynthOptions(), SynthOptions(family="train"), SynthOptions(family="heldout")):
        rng = np.random.default_rng(3)
        drawn.append(sample_parameters(options, rng))
        next_draw.append(rng.random())
        json.dumps(drawn[-1])  # JSON-ready, for synth.json
    assert len(set(next_draw)) == 1
    assert all(d["rotation_deg"] == drawn[0]["rotation_deg"] for d in drawn)
    assert drawn[0]["scale"] == [1.0, 1.0, 1.0] and drawn[0]["gamma"] == 1.0 and drawn[0]["spacing_mm"] == [1.0] * 3
    assert drawn[0]["elastic_large_mm"] == drawn[0]["noise_fraction"] == drawn[0]["blur_sigma_mm"] == 0.0


def test_head_size_centre_and_pitch_range_map_the_same_draws() -> None:
    """``scale_centre`` multiplies the drawn head-size factors and ``pitch_deg`` maps the drawn angle about x onto
    +-[low, high] (sign kept, magnitude scaled); neither takes a random number, so every other draw of a seed is
    the same."""
    plain_rng, moved_rng = np.random.default_rng(7), np.random.default_rng(7)
    plain = [sample_parameters(SynthOptions(), plain_rng) for _ in range(20)]
    options = SynthOptions(scale_centre=0.87, max_scale=0.03, pitch_deg=(20.0, 30.0))
    moved = [sample_parameters(options, moved_rng) for _ in range(20)]
    assert plain_rng.random() == moved_rng.random()
    for a, b in zip(plain, moved):
        np.testing.assert_allclose(b["scale"], 0.87 * (1 + 0.3 * (np.asarray(a["scale"]) - 1)), rtol=1e-12)
        assert np.sign(b["rotation_deg"][0]) == np.sign(a["rotation_deg"][0])
        np.testing.assert_allclose(abs(b["rotation_deg"][0]), 20 + 10 * abs(a["rotation_deg"][0]) / 15, rtol=1e-12)
        assert b["rotation_deg"][1:] == a["rotation_deg"][1:]
        assert {k: v for k, v in b.items() if k not in ("scale", "rotation_deg")} == {
            k: v for k, v in a.items() if k not in ("scale", "rotation_deg")}
    assert {np.sign(b["rotation_deg"][0]) for b in moved} == {-1.0, 1.0}


def test_defacing_removes_the_face_region_and_nothing_else() -> None:
    """``deface``: the subject is the same head with the voxels whose template position lies below the defacing
    line set to 0: the marker placed there (D) is gone, the others are as bright as without defacing, and the
    landmarks do not move."""
    template = marker_template()
    # the line through (y, z) = (-5, -8) and (10, 12) mm: D (y 0.5, z -3.1 mm) lies 2.4 mm below it, A, B and C
    # 3 mm and more above
    options = replace(SMALL, neck_probability=0.0, deface_line_yz_mm=((-5.0, -8.0), (10.0, 12.0)))
    plain = make_subject(template, options, np.random.default_rng(4))
    defaced = make_subject(template, replace(options, deface=True), np.random.default_rng(4))
    for name in "ABCD":
        np.testing.assert_array_equal(defaced.landmarks_world_mm[name], plain.landmarks_world_mm[name])
    removed = (defaced.data == 0) & (plain.data != 0)
    assert 0.05 < removed.mean() < 0.6
    np.testing.assert_array_equal(defaced.data[~removed], plain.data[~removed])
    inverse = np.linalg.inv(plain.voxel_to_world)
    for name, gone in (("A", False), ("B", False), ("C", False), ("D", True)):
        voxel = np.round(affine_maps.voxel_to_world(plain.landmarks_world_mm[name], inverse)).astype(int)
        assert plain.data[tuple(voxel)] > 300
        assert (defaced.data[tuple(voxel)] == 0) == gone, name
    assert defaced.parameters["defaced"] and "defaced" not in plain.parameters


@pytest.mark.parametrize(
    ("field_name", "value", "message"),
    [
        ("max_scale", 1.0, "max_scale must be in [0, 1), got 1.0"),
        ("max_scale", -0.1, "max_scale must be in [0, 1), got -0.1"),
        ("max_elastic_large_mm", -1.0, "max_elastic_large_mm must be >= 0, got -1.0"),
        ("elastic_large_smoothness_mm", 0.0, "elastic_large_smoothness_mm must be > 0, got 0.0"),
        ("lowres_probability", 1.5, "lowres_probability must be in [0, 1], got 1.5"),
        ("lowres_spacing_mm", (2.0, 1.0), "lowres_spacing_mm must be (low, high) with 0 < low <= high, got (2.0, 1.0)"),
        (
            "slice_thickness_mm",
            (0.0, 3.0),
            "slice_thickness_mm must be (low, high) with 0 < low <= high, got (0.0, 3.0)",
        ),
        ("max_contrast_log_slope", -0.4, "max_contrast_log_slope must be >= 0, got -0.4"),
        ("strong_contrast_probability", 2.0, "strong_contrast_probability must be in [0, 1], got 2.0"),
        ("max_log_gamma", float("nan"), "max_log_gamma must be >= 0, got nan"),
        ("sharpen_probability", -0.5, "sharpen_probability must be in [0, 1], got -0.5"),
        ("max_sharpen", -1.0, "max_sharpen must be >= 0, got -1.0"),
        ("max_blur_mm", -1.0, "max_blur_mm must be >= 0, got -1.0"),
        ("max_noise", -0.01, "max_noise must be >= 0, got -0.01"),
        ("family", "test", "family must be all, train or heldout, got 'test'"),
        ("scale_centre", 0.0, "scale_centre must be > 0, got 0.0"),
        ("pitch_deg", (30.0, 20.0), "pitch_deg must be (low, high) with 0 <= low <= high, got (30.0, 20.0)"),
        ("deface_line_yz_mm", ((1.0, 0.0), (1.0, 5.0)),
         "deface_line_yz_mm needs two points of different y, got ((1.0, 0.0), (1.0, 5.0))"),
    ],
)
def test_options_validation(field_name: str, value: object, message: str) -> None:
    with pytest.raises(ValueError) as error:
        SynthOptions(**{field_name: value})
    assert str(error.value) == message


# ---------------------------------------------------------------------------------------------------------
# the population on disk


@pytest.fixture
def template_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    template = marker_template()
    body = np.zeros(SHAPE, np.float32)
    body[8:32, 8:32, 6:34] = 300.0
    t1 = write_volume(tmp_path / "tpl_T1w.nii.gz", template.images["T1w"] + body, template.voxel_to_world)
    t2 = write_volume(tmp_path / "tpl_T2w.nii.gz", 2000.0 - body, template.voxel_to_world)
    landmarks = write_landmarks(tmp_path / "tpl.fcsv", template.landmarks_world_mm)
    return t1, t2, landmarks


def read_population(out_dir: Path) -> list[tuple[dict, np.ndarray, dict[str, np.ndarray]]]:
    with open(out_dir / "manifest.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    return [
        (
            row,
            np.asarray(nib.load(str(out_dir / row["image"])).get_fdata(dtype=np.float32)),
            read_landmarks(out_dir / row["landmarks"]),
        )
        for row in rows
    ]


def test_population_files_manifest_and_reproducibility(tmp_path: Path, template_files) -> None:
    t1, t2, landmarks = template_files
    template = load_template(t1, landmarks, t2)
    assert template.labels == ["T1w", "T2w"]
    options = SynthOptions(**{**SMALL.__dict__, "bias_std": 0.2, "max_noise": 0.05})
    first = read_population(synthesize_population(template, 3, tmp_path / "a", seed=7, options=options).parent)
    again = read_population(
        synthesize_population(template, 3, tmp_path / "b", seed=7, options=options, workers=2).parent
    )
    other = read_population(synthesize_population(template, 3, tmp_path / "c", seed=8, options=options).parent)
    assert [row["subject"] for row, _, _ in first] == ["synth-0000", "synth-0001", "synth-0002"]
    assert (tmp_path / "a" / "manifest.csv").read_text().splitlines()[0] == "subject,image,landmarks,split"
    for (row_a, data_a, lm_a), (row_b, data_b, lm_b) in zip(first, again):
        assert row_a == row_b and row_a["split"] == ""
        np.testing.assert_array_equal(data_a, data_b)
        assert list(lm_a) == list(lm_b) == ["A", "B", "C", "D"]
        for name in lm_a:
            np.testing.assert_array_equal(lm_a[name], lm_b[name])
    assert any(not np.array_equal(a[2]["A"], c[2]["A"]) for a, c in zip(first, other))
    for row, _, lm in first:
        volume = read_volume(tmp_path / "a" / row["image"], spacing_mm=None)
        check_landmarks_inside(volume, lm, row["landmarks"])  # raises if a landmark left the field of view
        assert row["image"].startswith(f"images/{row['subject']}_T") and row["landmarks"].endswith(".fcsv")
    description = json.loads((tmp_path / "a" / "synth.json").read_text())
    assert description["seed"] == 7 and len(description["subjects"]) == 3
    assert description["options"]["elastic_mm"] == SMALL.elastic_mm


def test_image2_probability_picks_the_modality(tmp_path: Path, template_files) -> None:
    t1, t2, landmarks = template_files
    template = load_template(t1, landmarks, t2)
    for probability, label in [(0.0, "T1w"), (1.0, "T2w")]:
        options = SynthOptions(**{**SMALL.__dict__, "image2_probability": probability})
        labels = {make_subject(template, options, np.random.default_rng(s)).parameters["modality"] for s in range(4)}
        assert labels == {label}


def test_synth_command(tmp_path: Path, template_files) -> None:
    t1, t2, landmarks = template_files
    out = tmp_path / "out"
    args = ["synth", "--image", str(t1), "--image2", str(t2), "--landmarks", str(landmarks), "--n", "2"]
    args += ["--out", str(out), "--seed", "3", "--max-translation-mm", "3", "--elastic-smoothness-mm", "10"]
    result = CliRunner().invoke(main, [*args, "--landmark-format", "mrk.json", "--gzip"])
    assert result.exit_code == 0, result.output
    assert f"Wrote 2 synthetic subjects to {out} (manifest {out / 'manifest.csv'}" in result.output
    assert result.output.rstrip().endswith("synth.json)")  # the last line says what was written
    population = read_population(out)
    assert len(population) == 2 and all(row["image"].endswith(".nii.gz") for row, _, _ in population)
    assert all(row["landmarks"].endswith(".mrk.json") for row, _, _ in population)


def test_synth_command_refuses_mismatched_grids(tmp_path: Path, template_files) -> None:
    t1, _, landmarks = template_files
    other = write_volume(tmp_path / "other_T2w.nii.gz", np.random.default_rng(0).normal(size=(30, 30, 30)), np.eye(4))
    args = ["synth", "--image", str(t1), "--image2", str(other), "--landmarks", str(landmarks), "--n", "1"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert f"Error: {other}: its voxel grid differs from tpl_T1w.nii.gz's" in result.output
    outside = write_landmarks(tmp_path / "outside.csv", {"far": np.array([500.0, 0.0, 0.0])})
    result = CliRunner().invoke(
        main, ["synth", "--image", str(t1), "--landmarks", str(outside), "--n", "1", "--out", "x"]
    )
    assert result.exit_code == 1 and "landmark 'far' at (500.0, 0.0, 0.0) mm lies outside the image" in result.output


def test_synth_command_defaults_match_the_options() -> None:
    """The command repeats SynthOptions' defaults (the library is imported lazily); they must agree."""
    from mdgru_keras.commands.synth import synth

    defaults = SynthOptions()
    fields = {name for name in defaults.__dataclass_fields__}
    matched = [p for p in synth.params if p.name in fields]
    assert len(matched) >= 24
    for parameter in matched:
        expected = getattr(defaults, parameter.name)
        assert parameter.default == expected, (parameter.name, parameter.default, expected)


def test_synth_command_family_and_new_ranges(tmp_path: Path, template_files) -> None:
    t1, _, landmarks = template_files
    out = tmp_path / "heldout"
    args = ["synth", "--image", str(t1), "--landmarks", str(landmarks), "--n", "2", "--out", str(out)]
    args += ["--max-translation-mm", "3", "--elastic-smoothness-mm", "10", "--elastic-large-smoothness-mm", "20"]
    args += ["--family", "heldout", "--max-scale", "0.05", "--lowres-probability", "1", "--lowres-spacing-mm", "1", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    description = json.loads((out / "synth.json").read_text())
    assert description["options"]["family"] == "heldout" and description["options"]["max_scale"] == 0.05
    for subject in description["subjects"]:
        assert subject["family"] == "heldout"
        assert all(0.03 <= abs(s - 1) <= 0.05 for s in subject["scale"])  # the outer 40 % of the range
        assert subject["lowres"] and min(subject["spacing_mm"]) >= 1.6
    result = CliRunner().invoke(main, [*args[:9], "--lowres-spacing-mm", "2", "1"])
    assert result.exit_code == 2 and "lowres_spacing_mm must be (low, high) with 0 < low <= high" in result.output


def test_synth_command_acquisition_options(tmp_path: Path, template_files) -> None:
    """--scale-centre, --pitch-deg and --deface reach the options and every subject's draws."""
    t1, _, landmarks = template_files
    out = tmp_path / "tilted"
    args = ["synth", "--image", str(t1), "--landmarks", str(landmarks), "--n", "2", "--out", str(out)]
    args += ["--max-translation-mm", "3", "--elastic-smoothness-mm", "10", "--elastic-large-smoothness-mm", "20"]
    args += ["--scale-centre", "0.9", "--max-scale", "0.02", "--pitch-deg", "20", "30", "--deface"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    description = json.loads((out / "synth.json").read_text())
    assert description["options"]["deface"] and description["options"]["pitch_deg"] == [20.0, 30.0]
    for subject in description["subjects"]:
        assert all(0.88 <= s <= 0.92 for s in subject["scale"])
        assert 20 <= abs(subject["rotation_deg"][0]) <= 30 and subject["defaced"]
