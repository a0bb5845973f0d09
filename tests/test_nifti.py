"""NIfTI reading (reorientation, resampling, coordinate bookkeeping), writing, and the grid math behind it."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage
from scipy.spatial.transform import Rotation

from mdgru_keras.errors import InputError
from mdgru_keras.geometry import affine_maps
from mdgru_keras.geometry.resampling import (
    canonical_resampling_grid,
    canonical_resampling_grid_tf,
    closest_canonical_orientation,
    resample_axis_aligned,
    resample_axis_aligned_tf,
)
from mdgru_keras.io import read_volume, write_volume
from mdgru_keras.preprocessing import OUTLIER_PERCENTILE, OUTLIER_SAMPLE_STRIDE


def random_affine(rng: np.random.Generator, oblique_deg: float = 20.0) -> np.ndarray:
    """A voxel->world affine with a random axis permutation, flips, anisotropic spacing and a small rotation."""
    permutation = np.eye(3)[rng.permutation(3)]
    flips = np.diag(rng.choice([-1.0, 1.0], size=3))
    spacing = np.diag(rng.uniform(0.6, 3.0, size=3))
    rotation = Rotation.from_rotvec(np.deg2rad(oblique_deg) * rng.uniform(-1, 1, size=3) / np.sqrt(3)).as_matrix()
    affine = np.eye(4)
    affine[:3, :3] = rotation @ permutation @ flips @ spacing
    affine[:3, 3] = rng.uniform(-100, 100, size=3)
    return affine


def scipy_resample(volume: np.ndarray, new_to_old: np.ndarray, new_shape: tuple[int, int, int]) -> np.ndarray:
    """The reference: trilinear resampling through any 4x4 ``new_to_old`` voxel map, edges clamped."""
    new_to_old = np.asarray(new_to_old, dtype=np.float64)
    return ndimage.affine_transform(
        np.asarray(volume),
        new_to_old[:3, :3],
        offset=new_to_old[:3, 3],
        output_shape=tuple(int(n) for n in new_shape),
        order=1,
        mode="nearest",
    )


def save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


# ---------------------------------------------------------------------------------------------------------
# grid math


def test_closest_canonical_orientation_matches_nibabel(rng: np.random.Generator) -> None:
    for _ in range(200):
        affine = random_affine(rng, oblique_deg=60.0)
        world_axis, flip = closest_canonical_orientation(affine)
        expected = nib.orientations.io_orientation(affine)
        np.testing.assert_array_equal(world_axis, expected[:, 0].astype(int))
        np.testing.assert_array_equal(flip, expected[:, 1] < 0)


def test_canonical_grid_is_ras_and_consistent(rng: np.random.Generator) -> None:
    for _ in range(50):
        affine = random_affine(rng)
        shape = tuple(int(n) for n in rng.integers(5, 40, size=3))
        for spacing_mm in (None, 1.0, 1.7):
            new_shape, new_affine, new_to_old = canonical_resampling_grid(shape, affine, spacing_mm)
            np.testing.assert_allclose(new_affine, affine @ new_to_old, atol=1e-9)
            # each new axis runs mostly along the matching RAS world axis, forwards
            unit = new_affine[:3, :3] / affine_maps.voxel_spacing_mm(new_affine)
            assert np.all(np.argmax(np.abs(unit), axis=0) == [0, 1, 2])
            assert np.all(np.diag(unit) > 0)
            if spacing_mm is not None:
                np.testing.assert_allclose(affine_maps.voxel_spacing_mm(new_affine), spacing_mm, rtol=1e-9)
            # the new grid spans the old field of view: its corners map inside the old grid (within one new voxel)
            old_shape = np.asarray(shape)
            corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in new_shape], indexing="ij")).reshape(3, -1).T
            old_corners = corners @ new_to_old[:3, :3].T + new_to_old[:3, 3]
            old_spacing = affine_maps.voxel_spacing_mm(affine)
            slack = (spacing_mm or 0.0) / old_spacing + 1e-9
            assert np.all(old_corners.min(axis=0) >= -0.5 - slack)
            assert np.all(old_corners.max(axis=0) <= old_shape - 0.5 + slack)


def test_canonical_grid_numpy_and_tf_agree(rng: np.random.Generator) -> None:
    for _ in range(20):
        affine = random_affine(rng, oblique_deg=40.0)
        shape = tuple(int(n) for n in rng.integers(5, 60, size=3))
        for spacing_mm in (None, 1.0, 0.8):
            expected = canonical_resampling_grid(shape, affine, spacing_mm)
            got = canonical_resampling_grid_tf(tf.constant(shape), tf.constant(affine), spacing_mm)
            np.testing.assert_array_equal(got[0].numpy(), expected[0])
            np.testing.assert_allclose(got[1].numpy(), expected[1], atol=1e-9)
            np.testing.assert_allclose(got[2].numpy(), expected[2], atol=1e-9)


def test_resampling_forms_agree(rng: np.random.Generator) -> None:
    volume = rng.normal(size=(9, 13, 7)).astype(np.float32)
    for _ in range(6):
        affine = random_affine(rng)
        for spacing_mm in (None, 1.0, 2.2):
            new_shape, _, new_to_old = canonical_resampling_grid(volume.shape, affine, spacing_mm)
            reference = scipy_resample(volume, new_to_old, new_shape)
            separable = resample_axis_aligned(volume, new_to_old, new_shape)
            separable_tf = resample_axis_aligned_tf(volume, new_to_old, new_shape).numpy()
            assert separable.shape == tuple(new_shape)
            np.testing.assert_allclose(separable, reference, atol=1e-5)
            np.testing.assert_allclose(separable_tf, reference, atol=1e-5)


def test_whole_voxel_resampling_takes_the_values_exactly(rng: np.random.Generator) -> None:
    """1 mm scans on the 1 mm grid take whole voxels (slices forwards and backwards, gathers where the grid
    leaves the volume): the TF form gives exactly the NumPy form's values, also in a graph with unknown shapes."""
    volume = rng.normal(size=(9, 13, 7)).astype(np.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.float32), tf.TensorSpec([4, 4], tf.float64),
                                  tf.TensorSpec([3], tf.int32)])
    def resample(volume_tensor: tf.Tensor, new_to_old: tf.Tensor, new_shape: tf.Tensor) -> tf.Tensor:
        return resample_axis_aligned_tf(volume_tensor, new_to_old, new_shape)

    for offsets, new_shape in [((0, 0, 0), (9, 13, 7)), ((2, 3, 1), (5, 8, 4)), ((-3, 4, 2), (14, 6, 9)),
                               ((1, 0, 0.5), (6, 13, 5))]:
        for signs in [(1, 1, 1), (-1, 1, -1)]:
            permutation = rng.permutation(3)
            new_to_old = np.eye(4)
            new_to_old[:3, :3] = np.eye(3)[:, permutation] * np.asarray(signs, float)
            # a flipped axis runs down from its offset: start it inside the volume's far end
            new_to_old[:3, 3] = [offset if sign > 0 else size - 1 - offset
                                 for offset, sign, size in zip(offsets, np.asarray(signs)[np.argsort(permutation)],
                                                               volume.shape)]
            expected = resample_axis_aligned(volume, new_to_old, new_shape)
            eager = resample_axis_aligned_tf(volume, new_to_old, new_shape).numpy()
            graph = resample(volume, new_to_old, np.asarray(new_shape, np.int32)).numpy()
            np.testing.assert_array_equal(eager, expected)
            np.testing.assert_array_equal(graph, expected)


def test_resample_tf_runs_in_a_graph_with_unknown_shapes(rng: np.random.Generator) -> None:
    volume = rng.normal(size=(12, 10, 6)).astype(np.float32)
    affine = random_affine(rng)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.float32), tf.TensorSpec([4, 4], tf.float64)])
    def to_model_grid(volume_tensor: tf.Tensor, affine_tensor: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        new_shape, new_affine, new_to_old = canonical_resampling_grid_tf(
            tf.shape(volume_tensor), affine_tensor, 1.0
        )
        return resample_axis_aligned_tf(volume_tensor, new_to_old, new_shape), new_affine

    data, new_affine = to_model_grid(volume, affine)
    new_shape, expected_affine, new_to_old = canonical_resampling_grid(volume.shape, affine, 1.0)
    np.testing.assert_allclose(new_affine.numpy(), expected_affine, atol=1e-9)
    np.testing.assert_allclose(data.numpy(), scipy_resample(volume, new_to_old, new_shape), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# read_volume


def test_reorientation_keeps_a_bright_voxel_at_its_world_position(tmp_path: Path, rng: np.random.Generator) -> None:
    for trial in range(8):
        shape = tuple(int(n) for n in rng.integers(6, 16, size=3))
        data = rng.uniform(0, 1, size=shape).astype(np.float32)
        bright = tuple(int(rng.integers(0, n)) for n in shape)
        data[bright] = 100.0
        affine = random_affine(rng)
        volume = read_volume(save(tmp_path / f"scan{trial}.nii.gz", data, affine), spacing_mm=None)
        peak = np.array(np.unravel_index(np.argmax(volume.data), volume.shape))
        np.testing.assert_allclose(
            affine_maps.voxel_to_world(peak, volume.voxel_to_world),
            affine_maps.voxel_to_world(bright, affine),
            atol=1e-6,
        )
        np.testing.assert_allclose(volume.array_to_file_voxel @ [*peak, 1.0], [*bright, 1.0], atol=1e-9)
        assert sorted(volume.shape) == sorted(shape)
        assert volume.data.dtype == np.float32 and volume.voxel_to_world.dtype == np.float64


def test_resampling_keeps_a_bright_voxel_at_its_world_position(tmp_path: Path, rng: np.random.Generator) -> None:
    for trial in range(6):
        shape = (12, 10, 9)
        data = np.zeros(shape, np.float32)
        data[3:9, 3:7, 3:6] = rng.uniform(0, 1, size=(6, 4, 3))
        bright = (6, 5, 4)
        data[bright] = 100.0
        affine = random_affine(rng)
        volume = read_volume(save(tmp_path / f"scan{trial}.nii", data, affine), spacing_mm=0.5)
        np.testing.assert_allclose(volume.spacing_mm, 0.5, rtol=1e-9)
        peak = np.array(np.unravel_index(np.argmax(volume.data), volume.shape))
        distance = np.linalg.norm(
            affine_maps.voxel_to_world(peak, volume.voxel_to_world) - affine_maps.voxel_to_world(bright, affine)
        )
        # trilinear interpolation peaks at the new voxel closest to the old centre: within half a new voxel diagonal
        assert distance <= 0.5 * 0.5 * np.sqrt(3) + 1e-6


def test_hot_voxels_are_clipped_on_the_files_voxels_before_resampling(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    """A few voxels at 30 times the scan's brightness are clipped where the file stores them (so resampling
    cannot spread them): reading the scan gives what reading its clipped copy gives, and a scan without
    outliers is read as before."""
    shape = (36, 40, 32)
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij"), axis=-1)
    data = np.where((grid**2).sum(-1) < 0.7, 900.0 + 100.0 * grid[..., 0], 10.0) + rng.normal(0, 10, shape)
    data = data.astype(np.float32)
    hot = data.copy()
    hot[rng.random(shape) < 1e-3] = 30.0 * data.max()
    affine = random_affine(rng)
    stride = OUTLIER_SAMPLE_STRIDE
    ordered = np.sort(hot[::stride, ::stride, ::stride].ravel())
    k = int(ordered.size * OUTLIER_PERCENTILE / 100.0) + 1
    low, high = ordered[k - 1], ordered[-k]
    clipped = np.clip(hot, 2 * low - high, 2 * high - low)
    assert clipped.max() < 2.5 * data.max()
    read_hot = read_volume(save(tmp_path / "hot.nii.gz", hot, affine), spacing_mm=1.1)
    read_clipped = read_volume(save(tmp_path / "clipped.nii.gz", clipped, affine), spacing_mm=1.1)
    np.testing.assert_allclose(read_hot.data, read_clipped.data, rtol=1e-5)  # limits rounded apart in float32
    assert read_hot.data.max() <= clipped.max()
    plain = read_volume(save(tmp_path / "plain.nii.gz", data, affine), spacing_mm=None)
    np.testing.assert_allclose(np.sort(plain.data.ravel()), np.sort(data.ravel()))  # reoriented, not clipped


def test_resampling_reproduces_a_linear_world_ramp_exactly(tmp_path: Path, rng: np.random.Generator) -> None:
    """Trilinear interpolation is exact for linear functions, so a ramp f(world) checks every voxel's mapping."""
    gradient = np.array([0.3, -0.2, 0.5])
    for trial in range(6):
        shape = tuple(int(n) for n in rng.integers(8, 20, size=3))
        affine = random_affine(rng)
        file_voxel = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
        data = (affine_maps.voxel_to_world(file_voxel, affine) @ gradient + 7.0).astype(np.float64)
        volume = read_volume(save(tmp_path / f"ramp{trial}.nii.gz", data, affine), spacing_mm=1.3)
        array_voxel = np.stack(np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij"), axis=-1)
        old = array_voxel @ volume.array_to_file_voxel[:3, :3].T + volume.array_to_file_voxel[:3, 3]
        inside = np.all((old >= 0) & (old <= np.asarray(shape) - 1), axis=-1)  # not clamped at the edges
        assert inside.mean() > 0.3
        expected = affine_maps.voxel_to_world(array_voxel, volume.voxel_to_world) @ gradient + 7.0
        np.testing.assert_allclose(volume.data[inside], expected[inside], atol=1e-3)
        np.testing.assert_allclose(
            volume.voxel_to_world, volume.file_voxel_to_world @ volume.array_to_file_voxel, atol=1e-9
        )
        assert volume.file_shape == shape
        np.testing.assert_allclose(volume.file_voxel_to_world, affine, atol=1e-4)  # NIfTI stores float32


def test_one_mm_ras_file_is_read_unchanged(tmp_path: Path, rng: np.random.Generator) -> None:
    data = rng.normal(size=(7, 8, 9)).astype(np.float32)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-3.0, 4.0, 5.0]
    volume = read_volume(save(tmp_path / "ras.nii.gz", data, affine))
    np.testing.assert_array_equal(volume.data, data)
    np.testing.assert_array_equal(volume.voxel_to_world, affine)
    np.testing.assert_array_equal(volume.array_to_file_voxel, np.eye(4))


def test_lps_file_is_flipped_exactly(tmp_path: Path, rng: np.random.Generator) -> None:
    data = rng.normal(size=(5, 6, 4)).astype(np.float32)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    volume = read_volume(save(tmp_path / "lps.nii", data, affine))
    np.testing.assert_array_equal(volume.data, data[::-1, ::-1, :])
    np.testing.assert_allclose(volume.voxel_to_world[:3, :3], np.eye(3))
    np.testing.assert_allclose(volume.voxel_to_world[:3, 3], [-4.0, -5.0, 0.0])


def test_integer_and_scaled_files_are_read_as_float32(tmp_path: Path) -> None:
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    image = nib.Nifti1Image(data, np.eye(4))
    image.header.set_slope_inter(0.5, 10.0)
    nib.save(image, str(tmp_path / "scaled.nii.gz"))
    volume = read_volume(tmp_path / "scaled.nii.gz")
    np.testing.assert_allclose(volume.data, data * 0.5 + 10.0)
    assert volume.data.dtype == np.float32


def test_trailing_singleton_dimension_is_accepted(tmp_path: Path, rng: np.random.Generator) -> None:
    data = rng.normal(size=(4, 5, 6, 1)).astype(np.float32)
    volume = read_volume(save(tmp_path / "single.nii.gz", data, np.eye(4)))
    np.testing.assert_array_equal(volume.data, data[..., 0])


# ---------------------------------------------------------------------------------------------------------
# bad input


def _expect_input_error(path: Path, fragment: str, **kwargs: object) -> None:
    with pytest.raises(InputError) as info:
        read_volume(path, **kwargs)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert fragment in message, message
    assert "\n" not in message


def test_an_ambiguous_world_space_is_noted_in_one_line(tmp_path: Path, rng: np.random.Generator) -> None:
    """sform and qform that disagree (or neither set) get a note; read_volume follows the sform, as nibabel does."""
    from mdgru_keras.io.nifti import FORMS_AGREE_MM, world_space_note

    data = rng.normal(size=(12, 10, 8)).astype(np.float32)
    sform = random_affine(rng)
    plain = save(tmp_path / "plain.nii.gz", data, sform)  # nibabel: sform code 2, qform code 0
    assert world_space_note(plain) is None

    def with_qform(name: str, qform: np.ndarray, sform_code: int = 2) -> Path:
        image = nib.Nifti1Image(data, sform)
        image.set_sform(sform, code=sform_code)
        image.set_qform(qform, code=1)
        nib.save(image, str(tmp_path / name))
        return tmp_path / name

    assert world_space_note(with_qform("same.nii", sform)) is None  # the quaternion's rounding is far below
    shifted = sform.copy()
    shifted[:3, 3] += [3.0, -4.0, 0.0]  # 5 mm everywhere
    note = world_space_note(with_qform("shifted.nii", shifted))
    assert note.startswith("sform and qform differ by up to 5 mm (codes 2 and 1): this program, nibabel, FSL and "
                           "FreeSurfer use the sform, 3D Slicer and ANTs (ITK) the qform") and "\n" not in note
    assert "3D Slicer use the sform, tools that read the qform do not" in world_space_note(
        with_qform("scanner.nii", shifted, sform_code=1))  # ITK reads a sform coded 1 (scanner)
    # turned by 1 degree about the first voxel: the largest distance over every voxel of the field of view
    turned = shifted.copy()
    turned[:3, :3] = affine_maps.rotation_matrix([0.0, 0.0, np.deg2rad(1.0)]) @ sform[:3, :3]
    turned[:3, 3] = sform[:3, 3]
    voxels = np.concatenate([np.indices(data.shape).reshape(3, -1).T, np.ones((data.size, 1))], axis=1)
    expected_mm = np.linalg.norm((voxels @ turned.T - voxels @ sform.T)[:, :3], axis=1).max()
    note = world_space_note(with_qform("turned.nii", turned))
    assert expected_mm > FORMS_AGREE_MM and note.startswith(f"sform and qform differ by up to {expected_mm:.3g} mm")
    np.testing.assert_allclose(read_volume(tmp_path / "shifted.nii", spacing_mm=None).file_voxel_to_world, sform,
                               atol=1e-5)  # fmt: skip
    # neither form: nibabel's fallback has no orientation
    image = nib.Nifti1Image(data, sform)
    image.set_sform(None, code=0)
    image.set_qform(None, code=0)
    nib.save(image, str(tmp_path / "none.nii"))
    assert world_space_note(tmp_path / "none.nii").startswith("no sform or qform in the header (both codes 0)")
    # files that cannot be read are left to read_volume's one-line errors
    (tmp_path / "broken.nii.gz").write_bytes(b"not a NIfTI file")
    assert world_space_note(tmp_path / "broken.nii.gz") is None and world_space_note(tmp_path / "no.nii") is None


def test_bad_images_give_one_line_input_errors(tmp_path: Path, rng: np.random.Generator) -> None:
    good = rng.normal(size=(10, 11, 12)).astype(np.float32)
    _expect_input_error(tmp_path / "absent.nii.gz", "no such file")
    (tmp_path / "scan.mha").write_bytes(b"not nifti")
    _expect_input_error(tmp_path / "scan.mha", "unsupported image format")
    (tmp_path / "garbage.nii.gz").write_bytes(b"\x00" * 400)
    _expect_input_error(tmp_path / "garbage.nii.gz", "cannot read")
    (tmp_path / "garbage.nii").write_bytes(b"hello world" * 10)
    _expect_input_error(tmp_path / "garbage.nii", "cannot read")

    whole = save(tmp_path / "whole.nii", good, np.eye(4)).read_bytes()
    (tmp_path / "truncated.nii").write_bytes(whole[: len(whole) // 2])
    _expect_input_error(tmp_path / "truncated.nii", "truncated")
    compressed = gzip.compress(whole)
    (tmp_path / "truncated.nii.gz").write_bytes(compressed[: len(compressed) // 2])
    _expect_input_error(tmp_path / "truncated.nii.gz", "truncated")

    save(tmp_path / "four.nii.gz", rng.normal(size=(9, 10, 9, 3)).astype(np.float32), np.eye(4))
    _expect_input_error(tmp_path / "four.nii.gz", "4D image (shape 9x10x9x3); expected a 3D volume")
    save(tmp_path / "two.nii.gz", rng.normal(size=(9, 10)).astype(np.float32), np.eye(4))
    _expect_input_error(tmp_path / "two.nii.gz", "2D image")

    nan = good.copy()
    nan[1, 2, 3] = np.nan
    nan[2, 2, 3] = np.inf
    save(tmp_path / "nan.nii.gz", nan, np.eye(4))
    _expect_input_error(tmp_path / "nan.nii.gz", "2 non-finite voxel values")
    save(tmp_path / "constant.nii.gz", np.full((6, 6, 6), 3.0, np.float32), np.eye(4))
    _expect_input_error(tmp_path / "constant.nii.gz", "constant image")
    save(tmp_path / "zeros.nii.gz", np.zeros((6, 6, 6), np.int16), np.eye(4))
    _expect_input_error(tmp_path / "zeros.nii.gz", "constant image")

    singular = np.eye(4)
    singular[2, 2] = 0.0
    image = nib.Nifti1Image(good, None)
    image.header.set_sform(singular, code=1)
    nib.save(image, str(tmp_path / "singular.nii.gz"))
    _expect_input_error(tmp_path / "singular.nii.gz", "invalid voxel-to-world affine")


# ---------------------------------------------------------------------------------------------------------
# write_volume


def test_write_volume_round_trip_is_atomic(tmp_path: Path, rng: np.random.Generator) -> None:
    data = rng.normal(100, 30, size=(8, 9, 10)).astype(np.float32)
    affine = random_affine(rng)
    path = write_volume(tmp_path / "sub" / "out.nii.gz", data, affine, dtype="int16")
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.nii.gz"]  # no temporary left behind
    image = nib.load(str(path))
    assert image.get_data_dtype() == np.int16
    np.testing.assert_allclose(image.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(image.dataobj), np.round(data).astype(np.int16))
    assert int(image.header["sform_code"]) == 1
    with pytest.raises(InputError):
        write_volume(tmp_path / "out.nrrd", data, affine)


def test_write_volume_rescaled_int16_keeps_float_values(tmp_path: Path, rng: np.random.Generator) -> None:
    data = rng.uniform(-0.5, 2.5, size=(6, 7, 8)).astype(np.float32)
    path = write_volume(tmp_path / "scaled.nii.gz", data, np.eye(4), dtype="int16", rescale=True)
    image = nib.load(str(path))
    assert image.get_data_dtype() == np.int16
    step = 3.0 / 65535
    np.testing.assert_allclose(read_volume(path).data, data, atol=step)
