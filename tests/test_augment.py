"""Augmentation: stateless determinism, ranges, switches, and what each part preserves."""

import numpy as np
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from mdgru_keras.config import AugmentationConfig
from mdgru_keras.data import augment


def _seed(a: int, b: int = 0) -> tf.Tensor:
    return tf.constant([a, b], tf.int64)


def test_split_seed_is_deterministic_and_distinct():
    first = [s.numpy().tolist() for s in augment.split_seed(_seed(3, 4), 4)]
    assert first == [s.numpy().tolist() for s in augment.split_seed(_seed(3, 4), 4)]
    assert len({tuple(s) for s in first}) == 4
    assert first != [s.numpy().tolist() for s in augment.split_seed(_seed(3, 5), 4)]


@settings(max_examples=20, deadline=None)
@given(low=st.integers(-50, 50), span=st.integers(0, 6), seed=st.integers(0, 2**30))
def test_uniform_int_is_inclusive(low, span, seed):
    lows = tf.fill([400], low)
    values = augment.uniform_int(_seed(seed), lows, lows + span).numpy()
    assert values.min() >= low and values.max() <= low + span
    assert set(values.tolist()) == set(range(low, low + span + 1))  # 400 draws reach all of <= 7 values


def test_gamma_keeps_range_and_order(rng):
    volume = tf.constant(rng.uniform(-100, 900, size=(6, 7, 8)).astype(np.float32))
    out = augment.random_gamma(volume, _seed(1), 0.5).numpy()
    v = volume.numpy()
    np.testing.assert_allclose([out.min(), out.max()], [v.min(), v.max()], rtol=1e-5)
    order = np.argsort(v, axis=None)
    assert np.all(np.diff(out.reshape(-1)[order]) >= -1e-3)  # monotonic
    assert not np.allclose(out, v)  # something changed
    np.testing.assert_array_equal(out, augment.random_gamma(volume, _seed(1), 0.5).numpy())


def test_smooth_field_is_bounded_and_smooth():
    shape = tf.constant([40, 30, 20])
    fields = [augment.smooth_field(_seed(i), shape).numpy() for i in range(5)]
    for field in fields:
        assert field.shape == (40, 30, 20)
        assert np.abs(field).max() <= 1.0 + 1e-6
        # at most 2 half-periods per axis: neighbouring voxels differ little
        assert max(np.abs(np.diff(field, axis=a)).max() for a in range(3)) < 0.35
    assert not np.allclose(fields[0], fields[1])


def test_bias_field_is_a_bounded_multiplicative_change(rng):
    volume = tf.constant(rng.uniform(10, 100, size=(12, 10, 8)).astype(np.float32))
    out = augment.random_bias_field(volume, _seed(2), 0.3).numpy()
    low = volume.numpy().min()
    ratio = (out - low) / np.maximum(volume.numpy() - low, 1e-6)
    mask = volume.numpy() - low > 1.0
    assert np.all(ratio[mask] >= np.exp(-0.3) - 1e-4) and np.all(ratio[mask] <= np.exp(0.3) + 1e-4)
    assert ratio[mask].std() > 1e-3


def test_noise_has_the_requested_strength(rng):
    volume = tf.constant(rng.normal(0, 5.0, size=(30, 30, 30)).astype(np.float32))
    noise = augment.random_noise(volume, _seed(3), 0.2).numpy() - volume.numpy()
    assert abs(noise.std() - 0.2 * volume.numpy().std()) < 0.05 * 0.2 * volume.numpy().std()
    assert abs(noise.mean()) < 0.05


def test_normalized_scale_and_shift(rng):
    inputs = tf.constant(rng.normal(size=(5, 6, 7, 2)).astype(np.float32))
    config = AugmentationConfig(intensity_scale=0.2, intensity_shift=0.5)
    for seed in range(10):
        out = augment.augment_normalized(inputs, _seed(seed), config).numpy()
        scale = out[..., 1] / inputs.numpy()[..., 1]  # channel 1: scaled only
        assert np.allclose(scale, scale.flat[0], rtol=1e-4) and 0.8 <= scale.flat[0] <= 1.2
        shift = out[..., 0] - scale.flat[0] * inputs.numpy()[..., 0]  # channel 0: scaled and shifted
        assert np.allclose(shift, shift.flat[0], atol=1e-5) and abs(shift.flat[0]) <= 0.5


def test_switched_off_parts_change_nothing(rng):
    off = AugmentationConfig(subvoxel_shift=False, intensity_scale=0.0, intensity_shift=0.0)
    volume = tf.constant(rng.normal(size=(4, 5, 6)).astype(np.float32))
    assert not augment.has_raw_augmentation(off) and not augment.has_spatial_augmentation(off)
    np.testing.assert_array_equal(augment.augment_raw(volume, _seed(1), off).numpy(), volume.numpy())
    inputs = tf.stack([volume, volume], -1)
    np.testing.assert_array_equal(augment.augment_normalized(inputs, _seed(1), off).numpy(), inputs.numpy())
    np.testing.assert_array_equal(augment.random_linear_map(_seed(1), off).numpy(), np.eye(3))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**30), degrees=st.floats(1.0, 30.0), scaling=st.floats(0.0, 0.3))
def test_linear_map_is_a_bounded_rotation_and_scaling(seed, degrees, scaling):
    config = AugmentationConfig(rotation_deg=degrees, scaling=scaling)
    linear = augment.random_linear_map(_seed(seed), config).numpy().astype(np.float64)
    scale = np.cbrt(np.linalg.det(linear))
    assert 1 - scaling - 1e-5 <= scale <= 1 + scaling + 1e-5
    rotation = linear / scale
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-5)
    # composed of three rotations of at most `degrees` each: the total angle is at most 3x that
    angle = np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1)))
    assert angle <= 3 * degrees + 1e-3
