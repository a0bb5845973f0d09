"""preprocess: Gaussian high-pass against scipy, z-normalization, guards, dynamic shapes."""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import gaussian_filter

from mdgru_keras.preprocessing import gaussian_kernel_1d, gaussian_smooth_tf, preprocess


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


def test_preprocess_refuses_bad_spacing():
    with pytest.raises(ValueError, match="spacing_mm"):
        preprocess(np.zeros((4, 4, 4), np.float32), 0.0, 3.0)
