"""The crop pipeline: crops contain their landmarks, labels match the crops, determinism, the contract."""

from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import map_coordinates

from mdgru_keras.config import AugmentationConfig, load_preset
from mdgru_keras.data.pipeline import FINE_MARGIN_VOXEL, coarse_crop, fine_crop, make_dataset, split_size
from mdgru_keras.data.records import Subject, write_dataset
from mdgru_keras.errors import InputError
from mdgru_keras.geometry import affine_maps
from mdgru_keras.geometry.coordinate_classes import class_to_window_voxel, class_width_voxel, window_voxel_to_class
from mdgru_keras.geometry.training_crops import crop_with_shift_tf, sample_window_affine_tf, window_inside_weight_tf

BLOB_SIGMA = 1.2


def _blob_volume(shape, landmarks_voxel, rng=None) -> np.ndarray:
    """Zeros (plus faint noise) with a bright Gaussian blob at each landmark."""
    grid = np.stack(np.meshgrid(*(np.arange(s) for s in shape), indexing="ij"), -1).astype(np.float64)
    volume = np.zeros(shape)
    for landmark in np.asarray(landmarks_voxel, dtype=np.float64).reshape(-1, 3):
        volume += 1000.0 * np.exp(-0.5 * ((grid - landmark) ** 2).sum(-1) / BLOB_SIGMA**2)
    if rng is not None:
        volume += rng.normal(size=shape)
    return volume.astype(np.float32)


def _blob_centre(channel: np.ndarray, near: np.ndarray, radius: int = 3) -> np.ndarray:
    """Intensity centroid of the blob around ``near`` in a crop channel (background subtracted)."""
    lo = np.maximum(np.round(near).astype(int) - radius, 0)
    hi = np.minimum(np.round(near).astype(int) + radius + 1, channel.shape)
    patch = channel[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    weights = np.clip(patch - np.median(channel), 0, None)
    grid = np.stack(np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij"), -1)
    return (grid * weights[..., None]).sum((0, 1, 2)) / weights.sum()


def _assert_same_fraction(a: np.ndarray, b: np.ndarray) -> None:
    """Equal fractional parts, on the circle (0.99999 and 0.0 are neighbours: float32 rounding)."""
    difference = np.abs(np.asarray(a, np.float64) % 1.0 - np.asarray(b, np.float64) % 1.0)
    assert np.all(np.minimum(difference, 1.0 - difference) < 1e-4), (a, b)


def _assert_labels_decode_to(labels: dict, window_voxel: np.ndarray, superresolution: int, factor: int) -> None:
    decoded = np.stack([class_to_window_voxel(np.asarray(labels[a]), superresolution, factor)
                        for a in "xyz"], -1)
    half_width = 0.5 * class_width_voxel(superresolution, factor)
    assert np.all(np.abs(decoded - window_voxel) <= half_width + 1e-5), (decoded, window_voxel)


# ---------------------------------------------------------------------------------------------------------
# geometry of crops (functions, eager)


def test_affine_window_sampler_matches_scipy(rng):
    volume = rng.normal(size=(11, 9, 13, 2)).astype(np.float32)
    linear = affine_maps.rotation_matrix([0.3, -0.2, 0.5]) * 1.1
    offset = np.array([-2.3, 1.7, 0.4])
    window = sample_window_affine_tf(volume, linear, offset, (8, 10, 12), slab=4).numpy()
    grid = np.stack(np.meshgrid(np.arange(8), np.arange(10), np.arange(12), indexing="ij"), 0).reshape(3, -1)
    source = linear @ grid + offset[:, None]
    for channel in range(2):
        reference = map_coordinates(volume[..., channel], source, order=1, mode="grid-constant", cval=0.0)
        np.testing.assert_allclose(window[..., channel].reshape(-1), reference, atol=1e-5)


def test_shift_crop_equals_affine_sampler_with_identity(rng):
    volume = rng.normal(size=(10, 12, 9, 2)).astype(np.float32)
    for origin in ([-3.25, 2.5, 0.75], [4.0, -1.0, 6.5], [0.1, 0.2, 0.3]):
        shifted = crop_with_shift_tf(volume, origin, (7, 6, 8)).numpy()
        general = sample_window_affine_tf(volume, np.eye(3), origin, (7, 6, 8)).numpy()
        np.testing.assert_allclose(shifted, general, atol=1e-5)


def test_rotation_matrix_forms_agree():
    angles = np.array([0.1, -0.7, 1.3])
    np.testing.assert_allclose(affine_maps.rotation_matrix_tf(angles).numpy(), affine_maps.rotation_matrix(angles),
                               atol=1e-6)
    np.testing.assert_allclose(affine_maps.rotation_matrix(angles) @ affine_maps.rotation_matrix(angles).T, np.eye(3),
                               atol=1e-12)


def _config(rotation_deg=0.0, scaling=0.0, subvoxel=True):
    config = load_preset("tiny")
    return config.replace(augmentation=AugmentationConfig(subvoxel_shift=subvoxel, intensity_scale=0.0,
                                                          intensity_shift=0.0, rotation_deg=rotation_deg,
                                                          scaling=scaling))


@settings(max_examples=15, deadline=None)
@given(
    # a few shapes only: the rotated coarse sampler is XLA-compiled once per volume shape
    shape=st.sampled_from([(18, 40, 25), (33, 21, 37), (40, 40, 18)]),
    fractions=st.lists(st.floats(0.2, 0.8), min_size=6, max_size=6),
    seed=st.integers(0, 2**20),
    spatial=st.booleans(),
)
def test_coarse_crop_contains_landmarks_and_labels_match(shape, fractions, seed, spatial):
    config = _config(rotation_deg=12.0 if spatial else 0.0, scaling=0.1 if spatial else 0.0)
    landmarks = np.array(fractions).reshape(2, 3) * (np.array(shape) - 1)
    volume = _blob_volume(shape, landmarks[:1])[..., None]
    crop, window_voxel = coarse_crop(tf.constant(volume), tf.constant(landmarks, tf.float32),
                                     tf.constant([seed, 1], tf.int64), config)
    crop, window_voxel = crop.numpy(), window_voxel.numpy()
    size = config.coarse.padded_size
    assert crop.shape == (size, size, size, 1)
    assert np.all(window_voxel >= 0) and np.all(window_voxel <= size - 1)
    labels = window_voxel_to_class(window_voxel, size, config.superresolution, config.coarse.input_stride)
    _assert_labels_decode_to({a: labels[:, i] for i, a in enumerate("xyz")}, window_voxel, config.superresolution,
                             config.coarse.input_stride)
    np.testing.assert_allclose(_blob_centre(crop[..., 0], window_voxel[0]), window_voxel[0], atol=0.25)


@settings(max_examples=15, deadline=None)
@given(
    landmark_fraction=st.tuples(*(st.floats(0.0, 1.0),) * 3),
    seed=st.integers(0, 2**20),
    mode=st.sampled_from(["integer", "subvoxel", "rotate"]),
)
def test_fine_crop_contains_landmark_at_its_window_voxel(landmark_fraction, seed, mode):
    config = _config(rotation_deg=15.0 if mode == "rotate" else 0.0, scaling=0.15 if mode == "rotate" else 0.0,
                     subvoxel=mode != "integer")
    shape = (30, 26, 22)
    # anywhere, but with the whole blob inside the volume (a cut blob has a shifted centroid)
    landmark = 4.0 + np.array(landmark_fraction) * (np.array(shape) - 9)
    volume = _blob_volume(shape, landmark)[..., None]
    # a second landmark 3 voxels away moves with the window exactly like the first
    landmarks = np.stack([landmark, landmark + 3.0])
    crop, all_window_voxel = fine_crop(tf.constant(volume), tf.constant(landmarks, tf.float32), tf.constant(0),
                                       tf.constant([seed, 2], tf.int64), config)
    crop, all_window_voxel = crop.numpy(), all_window_voxel.numpy()
    window_voxel = all_window_voxel[0]
    if mode != "rotate":
        np.testing.assert_allclose(all_window_voxel[1] - window_voxel, 3.0, atol=1e-4)
    else:  # rotated and scaled by at most 15 degrees / 15 %: still about 3 * sqrt(3) voxels away
        assert 3.5 < np.linalg.norm(all_window_voxel[1] - window_voxel) < 7.0
    size = config.fine.window_size
    assert crop.shape == (size, size, size, 1)
    assert np.all(window_voxel >= FINE_MARGIN_VOXEL) and np.all(window_voxel <= size - 1 - FINE_MARGIN_VOXEL)
    if mode == "integer":  # integer offsets keep the landmark's own fractional position (up to float32)
        _assert_same_fraction(window_voxel, landmark)
    np.testing.assert_allclose(_blob_centre(crop[..., 0], window_voxel), window_voxel, atol=0.25)


def test_subvoxel_shift_reaches_every_class():
    """Without the shift, one subject's landmark always falls into the same sub-voxel class; with it, all."""
    shape = (24, 24, 24)
    landmark = tf.constant([11.3, 12.6, 10.9])
    volume = tf.zeros(shape + (1,))
    n = 4
    for subvoxel, expected in ((False, 1), (True, n)):
        config = _config(subvoxel=subvoxel)
        classes = set()
        for seed in range(60):
            _, window_voxel = fine_crop(volume, landmark[None], tf.constant(0), tf.constant([seed, 0], tf.int64),
                                        config)
            classes.add(int(window_voxel_to_class(window_voxel.numpy()[0, 0], 16, n)) % n)
        assert len(classes) == expected


# ---------------------------------------------------------------------------------------------------------
# the dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Five subjects of different shapes with two well-separated blob landmarks each (names A, B)."""
    directory = tmp_path_factory.mktemp("dataset")
    rng = np.random.default_rng(5)
    subjects = {}
    for i in range(5):
        shape = tuple(int(s) for s in rng.integers(24, 36, size=3))
        fractions = np.stack([rng.uniform(0.2, 0.35, size=3), rng.uniform(0.65, 0.8, size=3)])
        landmarks = fractions * (np.array(shape) - 1)
        volume = np.round(_blob_volume(shape, landmarks, rng))
        subjects[f"s{i}"] = Subject(f"s{i}", volume, np.eye(4), landmarks, ("A", "B"))
    write_dataset(directory, {"train": ["s0", "s1", "s2", "s3"], "val": ["s4"]}, subjects.__getitem__,
                  ("A", "B"), 1.0, shard_size=3)
    return SimpleNamespace(path=directory, subjects=subjects)


def _tiny(**augmentation):
    config = load_preset("tiny")
    return config.replace(landmarks=("B", "A"), augmentation=AugmentationConfig(**augmentation))


def test_element_structure_follows_the_contract(dataset):
    config = _tiny()
    batch, p, w = config.training.batch_size, config.coarse.padded_size, config.fine.window_size
    coarse = make_dataset(dataset.path, "train", "coarse", config, seed=0)
    inputs, labels = coarse.element_spec
    assert inputs["volume"].shape == (batch, p, p, p, 2) and inputs["volume"].dtype == tf.float32
    assert {k: (v.shape, v.dtype) for k, v in labels.items()} == {a: ((batch, 2), tf.int32) for a in "xyz"}
    fine = make_dataset(dataset.path, "train", "fine", config, seed=0, with_metadata=True)
    inputs, labels, metadata = fine.element_spec
    assert set(inputs) == {"window"} and inputs["window"].shape == (batch, w, w, w, 2)
    expected = {a: ((batch, 2), tf.int32) for a in "xyz"} | {"mask": ((batch, 2), tf.float32)}
    assert {k: (v.shape, v.dtype) for k, v in labels.items()} == expected
    assert metadata["landmark_index"].shape == (batch,) and metadata["landmark_index"].dtype == tf.int32
    assert metadata["window_voxel"].shape == (batch, 2, 3) and metadata["subject"].dtype == tf.string
    unbatched = make_dataset(dataset.path, "train", "coarse", config, seed=0, batch=False, with_metadata=True)
    assert unbatched.element_spec[2]["window_voxel"].shape == (2, 3)


@pytest.mark.parametrize("stage", ["coarse", "fine"])
def test_samples_show_their_landmarks_where_the_labels_say(dataset, stage):
    config = _tiny(subvoxel_shift=True, intensity_scale=0.1, intensity_shift=0.1, rotation_deg=10.0, scaling=0.1,
                   gamma=0.2, bias_field=0.2, noise_std=0.01)
    factor = config.coarse.input_stride if stage == "coarse" else 1
    ds = make_dataset(dataset.path, "train", stage, config, seed=11, batch=False, with_metadata=True)
    for inputs, labels, metadata in ds.take(12):
        window_voxel = metadata["window_voxel"].numpy()
        labels = {a: v.numpy() for a, v in labels.items()}
        subject = dataset.subjects[metadata["subject"].numpy().decode()]
        if stage == "coarse":
            crop = inputs["volume"].numpy()
            points = window_voxel  # landmark order of the config: B, A
            _assert_labels_decode_to(labels, window_voxel, config.superresolution, factor)
        else:
            crop = inputs["window"].numpy()
            k = int(metadata["landmark_index"].numpy())
            size = crop.shape[0]
            # the mask is exactly "inside the window by the margin", and always holds the window's own landmark
            inside = np.all((window_voxel >= FINE_MARGIN_VOXEL) & (window_voxel <= size - 1 - FINE_MARGIN_VOXEL), -1)
            inside[k] = True
            np.testing.assert_array_equal(labels["mask"], inside.astype(np.float32))
            points = window_voxel[inside]
            _assert_labels_decode_to({a: labels[a][inside] for a in "xyz"}, points, config.superresolution, factor)
        assert points.shape[1:] == (3,) and len(points) >= 1
        size = crop.shape[0]
        for point in points:
            assert np.all(point >= 0) and np.all(point <= size - 1)
            np.testing.assert_allclose(_blob_centre(crop[..., 0], point), point, atol=0.4)
        assert subject.subject == metadata["subject"].numpy().decode()


def test_landmark_order_follows_the_config(dataset):
    """Labels and landmark_index follow config.landmarks (B, A here), not the dataset's order (A, B)."""
    config = _tiny(subvoxel_shift=False)
    dataset_index = {"A": 0, "B": 1}
    coarse = make_dataset(dataset.path, "train", "coarse", config, seed=3, batch=False, with_metadata=True)
    for _, _, metadata in coarse.take(4):
        landmarks = dataset.subjects[metadata["subject"].numpy().decode()].landmarks_voxel
        window_voxel = metadata["window_voxel"].numpy()
        np.testing.assert_allclose(window_voxel[0] - window_voxel[1], landmarks[1] - landmarks[0], atol=1e-4)
    fine = make_dataset(dataset.path, "train", "fine", config, seed=3, batch=False, with_metadata=True)
    for _, _, metadata in fine.take(8):
        landmarks = dataset.subjects[metadata["subject"].numpy().decode()].landmarks_voxel
        k = int(metadata["landmark_index"])
        name = config.landmarks[k]
        # integer offsets: the window coordinate keeps the fractional part of that landmark's voxel coordinate
        _assert_same_fraction(metadata["window_voxel"].numpy()[k], landmarks[dataset_index[name]])


def test_deterministic_with_a_seed(dataset):
    config = _tiny(subvoxel_shift=True, intensity_scale=0.1, noise_std=0.05, rotation_deg=5.0)

    def take(seed):
        ds = make_dataset(dataset.path, "train", "fine", config, seed=seed, deterministic=True,
                               with_metadata=True)
        return [tf.nest.map_structure(lambda t: t.numpy(), element) for element in ds.take(4)]

    first, second, other = take(7), take(7), take(8)
    for a, b in zip(first, second):
        tf.nest.map_structure(np.testing.assert_array_equal, a, b)
    assert not all(np.array_equal(a[0]["window"], c[0]["window"]) for a, c in zip(first, other))


def test_one_pass_without_repeat(dataset):
    config = _tiny()
    ds = make_dataset(dataset.path, "train", "coarse", config, seed=1, repeat=False, batch=False,
                           with_metadata=True)
    subjects = sorted(m["subject"].numpy().decode() for _, _, m in ds)
    assert subjects == ["s0", "s1", "s2", "s3"]
    assert split_size(dataset.path, "train") == 4 and split_size(dataset.path, "val") == 1
    assert sum(1 for _ in make_dataset(dataset.path, "val", "fine", config, repeat=False)) == 1  # partial batch


def test_bad_requests_are_refused(dataset):
    config = _tiny()
    with pytest.raises(InputError, match="no split 'test'"):
        make_dataset(dataset.path, "test", "coarse", config)
    with pytest.raises(InputError, match="no landmark"):
        make_dataset(dataset.path, "train", "coarse", config.replace(landmarks=("C",)))
    with pytest.raises(InputError, match="--spacing 2.0"):
        make_dataset(dataset.path, "train", "coarse", config.replace(spacing_mm=2.0))
    with pytest.raises(ValueError, match="stage"):
        make_dataset(dataset.path, "train", "medium", config)
    with pytest.raises(InputError, match="dataset.json"):
        make_dataset(dataset.path / "nowhere", "train", "coarse", config)


def test_cached_preprocessing_gives_the_same_samples_as_decoding_every_sample(dataset):
    """The per-subject cache changes nothing in the samples: for the one validation subject, sample i is the
    same crop with the same labels whether the volume is decoded each time or once and cached."""
    config = _tiny(rotation_deg=10.0, scaling=0.1)  # crop-level augmentation only: the cache applies
    for stage in ("coarse", "fine"):
        kwargs = dict(seed=3, deterministic=True, batch=False, with_metadata=True)
        cached = make_dataset(dataset.path, "val", stage, config, cache_preprocessed=True, **kwargs).take(3)
        plain = make_dataset(dataset.path, "val", stage, config, cache_preprocessed=False, **kwargs).take(3)
        key = "volume" if stage == "coarse" else "window"
        for (features, labels, meta), (other_features, other_labels, other_meta) in zip(cached, plain, strict=True):
            np.testing.assert_allclose(features[key].numpy(), other_features[key].numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(meta["window_voxel"].numpy(), other_meta["window_voxel"].numpy(), atol=1e-5)
            for axis in "xyz":
                np.testing.assert_array_equal(labels[axis].numpy(), other_labels[axis].numpy())


def test_cache_is_refused_with_raw_intensity_augmentation(dataset):
    with pytest.raises(ValueError, match="raw-intensity augmentation"):
        make_dataset(dataset.path, "val", "fine", _tiny(gamma=0.2), cache_preprocessed=True)


@pytest.mark.parametrize("origin", [[-3.0, 2.0, 5.0], [-2.6, 3.3, 9.75], [4.0, -1.5, 0.25]])
def test_intensity_augmentation_on_the_window_equals_augmenting_the_volume(origin):
    """augment_normalized_window on a crop == augment_normalized on the whole volume, then the same crop."""
    from mdgru_keras.data import augment

    rng = np.random.default_rng(4)
    volume = tf.constant(rng.normal(size=(14, 12, 16, 2)).astype(np.float32))
    aug = AugmentationConfig(intensity_scale=0.2, intensity_shift=0.3)
    seed = tf.constant([5, 7], tf.int64)
    size = (8, 10, 9)
    origin = tf.constant(origin)
    whole = crop_with_shift_tf(augment.augment_normalized(volume, seed, aug), origin, size)
    inside = window_inside_weight_tf(tf.shape(volume)[:3], origin, size)
    window = augment.augment_normalized_window(crop_with_shift_tf(volume, origin, size), inside, seed, aug)
    np.testing.assert_allclose(window.numpy(), whole.numpy(), atol=1e-5)
    ones = crop_with_shift_tf(tf.ones([14, 12, 16, 1]), origin, size)[..., 0]
    np.testing.assert_allclose(inside.numpy(), ones.numpy(), atol=1e-6)
