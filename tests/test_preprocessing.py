"""preprocess: Gaussian high-pass against scipy, z-normalization, guards, dynamic shapes."""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import gaussian_filter

from mdgru_keras.preprocessing import (
    OUTLIER_MIN_SAMPLE,
    OUTLIER_PERCENTILE,
    OUTLIER_SAMPLE_STRIDE,
    clip_outliers_tf,
    gaussian_kernel_1d,
    gaussian_smooth_tf,
    preprocess,
)


def _znorm(volume: np.ndarray) -> np.ndarray:
    volume = volume.astype(np.float64)
    std = volume.std()
    return (volume - volume.mean()) / (std if std > 0 else 1.0)


def test_kernel_matches_scipy_radius_and_weights():
    for sigma in (0.7, 1.0, 2.5, 3.0):
        kernel = gaussian_kernel_1d(sigma)
        impulse = np.zeros(101)
        impulse[50] = 1.0
        reference = gaussian_filter(impulse, sigma)
        nonzero = np.flatnonzero(reference)
        assert len(kernel) == len(nonzero)
        np.testing.assert_allclose(kernel, reference[nonzero], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(gaussian_kernel_1d(0.0), [1.0])


def test_smoothing_matches_scipy_anisotropic(rng):
    volume = rng.normal(size=(23, 17, 29)).astype(np.float32)
    sigma = (2.0, 1.2, 3.5)
    ours = gaussian_smooth_tf(volume, sigma).numpy()
    reference = gaussian_filter(volume.astype(np.float64), sigma, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(ours, reference, atol=2e-6)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 14), st.integers(1, 14), st.integers(1, 14)),
    sigma=st.tuples(*(st.sampled_from([0.0, 0.5, 1.0, 2.0, 4.0]),) * 3),
    seed=st.integers(0, 2**16),
)
def test_smoothing_matches_scipy_any_shape(shape, sigma, seed):
    """Also axes shorter than the kernel radius (scipy reflects repeatedly) and sigma 0 (no smoothing)."""
    volume = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    ours = gaussian_smooth_tf(volume, sigma).numpy()
    reference = gaussian_filter(volume.astype(np.float64), sigma, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(ours, reference, atol=3e-6)


def test_preprocess_channels(rng):
    volume = (rng.normal(size=(20, 24, 18)) * 30 + 500).astype(np.float32)
    spacing, sigma_mm = (1.0, 2.0, 1.5), 3.0
    inputs = preprocess(volume, spacing, sigma_mm).numpy()
    assert inputs.shape == (20, 24, 18, 2) and inputs.dtype == np.float32
    expected_highpass = volume - gaussian_filter(volume.astype(np.float64), [sigma_mm / s for s in spacing])
    np.testing.assert_allclose(inputs[..., 0], _znorm(volume), atol=1e-4)
    np.testing.assert_allclose(inputs[..., 1], _znorm(expected_highpass), atol=1e-3)
    for channel in range(2):
        assert abs(inputs[..., channel].mean()) < 1e-4
        assert abs(inputs[..., channel].std() - 1.0) < 1e-4


def test_preprocess_constant_volume_gives_zeros():
    inputs = preprocess(np.full((8, 9, 10), 7.0, np.float32), 1.0, 3.0).numpy()
    assert np.all(np.isfinite(inputs))
    np.testing.assert_array_equal(inputs, 0.0)


def test_preprocess_dynamic_shape_in_a_graph(rng):
    function = tf.function(lambda v: preprocess(v, 1.0, 2.0),
                           input_signature=[tf.TensorSpec([None, None, None], tf.float32)])
    for shape in ((12, 10, 9), (7, 15, 11)):
        volume = rng.normal(size=shape).astype(np.float32)
        np.testing.assert_allclose(function(volume).numpy(), preprocess(volume, 1.0, 2.0).numpy(), atol=1e-6)


def test_preprocess_scale_invariant(rng):
    """Z-normalization makes a global linear intensity change irrelevant (why scale/shift augmentation acts
    after preprocessing)."""
    volume = rng.normal(size=(12, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(preprocess(volume, 1.0, 2.0).numpy(), preprocess(3.0 * volume + 40.0, 1.0, 2.0).numpy(),
                               atol=2e-4)


def _clipped_by_numpy(volume: np.ndarray) -> np.ndarray:
    """The outlier clip written out independently: nearest-rank percentiles of the strided sample."""
    stride = OUTLIER_SAMPLE_STRIDE
    ordered = np.sort(volume[::stride, ::stride, ::stride].ravel())
    k = int(np.floor(ordered.size * OUTLIER_PERCENTILE / 100.0)) + 1
    low, high = ordered[k - 1], ordered[-k]
    if ordered.size < OUTLIER_MIN_SAMPLE or high == low:
        return volume
    return np.clip(volume, low - (high - low), high + (high - low))


def head_like(rng: np.random.Generator, shape=(40, 44, 36)) -> np.ndarray:
    """A bright textured ellipsoid on a dark background, with noise: a head's intensity histogram, roughly."""
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij"), axis=-1)
    inside = (grid**2).sum(-1) < 0.7
    volume = np.where(inside, 800.0 + 200.0 * np.sin(6 * grid[..., 0]) * np.cos(5 * grid[..., 1]), 20.0)
    return (volume + rng.normal(0, 15, shape)).astype(np.float32)


def test_outlier_clip_matches_numpy_and_leaves_ordinary_volumes_alone(rng):
    volume = head_like(rng)
    np.testing.assert_array_equal(clip_outliers_tf(volume).numpy(), volume)
    hot = volume.copy()
    spots = rng.random(hot.shape) < 2e-3
    hot[spots] = 30.0 * volume.max()
    hot[0, 0, :3] = -50.0 * volume.max()  # cold spots too
    clipped = clip_outliers_tf(hot).numpy()
    np.testing.assert_array_equal(clipped, _clipped_by_numpy(hot))
    assert clipped.max() < 3.0 * volume.max() and clipped.min() > -3.0 * volume.max()
    untouched = ~spots
    untouched[0, 0, :3] = False
    np.testing.assert_array_equal(clipped[untouched], hot[untouched])


@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 6, 7), (9, 2, 30), (29, 31, 33), (33, 31, 29)])
def test_outlier_clip_of_small_and_odd_volumes_matches_numpy(rng, shape):
    """Samples under OUTLIER_MIN_SAMPLE values are left alone; (29, 31, 33) samples 8 x 8 x 9 = 576 values."""
    volume = rng.normal(size=shape).astype(np.float32)
    volume.flat[-1] = 1e6  # never a sampled voxel unless the volume has one
    np.testing.assert_array_equal(clip_outliers_tf(volume).numpy(), _clipped_by_numpy(volume))


def test_outlier_clip_leaves_a_mostly_constant_volume_alone():
    """Zeros with a small bright block: the sample's percentiles agree (spread 0), so nothing is clipped, where
    clipping to [0, 0] would erase the block."""
    volume = np.zeros((40, 40, 40), np.float32)
    volume[10:13, 10:13, 10:13] = 5.0
    np.testing.assert_array_equal(clip_outliers_tf(volume).numpy(), volume)


def test_preprocess_refuses_bad_spacing():
    with pytest.raises(ValueError, match="spacing_mm"):
        preprocess(np.zeros((4, 4, 4), np.float32), 0.0, 3.0)
