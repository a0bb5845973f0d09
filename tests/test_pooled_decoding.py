"""The n = 1 rows of Table 1a from a model with superresolution n: pooled decoding (``pool_classes``).

A model with n classes per voxel implies a distribution over voxels (sum of each voxel's n classes); decoding
that distribution with n = 1 must be exactly what a model that output that voxel distribution decodes to.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from mdgru_keras.geometry.coordinate_classes import (
    class_to_window_voxel,
    decode_axis,
    decode_axis_tf,
    pool_classes,
    pool_classes_tf,
    window_voxel_to_class,
)


def split_within_classes(voxel_probabilities: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """An n-class distribution whose classes j*n .. j*n+n-1 share voxel j's probability in random parts."""
    parts = rng.dirichlet(np.ones(n), size=voxel_probabilities.shape)  # [..., W, n]
    return (voxel_probabilities[..., None] * parts).reshape(voxel_probabilities.shape[:-1] + (-1,))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 5),
    size=st.integers(3, 24),
    factor=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**31 - 1),
    peaked=st.booleans(),
)
def test_pooled_decoding_of_a_distribution_equals_its_n1_decoding(
    n: int, size: int, factor: int, seed: int, peaked: bool
) -> None:
    rng = np.random.default_rng(seed)
    classes = size  # n = 1 classes of the window (size * factor input voxels)
    logits = rng.normal(size=(3, classes)) * (4.0 if peaked else 0.5)
    voxel_probabilities = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    probabilities = split_within_classes(voxel_probabilities, n, rng)
    assert probabilities.shape == (3, n * classes)
    np.testing.assert_allclose(pool_classes(probabilities, n), voxel_probabilities, atol=1e-12)
    for parabola in (False, True):
        expected = decode_axis(voxel_probabilities, 1, factor, parabola)
        pooled = pool_classes(probabilities, n)
        np.testing.assert_allclose(decode_axis(pooled, 1, factor, parabola), expected, atol=1e-9)
        pooled_tf = pool_classes_tf(tf.constant(probabilities, tf.float32), n)
        graph = decode_axis_tf(pooled_tf, 1, factor, parabola).numpy()
        np.testing.assert_allclose(graph, expected, atol=1e-4)


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 6),
    size=st.integers(2, 32),
    factor=st.sampled_from([1, 2, 4]),
    position=st.floats(0.0, 1.0),
)
def test_classes_are_aligned_with_the_n1_classes(n: int, size: int, factor: int, position: float) -> None:
    """Class k (superresolution n) lies inside n = 1 class k // n: the pooled groups are exactly the coarser
    classes, so pooling the probabilities is pooling the training labels."""
    window_size = size * factor
    window_voxel = position * window_size - 0.5
    fine = window_voxel_to_class(window_voxel, window_size, n, factor)
    coarse = window_voxel_to_class(window_voxel, window_size, 1, factor)
    assert fine // n == coarse
    # and the centre of n = 1 class j is the mean of the centres of its n classes
    group_centres = class_to_window_voxel(np.arange(coarse * n, coarse * n + n), n, factor)
    assert group_centres.mean() == pytest.approx(float(class_to_window_voxel(coarse, 1, factor)))


def test_pooling_one_hot_classes_gives_the_voxel_and_tf_matches_numpy() -> None:
    n, size = 4, 8
    probabilities = np.zeros((2, n * size))
    probabilities[0, 13] = 1.0  # class 13 of voxel 3
    probabilities[1, [20, 21, 22, 23]] = 0.25  # all of voxel 5
    pooled = pool_classes(probabilities, n)
    assert np.argmax(pooled, axis=-1).tolist() == [3, 5]
    np.testing.assert_allclose(pooled.sum(axis=-1), 1.0)
    np.testing.assert_allclose(pool_classes_tf(tf.constant(probabilities), n).numpy(), pooled, atol=1e-7)
    np.testing.assert_allclose(decode_axis(pooled, 1, 1, parabola=False), [3.0, 5.0])


def test_pooling_refuses_class_counts_that_are_not_multiples_of_n() -> None:
    with pytest.raises(ValueError, match="cannot be pooled"):
        pool_classes(np.ones((2, 10)) / 10, 4)
