"""Synthetic population: landmarks move with the image, reproducibility, files on disk, the command."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from mdgru_keras import geometry
from mdgru_keras.cli import main
from mdgru_keras.data.synth import SynthOptions, Template, load_template, make_subject, synthesize_population
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
    landmarks = {name: geometry.voxel_to_world(np.asarray(v), affine) for name, v in landmarks_voxel.items()}
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
        expected_voxel = geometry.world_to_voxel(world_mm, subject.voxel_to_world)
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
            expected_voxel = geometry.world_to_voxel(world_mm, subject.voxel_to_world)
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
    points = geometry.invert_displacement(target, displacement_at)
    np.testing.assert_allclose(points + displacement_at(points), target, atol=1e-6)
    with pytest.raises(ValueError, match="did not converge"):
        geometry.invert_displacement(target, lambda p: -3.0 * p)  # folds space: no fixed point iteration


def test_point_interpolation_matches_grid_resampling(rng: np.random.Generator) -> None:
    field = rng.normal(size=(6, 7, 5, 3))
    new_to_old = np.diag([0.37, 0.41, 0.29, 1.0])
    new_to_old[:3, 3] = [-0.6, 0.2, 0.1]  # also outside the grid: clamped alike
    new_shape = (17, 15, 19)
    resampled = geometry.resample_axis_aligned(field, new_to_old, new_shape)
    voxel = np.stack(np.meshgrid(*[np.arange(n) for n in new_shape], indexing="ij"), -1).reshape(-1, 3)
    at_points = geometry.interpolate_at(field, geometry.apply_affine(new_to_old, voxel))
    np.testing.assert_allclose(at_points, resampled.reshape(-1, 3), atol=1e-12)


def test_rotation_and_rigid_affine() -> None:
    rotation = geometry.rotation_matrix_deg([10.0, -20.0, 30.0])
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
    assert np.isclose(np.linalg.det(rotation), 1.0)
    np.testing.assert_allclose(geometry.rotation_matrix_deg([0, 0, 90]) @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    centre = np.array([1.0, 2.0, 3.0])
    affine = geometry.rigid_affine(rotation, [4.0, 5.0, 6.0], centre)
    np.testing.assert_allclose(geometry.apply_affine(affine, centre), centre + [4.0, 5.0, 6.0])


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
        bottom = geometry.voxel_to_world(np.array([0, 0, -0.5]), subject.voxel_to_world)[2]
        top = geometry.voxel_to_world(np.array([0, 0, shape[2] - 0.5]), subject.voxel_to_world)[2]
        if neck:
            assert bottom < low[2] - 0.05 * (high[2] - low[2]) and top - bottom >= high[2] - low[2]
        else:
            assert bottom > low[2] - 0.1 * (high[2] - low[2]) and top - bottom <= high[2] - low[2] + 1


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
