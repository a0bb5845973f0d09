"""A shape prior for a set of landmark estimates: the reference's landmarks mapped by the affine map that fits the
estimates best, robustly.

The 32 AFIDs of a head lie close to an affine image of the template's 32: rigid + affine registration of the
template places them 3-4 mm from the truth on average (measured on synthetic heads in ``docs/MODEL_CARD.md``,
and reported for real heads). A landmark estimate much farther than that
from the affine image that the other estimates agree on is more likely a wrong peak (the fine window did not
contain the landmark because the coarse estimate was 20 mm off) than a real head's anatomy. The localizer's
``shape_prior`` option re-centres the next fine pass on the prior for such landmarks
(:mod:`mdgru_keras.localizer`).

The fit is an iteratively reweighted least-squares affine map with Tukey's biweight: residuals are scaled by
1.4826 times their median (at least ``min_scale``), and a landmark whose residual exceeds ``CUTOFF`` times that
scale gets weight 0. With 32 landmarks and a 12-parameter map a few gross errors do not move the fit.

The fit also gives the head's pose: :func:`nearest_rotation_tf` of its linear part is the rotation that
turns the reference's axes into the estimates' (the localizer's ``aligned_windows``).

Points are ``[K, 3]``: ``reference`` in any space (the template's world mm), ``estimates`` in another (the model
grid's voxels); the map between them is fitted, so their units need not agree. Residuals are in the units of
``estimates``.
"""

from __future__ import annotations

import numpy as np

from mdgru_keras.geometry._tensorflow import tf

MIN_SHAPE_PRIOR_LANDMARKS = 6  # the affine map's 12 parameters need 4; a robust fit needs some to spare
# How far (mm) an estimate may lie from its prior before the localizer re-centres it: gross errors only. Chosen
# on 16 selection heads (docs/MODEL_CARD.md, "Choosing the shape prior's tolerance").
TOLERANCE_MM = 10.0
CUTOFF = 4.685  # Tukey's biweight constant (95 % efficiency for Gaussian residuals)
ITERATIONS = 5
MIN_SCALE = 1.0  # residual scale floor, in the units of the estimates (voxels: 1 mm on the afids grid)
_RIDGE = 1e-9  # keeps the weighted normal equations solvable when weights vanish


def fit_shape_prior(reference: np.ndarray, estimates: np.ndarray, iterations: int = ITERATIONS,
                    min_scale: float = MIN_SCALE) -> np.ndarray:
    """The prior ``[K, 3]``: ``reference`` ``[K, 3]`` mapped by the robust affine fit to ``estimates`` ``[K, 3]``
    (module docstring). Needs at least 4 landmarks not in one plane."""
    reference = np.asarray(reference, dtype=np.float64)
    return _design(reference) @ fit_affine(reference, estimates, iterations, min_scale)


def fit_affine(reference: np.ndarray, estimates: np.ndarray, iterations: int = ITERATIONS,
               min_scale: float = MIN_SCALE) -> np.ndarray:
    """The robust affine fit itself, ``[4, 3]`` float64: ``estimates ~ (reference - reference.mean(0)) @ fit[:3]
    + fit[3]``. So ``fit[:3].T`` is the linear part (reference units -> estimate units) and ``fit[3]`` the image
    of the reference's centroid."""
    reference = np.asarray(reference, dtype=np.float64)
    estimates = np.asarray(estimates, dtype=np.float64)
    design = _design(reference)
    weights = np.ones(len(reference))
    for _ in range(iterations):
        prior = design @ _weighted_fit(design, estimates, weights)
        residual = np.linalg.norm(prior - estimates, axis=1)
        scale = max(1.4826 * float(np.median(residual)), min_scale)
        weights = np.square(np.clip(1.0 - np.square(residual / (CUTOFF * scale)), 0.0, None))
    return _weighted_fit(design, estimates, weights)


def _design(reference: np.ndarray) -> np.ndarray:
    """``[K, 4]``: the reference points, centred (better conditioned), and a column of ones."""
    centred = reference - reference.mean(axis=0)
    return np.concatenate([centred, np.ones((len(reference), 1))], axis=1)


def _weighted_fit(design: np.ndarray, estimates: np.ndarray, weights: np.ndarray) -> np.ndarray:
    normal = design.T @ (weights[:, None] * design) + _RIDGE * np.eye(4)
    return np.linalg.solve(normal, design.T @ (weights[:, None] * estimates))


def fit_shape_prior_tf(reference: np.ndarray, estimates: tf.Tensor, iterations: int = ITERATIONS,
                       min_scale: float = MIN_SCALE) -> tf.Tensor:
    """:func:`fit_shape_prior` in a TensorFlow graph: ``reference`` a NumPy constant ``[K, 3]``, ``estimates``
    a float tensor ``[K, 3]``; the prior in the dtype of ``estimates`` (computed in float64)."""
    return shape_prior_of_fit_tf(reference, fit_affine_tf(reference, estimates, iterations, min_scale),
                                 estimates.dtype)


def shape_prior_of_fit_tf(reference: np.ndarray, fit: tf.Tensor, dtype: tf.DType = tf.float32) -> tf.Tensor:
    """The prior ``[K, 3]`` (``dtype``) of a fit from :func:`fit_affine_tf`."""
    design = tf.constant(_design(np.asarray(reference, dtype=np.float64)))
    return tf.cast(tf.linalg.matmul(design, fit), dtype)


def fit_affine_tf(reference: np.ndarray, estimates: tf.Tensor, iterations: int = ITERATIONS,
                  min_scale: float = MIN_SCALE) -> tf.Tensor:
    """:func:`fit_affine` in a TensorFlow graph: ``[4, 3]`` float64."""
    design = tf.constant(_design(np.asarray(reference, dtype=np.float64)))
    points = tf.cast(estimates, tf.float64)
    count = design.shape[0]

    def fit(weights: tf.Tensor) -> tf.Tensor:
        weighted = weights[:, None] * design
        normal = tf.linalg.matmul(design, weighted, transpose_a=True) + _RIDGE * tf.eye(4, dtype=tf.float64)
        return tf.linalg.solve(normal, tf.linalg.matmul(weighted, points, transpose_a=True))

    weights = tf.ones([count], tf.float64)
    for _ in range(iterations):
        residual = tf.norm(tf.linalg.matmul(design, fit(weights)) - points, axis=1)
        scale = tf.maximum(1.4826 * _median(residual), min_scale)
        weights = tf.square(tf.nn.relu(1.0 - tf.square(residual / (CUTOFF * scale))))
    return fit(weights)


def nearest_rotation_tf(linear: tf.Tensor) -> tf.Tensor:
    """The rotation ``[3, 3]`` nearest to ``linear`` ``[3, 3]`` (the orthogonal factor of its polar
    decomposition, its determinant forced to +1): the pose of an affine fit without its scaling and shear."""
    _, u, v = tf.linalg.svd(linear)
    one = tf.ones([], linear.dtype)
    sign = tf.where(tf.linalg.det(tf.linalg.matmul(u, v, transpose_b=True)) < 0, -one, one)
    flip = tf.stack([one, one, sign])
    return tf.linalg.matmul(u * flip[None, :], v, transpose_b=True)


def _median(values: tf.Tensor) -> tf.Tensor:
    """The median of a 1-D tensor of static length (NumPy's: the mean of the two middle values if even)."""
    count = values.shape[0]
    ordered = tf.sort(values)
    return 0.5 * (ordered[(count - 1) // 2] + ordered[count // 2])
