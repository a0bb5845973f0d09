"""The robust affine shape prior (geometry.shape_prior): it finds the affine image that most landmarks agree on,
whatever a few gross errors say, and its TensorFlow twin computes the same."""

import numpy as np
import pytest

from mdgru_keras.geometry.shape_prior import fit_affine, fit_shape_prior, fit_shape_prior_tf


def _random_affine(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    linear = np.eye(3) + rng.uniform(-0.2, 0.2, size=(3, 3))  # scalings, shears and rotations of a head
    return linear, rng.uniform(-30, 30, size=3)


def test_the_prior_is_the_exact_affine_image_despite_gross_errors(rng):
    """32 reference points under an affine map plus 1 mm noise, four of them moved 25-40 mm away (a fine window
    that missed its landmark): the prior puts every landmark, the moved ones too, within 1.5 mm of its affine
    image. Ordinary least squares (the first iteration alone) does not."""
    reference = rng.uniform(-60, 60, size=(32, 3))
    linear, shift = _random_affine(rng)
    truth = reference @ linear.T + shift
    estimates = truth + rng.normal(scale=1.0, size=truth.shape) / np.sqrt(3)
    wrong = [3, 11, 20, 29]
    directions = rng.normal(size=(4, 3))
    estimates[wrong] += directions / np.linalg.norm(directions, axis=1, keepdims=True) * rng.uniform(25, 40, (4, 1))

    prior = fit_shape_prior(reference, estimates)
    assert np.max(np.linalg.norm(prior - truth, axis=1)) < 1.5
    assert np.all(np.linalg.norm(estimates[wrong] - prior[wrong], axis=1) > 20)  # the strays stand out
    plain = fit_shape_prior(reference, estimates, iterations=0)
    assert np.max(np.linalg.norm(plain - truth, axis=1)) > 3.0


def test_an_exact_affine_image_is_its_own_prior_and_units_need_not_agree(rng):
    """Reference in mm, estimates in 0.5 mm voxels of a rotated, shifted grid: an exact affine image is returned
    as it is."""
    reference = rng.uniform(-60, 60, size=(10, 3))
    linear, shift = _random_affine(rng)
    estimates = (reference @ linear.T + shift) / 0.5
    np.testing.assert_allclose(fit_shape_prior(reference, estimates), estimates, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_tensorflow_form_agrees_with_numpy(seed):
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    reference = rng.uniform(-60, 60, size=(32, 3))
    linear, shift = _random_affine(rng)
    estimates = reference @ linear.T + shift + rng.normal(scale=2.0, size=(32, 3))
    estimates[rng.choice(32, 3, replace=False)] += 30.0
    expected = fit_shape_prior(reference, estimates)
    got = fit_shape_prior_tf(reference, tf.constant(estimates, tf.float32))
    assert got.dtype == tf.float32
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-3)
    traced = tf.function(lambda points: fit_shape_prior_tf(reference, points))
    np.testing.assert_allclose(traced(tf.constant(estimates)).numpy(), expected, atol=1e-9)


def test_the_fit_gives_the_heads_pose_as_the_nearest_rotation(rng):
    """A head turned by a known rotation, scaled by 0.9 / 1.05 / 0.95 along the reference's axes and shifted, with
    1 mm noise and two gross errors: the fit's linear part is that map and its nearest rotation the head's pose
    (within 1 degree); the fit's last row is the image of the reference's centroid. A reflection is never
    returned."""
    import tensorflow as tf
    from scipy.spatial.transform import Rotation

    from mdgru_keras.geometry.shape_prior import fit_affine_tf, nearest_rotation_tf

    reference = rng.uniform(-60, 60, size=(32, 3))
    pose = Rotation.from_euler("xyz", [25.0, -8.0, 12.0], degrees=True).as_matrix()
    linear = pose @ np.diag([0.9, 1.05, 0.95])
    shift = np.array([4.0, -7.0, 11.0])
    estimates = reference @ linear.T + shift + rng.normal(scale=1.0, size=(32, 3)) / np.sqrt(3)
    estimates[[5, 17]] += 30.0
    fit = fit_affine(reference, estimates)
    np.testing.assert_allclose(fit[:3].T, linear, atol=0.02)
    np.testing.assert_allclose(fit[3], reference.mean(0) @ linear.T + shift, atol=0.6)
    np.testing.assert_allclose(fit_affine_tf(reference, tf.constant(estimates)).numpy(), fit, atol=1e-9)
    rotation = nearest_rotation_tf(tf.constant(fit[:3].T)).numpy()
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
    angle = np.degrees(np.arccos(np.clip((np.trace(rotation.T @ pose) - 1) / 2, -1, 1)))
    assert angle < 1.0
    mirrored = nearest_rotation_tf(tf.constant(np.diag([-1.0, 1.0, 1.0]) @ pose)).numpy()
    assert np.linalg.det(mirrored) > 0
