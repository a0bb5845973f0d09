"""Windows, padding and coordinate classes (mdgru_keras.geometry.windows, .coordinate_classes): properties, and
NumPy vs TF agreement."""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mdgru_keras.geometry.coordinate_classes import (
    class_to_window_voxel,
    class_width_voxel,
    decode_axis,
    decode_axis_tf,
    num_classes,
    parabola_peak,
    parabola_peak_tf,
    peak_mass,
    peak_mass_tf,
    window_voxel_to_class,
    window_voxel_to_class_tf,
)
from mdgru_keras.geometry.windows import (
    centered_window_origin,
    centered_window_origin_tf,
    crop_with_padding,
    crop_with_padding_tf,
    shared_window_groups,
    shared_window_groups_tf,
    window_origin_around,
    window_origin_around_tf,
    window_to_volume_voxel,
    window_to_volume_voxel_tf,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TF_FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

window_sizes = st.sampled_from([4, 8, 16, 32, 64])
shapes = st.tuples(*(st.integers(1, 300),) * 3)


@st.composite
def volume_and_landmark(draw, near_border: bool = True):
    """A volume shape and a continuous landmark inside it, often at a face, an edge or a corner."""
    shape = np.array(draw(shapes))
    landmark_voxel = []
    for n in shape:
        where = draw(st.sampled_from(["low", "high", "any"])) if near_border else "any"
        low, high = -0.5, n - 0.5 - 1e-6
        if where == "low":
            value = draw(st.floats(low, min(low + 1.0, high)))
        elif where == "high":
            value = draw(st.floats(max(high - 1.0, low), high))
        else:
            value = draw(st.floats(low, high))
        # dyadic coordinates (multiples of 1/1024) keep float arithmetic exact, so "exactly" can be tested
        landmark_voxel.append(np.clip(np.round(value * 1024) / 1024, low, high - 1 / 1024))
    return shape, np.array(landmark_voxel)


# ---------------------------------------------------------------------------------------------------------
# fine windows


@FAST
@given(volume_and_landmark(), window_sizes)
def test_landmark_near_any_face_or_corner_lands_well_inside_its_window(case, window_size):
    shape, landmark_voxel = case
    origin = window_origin_around(landmark_voxel, window_size)
    window_voxel = landmark_voxel - origin
    # The window is centred on the voxel nearest the landmark, whatever the volume border does.
    assert np.all(window_voxel >= window_size / 2 - 0.5 - 1e-9)
    assert np.all(window_voxel <= window_size / 2 + 0.5 + 1e-9)
    # ... and maps back (to float64 rounding: (x - o) + o need not be x bit for bit; hypothesis found such an x)
    np.testing.assert_allclose(window_to_volume_voxel(window_voxel, origin), landmark_voxel, rtol=0, atol=1e-12)
    # Its class lies strictly inside the class range (never clipped at the window border).
    for n, factor in ((1, 1), (4, 1), (2, 1)):
        index = window_voxel_to_class(window_voxel, window_size, n, factor)
        assert np.all(index > 0) and np.all(index < num_classes(window_size, n, factor) - 1)


@FAST
@given(volume_and_landmark(), window_sizes)
def test_cropped_window_shows_the_landmark_voxel_at_its_window_coordinate(case, window_size):
    shape, landmark_voxel = case
    shape = np.minimum(shape, 40)  # the volume is materialized here
    landmark_voxel = np.minimum(landmark_voxel, shape - 0.5 - 1e-6)
    volume = np.zeros(tuple(shape), np.float32)
    nearest = np.floor(landmark_voxel + 0.5).astype(int)
    volume[tuple(nearest)] = 1.0
    origin = window_origin_around(landmark_voxel, window_size)
    window = crop_with_padding(volume, origin, (window_size,) * 3)
    assert window.shape == (window_size,) * 3
    assert window.sum() == 1.0  # the marked voxel, and zero padding everywhere outside the volume
    np.testing.assert_array_equal(np.argwhere(window)[0], nearest - origin)


@FAST
@given(shapes, window_sizes)
def test_centered_region_covers_the_middle_of_small_and_large_volumes(shape, size):
    shape = np.array(shape)
    origin = centered_window_origin(shape, (size,) * 3)
    # A smaller volume lies entirely in the region, a larger one gives up at most one voxel more at its end.
    before = -origin
    after = origin + size - shape
    assert np.all(np.abs(before - after) <= 1)
    small = shape <= size
    assert np.all(before[small] >= 0) and np.all(after[small] >= 0)
    assert np.all(before[~small] <= 0) and np.all(after[~small] <= 0)


@TF_FAST
@given(
    st.tuples(*(st.integers(1, 12),) * 3),
    st.tuples(*(st.integers(-20, 20),) * 3),
    st.sampled_from([1, 4, 8]),
)
def test_crop_with_padding_numpy_and_tf_agree_also_far_outside(shape, origin, size):
    volume = np.arange(np.prod(shape) * 2, dtype=np.float32).reshape(shape + (2,)) + 1.0
    expected = crop_with_padding(volume, np.array(origin), (size,) * 3)
    actual = crop_with_padding_tf(tf.constant(volume), tf.constant(origin), (size,) * 3).numpy()
    np.testing.assert_array_equal(actual, expected)


@TF_FAST
@given(volume_and_landmark(), window_sizes)
def test_window_origins_numpy_and_tf_agree(case, window_size):
    shape, landmark_voxel = case
    np.testing.assert_array_equal(
        window_origin_around_tf(tf.constant(landmark_voxel, tf.float32), window_size).numpy(),
        window_origin_around(landmark_voxel.astype(np.float32), window_size),
    )
    np.testing.assert_array_equal(
        centered_window_origin_tf(tf.constant(shape), window_size).numpy(),
        centered_window_origin(shape, window_size),
    )
    origin = window_origin_around(landmark_voxel, window_size)
    np.testing.assert_allclose(
        window_to_volume_voxel_tf(tf.constant(landmark_voxel - origin, tf.float32), tf.constant(origin)).numpy(),
        landmark_voxel,
        atol=1e-4,
    )


# ---------------------------------------------------------------------------------------------------------
# coordinate <-> class


@FAST
@given(
    st.sampled_from([(64, 4, 1), (256, 4, 4), (32, 2, 2), (16, 1, 1), (256, 4, 8)]),
    st.floats(0.0, 1.0, exclude_max=True),
)
def test_class_of_a_coordinate_decodes_to_within_half_a_class(sizes, fraction):
    window_size, n, factor = sizes
    window_voxel = -0.5 + fraction * window_size
    index = window_voxel_to_class(window_voxel, window_size, n, factor)
    assert 0 <= index < num_classes(window_size, n, factor)
    centre = class_to_window_voxel(index, n, factor)
    assert abs(centre - window_voxel) <= class_width_voxel(n, factor) / 2 + 1e-9
    tf_index = window_voxel_to_class_tf(tf.constant(window_voxel, tf.float32), window_size, n, factor)
    assert int(tf_index) == index


# ---------------------------------------------------------------------------------------------------------
# decoding


def test_one_hot_and_known_vectors_decode_to_known_coordinates():
    classes = 16
    p = np.zeros(classes)
    p[5] = 1.0
    # n = 4, factor 1: class 5 covers [1.25, 1.5) - 0.5 ... its centre is (5 + 0.5) / 4 - 0.5 = 0.875.
    assert decode_axis(p, 4, 1, parabola=False) == pytest.approx(0.875)
    assert decode_axis(p, 4, 1, parabola=True) == pytest.approx(0.875)  # symmetric neighbours: no shift
    # coarse: n = 4, factor 4 -> one class per voxel, class 5 is voxel 5.
    assert decode_axis(p, 4, 4, parabola=False) == pytest.approx(5.0)
    # Asymmetric neighbours 0.2 / 0.6 around a peak 0.8 at class 7: vertex at 7 + 0.5 (0.2-0.6)/(0.2-1.6+0.6) = 7.25.
    q = np.zeros(classes)
    q[6:9] = [0.2, 0.8, 0.6]
    assert parabola_peak(q) == pytest.approx(7.25)
    assert decode_axis(q, 1, 1, parabola=True) == pytest.approx(7.25)
    assert decode_axis(q, 1, 1, parabola=False) == pytest.approx(7.0)
    assert decode_axis(q, 4, 4, parabola=True) == pytest.approx(7.25)
    # Peak at the border: argmax unchanged.
    r = np.zeros(classes)
    r[:2] = [0.7, 0.3]
    assert parabola_peak(r) == 0.0
    batch = np.stack([p, q, r])
    np.testing.assert_allclose(decode_axis_tf(tf.constant(batch), 1, 1, True).numpy(), [5.0, 7.25, 0.0], atol=1e-6)


def gaussian(classes: int, centre: float, sigma: float) -> np.ndarray:
    k = np.arange(classes)
    p = np.exp(-0.5 * ((k - centre) / sigma) ** 2)
    return p / p.sum()


@FAST
@given(st.integers(2, 60), st.floats(0.5, 4.0))
def test_gaussian_centred_between_two_classes_decodes_to_its_centre(left, sigma):
    centre = left + 0.5
    p = gaussian(64, centre, sigma)
    assert abs(parabola_peak(p) - centre) < 0.05
    assert abs(float(parabola_peak_tf(tf.constant(p, tf.float32))) - centre) < 0.05
    # and through decode_axis, in window voxels (n = 4: a class is a quarter voxel)
    assert abs(decode_axis(p, 4, 1) - class_to_window_voxel(centre, 4, 1)) < 0.05 * 0.25


@FAST
@given(st.integers(2, 60), st.floats(-0.5, 0.5), st.floats(1.0, 4.0))
def test_parabola_beats_argmax_on_gaussians_anywhere(peak, shift, sigma):
    centre = peak + shift
    p = gaussian(64, centre, sigma)
    assert abs(parabola_peak(p) - centre) < 0.05
    assert abs(parabola_peak(p) - centre) <= abs(np.argmax(p) - centre) + 1e-9


@TF_FAST
@given(st.integers(0, 2**31 - 1), st.sampled_from([(3, 16), (2, 5, 64), (7, 1)]))
def test_decoding_and_peak_mass_numpy_and_tf_agree(seed, shape):
    logits = np.random.default_rng(seed).normal(0, 3, size=shape)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    pt = tf.constant(p, tf.float32)
    p32 = p.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(parabola_peak_tf(pt).numpy(), parabola_peak(p32), atol=1e-4)
    for parabola in (False, True):
        np.testing.assert_allclose(
            decode_axis_tf(pt, 4, 2, parabola).numpy(), decode_axis(p32, 4, 2, parabola), atol=1e-4
        )
    mass = peak_mass(p32)
    np.testing.assert_allclose(peak_mass_tf(pt).numpy(), mass, atol=1e-5)
    assert np.all(mass <= 1 + 1e-6) and np.all(mass >= p32.max(-1) - 1e-9)


def test_peak_mass_counts_the_peak_and_its_neighbours_only():
    p = np.array([[0.1, 0.2, 0.4, 0.2, 0.1], [0.6, 0.3, 0.1, 0.0, 0.0]])
    np.testing.assert_allclose(peak_mass(p), [0.8, 0.9])


# ---------------------------------------------------------------------------------------------------------
# shared fine windows


@TF_FAST
@given(
    st.lists(st.tuples(*(st.floats(-10, 80),) * 3), min_size=1, max_size=12),
    st.sampled_from([(16, 0), (16, 4), (16, 6), (32, 8), (64, 16)]),
)
def test_shared_windows_hold_every_member_with_the_margin(points, sizes):
    window_size, margin = sizes
    centers = np.round(np.array(points) * 64) / 64  # exact in float32 too
    group_of_point, origins = shared_window_groups(centers, window_size, margin)
    assert 1 <= len(origins) <= len(centers)
    assert set(group_of_point.tolist()) == set(range(len(origins)))
    window_voxel = centers - origins[group_of_point]
    assert np.all(window_voxel >= margin) and np.all(window_voxel <= window_size - 1 - margin)
    # a group of one point gets the point's own centred window
    for g in range(len(origins)):
        members = np.flatnonzero(group_of_point == g)
        if len(members) == 1:
            np.testing.assert_array_equal(origins[g], window_origin_around(centers[members[0]], window_size))
    tf_group, tf_origins = shared_window_groups_tf(tf.constant(centers, tf.float32), window_size, margin)
    np.testing.assert_array_equal(tf_group.numpy(), group_of_point)
    np.testing.assert_array_equal(tf_origins.numpy(), origins)


def test_shared_windows_group_near_points_and_separate_far_ones():
    centers = np.array([[10.0, 10, 10], [12, 9, 11], [40, 40, 40], [11, 11, 10]])
    group_of_point, origins = shared_window_groups(centers, 16, 4)
    np.testing.assert_array_equal(group_of_point, [0, 0, 1, 0])
    assert len(origins) == 2
    with pytest.raises(ValueError):
        shared_window_groups(centers, 16, 7)
