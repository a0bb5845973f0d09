"""CGRU / MDGRU layers against an independent NumPy implementation of the equations, gradients, DropConnect,
serialization and odd shapes."""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf
from training_helpers import convolution_ops

from mdgru_keras.layers import CGRU, MDGRU
from mdgru_keras.layers.cgru import input_gates, slice_convolution

# ----------------------------------------------------------------------------------------------------------
# NumPy reference, written from the equations (loops over time, batch and kernel offsets)
# ----------------------------------------------------------------------------------------------------------


def np_sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def np_conv_same(image: np.ndarray, kernel: np.ndarray, stride: int) -> np.ndarray:
    """'SAME' convolution (cross-correlation) of ``image`` [n_1..n_m, C] with ``kernel`` [k_1..k_m, C, O].

    Output size ceil(n / stride) per axis; zero padding p = max((out - 1) stride + k - n, 0) in total,
    p // 2 before (TensorFlow's convention).
    """
    spatial = image.shape[:-1]
    sizes = kernel.shape[:-2]
    out_shape = [-(-n // stride) for n in spatial]
    pads = []
    for n, k, o in zip(spatial, sizes, out_shape):
        total = max((o - 1) * stride + k - n, 0)
        pads.append((total // 2, total - total // 2))
    padded = np.pad(image, pads + [(0, 0)])
    out = np.zeros(out_shape + [kernel.shape[-1]], dtype=np.float64)
    for offset in itertools.product(*[range(k) for k in sizes]):
        window = tuple(slice(j, j + (o - 1) * stride + 1, stride) for j, o in zip(offset, out_shape))
        out += padded[window] @ kernel[offset]
    return out


def np_cgru(
    x: np.ndarray,
    input_kernel: np.ndarray,
    state_kernel: np.ndarray,
    bias: np.ndarray,
    axis: int,
    reverse: bool,
    strides: int,
) -> np.ndarray:
    """The C-GRU of the spec on ``x`` [B, n_1..n_d, C] along spatial ``axis`` (1-based)."""
    units = state_kernel.shape[-2]
    w_r, w_z, w_h = np.split(input_kernel, 3, axis=-1)
    u_r, u_z, u_h = np.split(state_kernel, 3, axis=-1)
    b_r, b_z, b_h = np.split(bias, 3)
    moved = np.moveaxis(x, axis, 1)  # [B, T, slice..., C]
    batch, steps = moved.shape[:2]
    outputs = []
    for b in range(batch):
        slice_shape = [-(-n // strides) for n in moved.shape[2:-1]]
        h = np.zeros(slice_shape + [units])
        states = [None] * steps
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        for t in order:
            x_t = moved[b, t]
            r = np_sigmoid(np_conv_same(x_t, w_r, strides) + np_conv_same(h, u_r, 1) + b_r)
            z = np_sigmoid(np_conv_same(x_t, w_z, strides) + np_conv_same(h, u_z, 1) + b_z)
            candidate = np.tanh(np_conv_same(x_t, w_h, strides) + r * np_conv_same(h, u_h, 1) + b_h)
            h = z * h + (1.0 - z) * candidate
            states[t] = h
        pooled = [np.mean(states[start : start + strides], axis=0) for start in range(0, steps, strides)]
        outputs.append(np.stack(pooled))  # [T', slice'..., U]
    return np.moveaxis(np.stack(outputs), 1, axis)


def np_mdgru(x: np.ndarray, layer: MDGRU) -> np.ndarray:
    total = 0.0
    for cgru in layer.cgrus:
        total = total + np_cgru(x, *weights_of(cgru), cgru.axis, cgru.reverse, layer.strides)
    return total / len(layer.cgrus) if layer.combine == "mean" else total


def weights_of(cgru: CGRU) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.asarray(cgru.input_kernel, np.float64),
        np.asarray(cgru.state_kernel, np.float64),
        np.asarray(cgru.bias, np.float64),
    )


def randomize(layer: keras.layers.Layer, rng: np.random.Generator, scale: float = 0.5) -> None:
    """Random weights everywhere, biases included (zero-initialized by default)."""
    for weight in layer.trainable_weights:
        weight.assign(rng.normal(0.0, scale, weight.shape).astype(weight.dtype))


# ----------------------------------------------------------------------------------------------------------
# Forward pass against the reference
# ----------------------------------------------------------------------------------------------------------

CGRU_CASES = [
    (shape, axis, reverse, strides)
    for shape in [(2, 7, 5, 3), (1, 5, 6, 4, 2)]
    for axis in range(1, len(shape) - 1)
    for reverse in (False, True)
    for strides in (1, 2)
]


@pytest.mark.parametrize("shape,axis,reverse,strides", CGRU_CASES)
def test_cgru_matches_numpy(shape, axis, reverse, strides, rng):
    x = rng.normal(size=shape).astype(np.float32)
    layer = CGRU(3, axis=axis, reverse=reverse, strides=strides, dropconnect=0.0)
    layer.build(x.shape)
    randomize(layer, rng)
    expected = np_cgru(x.astype(np.float64), *weights_of(layer), axis, reverse, strides)
    inference = layer(x, training=False).numpy()
    training = layer(x, training=True).numpy()  # the path with the hand-written gradient
    assert inference.shape == expected.shape == layer.compute_output_shape(x.shape)
    np.testing.assert_allclose(inference, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(training, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("combine", ["sum", "mean"])
@pytest.mark.parametrize("shape,strides,filters", [((2, 6, 5, 2), 2, (3, 5)), ((1, 4, 5, 3, 2), 1, (3, 3))])
def test_mdgru_matches_numpy(shape, strides, filters, combine, rng):
    x = rng.normal(size=shape).astype(np.float32)
    layer = MDGRU(
        2, strides=strides, input_filter=filters[0], state_filter=filters[1], combine=combine, dropconnect=0.0
    )
    layer.build(x.shape)
    randomize(layer, rng)
    assert len(layer.cgrus) == 2 * (len(shape) - 2)
    expected = np_mdgru(x.astype(np.float64), layer)
    np.testing.assert_allclose(layer(x).numpy(), expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(layer(x, training=True).numpy(), expected, atol=1e-4, rtol=0)


def test_filter_sizes_even_and_odd(rng):
    """Even filter sizes pad asymmetrically ('SAME'); the gradient path must mirror that."""
    x = rng.normal(size=(1, 5, 6, 7, 2)).astype(np.float32)
    for input_filter, state_filter in [(2, 4), (1, 1), (5, 2)]:
        layer = CGRU(2, axis=2, strides=2, input_filter=input_filter, state_filter=state_filter, dropconnect=0.0)
        layer.build(x.shape)
        randomize(layer, rng)
        expected = np_cgru(x.astype(np.float64), *weights_of(layer), 2, False, 2)
        np.testing.assert_allclose(layer(x).numpy(), expected, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------------


def finite_difference_check(layer, x: np.ndarray, training: bool, rng, entries: int = 5, eps: float = 1e-6):
    """Central differences of L = sum(y * w) for a few entries of every weight and of the input (float64)."""
    x = tf.constant(x)
    w = tf.constant(rng.normal(size=layer.compute_output_shape(x.shape)))

    @tf.function
    def loss():
        return tf.reduce_sum(layer(x, training=training) * w)

    with tf.GradientTape() as tape:
        tape.watch(x)
        value = tf.reduce_sum(layer(x, training=training) * w)
    grads = tape.gradient(value, layer.trainable_weights + [x])
    x_var = tf.Variable(x)  # perturbable copy of the input

    @tf.function
    def loss_of_input():
        return tf.reduce_sum(layer(x_var, training=training) * w)

    for variable, grad, fn in [(v, g, loss) for v, g in zip(layer.trainable_weights, grads[:-1])] + [
        (x_var, grads[-1], loss_of_input)
    ]:
        flat_size = int(np.prod(variable.shape))
        for index in rng.choice(flat_size, size=min(entries, flat_size), replace=False):
            position = np.unravel_index(index, variable.shape)
            original = variable.numpy()
            plus, minus = original.copy(), original.copy()
            plus[position] += eps
            minus[position] -= eps
            variable.assign(plus)
            f_plus = fn().numpy()
            variable.assign(minus)
            f_minus = fn().numpy()
            variable.assign(original)
            numeric = (f_plus - f_minus) / (2 * eps)
            analytic = grad.numpy()[position]
            assert abs(numeric - analytic) <= 1e-6 + 1e-5 * abs(numeric), (variable.name, position, numeric, analytic)


@pytest.mark.parametrize("training", [True, False], ids=["kept-gates", "recomputed-gates"])
@pytest.mark.parametrize(
    "shape,axis,reverse,strides",
    [((1, 4, 3, 2), 1, False, 1), ((2, 3, 4, 3, 2), 2, True, 2), ((1, 5, 4, 2), 2, True, 2)],
)
def test_cgru_gradient_finite_differences(shape, axis, reverse, strides, training, rng):
    layer = CGRU(2, axis=axis, reverse=reverse, strides=strides, dropconnect=0.0, dtype="float64")
    x = rng.normal(size=shape)
    layer.build(x.shape)
    randomize(layer, rng)
    finite_difference_check(layer, x, training, rng)


def test_mdgru_gradient_finite_differences(rng):
    layer = MDGRU(2, strides=2, input_filter=3, state_filter=2, dropconnect=0.0, dtype="float64")
    x = rng.normal(size=(1, 3, 4, 3, 1))
    layer.build(x.shape)
    randomize(layer, rng)
    finite_difference_check(layer, x, True, rng, entries=2)


def tf_reference_cgru(x: tf.Tensor, cgru: CGRU, strides: int) -> tf.Tensor:
    """The spec's C-GRU in plain TensorFlow ops, unrolled in Python: a reference for automatic gradients."""
    moved = tf.experimental.numpy.moveaxis(x, cgru.axis, 1)  # [B, T, slice..., C]
    w_r, w_z, w_h = tf.split(cgru.input_kernel, 3, axis=-1)
    u_r, u_z, u_h = tf.split(cgru.state_kernel, 3, axis=-1)
    b_r, b_z, b_h = tf.split(cgru.bias, 3)
    steps = moved.shape[1]
    slice_rank = len(x.shape) - 3

    def conv(image, kernel, stride):
        return tf.nn.convolution(image, kernel, strides=[stride] * slice_rank, padding="SAME")

    h = tf.zeros_like(conv(moved[:, 0], w_r, strides))
    states = [None] * steps
    for t in range(steps - 1, -1, -1) if cgru.reverse else range(steps):
        x_t = moved[:, t]
        r = tf.sigmoid(conv(x_t, w_r, strides) + conv(h, u_r, 1) + b_r)
        z = tf.sigmoid(conv(x_t, w_z, strides) + conv(h, u_z, 1) + b_z)
        candidate = tf.tanh(conv(x_t, w_h, strides) + r * conv(h, u_h, 1) + b_h)
        h = z * h + (1 - z) * candidate
        states[t] = h
    pooled = [tf.reduce_mean(tf.stack(states[s : s + strides]), axis=0) for s in range(0, steps, strides)]
    return tf.experimental.numpy.moveaxis(tf.stack(pooled, axis=1), 1, cgru.axis)


@pytest.mark.parametrize(
    "shape,strides,filters", [((2, 9, 7, 5, 3), 2, 3), ((1, 8, 6, 4), 1, 5), ((1, 1, 4, 5, 2), 1, 3)]
)
def test_hand_written_bptt_equals_automatic_gradient_of_reference(shape, strides, filters, rng):
    """The layer's gradients (training: kept gate values; inference: recomputed) equal TensorFlow's automatic
    gradient of an independent unrolled implementation, in float32 on moderate sizes."""
    layer = MDGRU(4, strides=strides, input_filter=filters, state_filter=filters, dropconnect=0.0)
    x = tf.constant(rng.normal(size=shape).astype(np.float32))
    layer.build(x.shape)
    randomize(layer, rng)
    w = tf.constant(rng.normal(size=layer.compute_output_shape(shape)).astype(np.float32))
    sources = layer.trainable_weights + [x]
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(tf.add_n([tf_reference_cgru(x, cgru, strides) for cgru in layer.cgrus]) * w)
    # T = 1: the state kernel of that axis is unused (zero gradient; None from the automatic one)
    expected = [np.zeros(s.shape) if g is None else g.numpy() for g, s in zip(tape.gradient(loss, sources), sources)]
    for training in (True, False):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=training) * w)
        for got, want in zip(tape.gradient(loss, sources), expected):
            scale = np.abs(want).max() + 1e-6
            np.testing.assert_allclose(got.numpy() / scale, want / scale, atol=2e-5, rtol=0)


def test_xla_compiled_training_step_matches(rng):
    """Keras compiles training steps with XLA on GPU by default ("auto"): the layer must compile and agree."""
    x = tf.constant(rng.normal(size=(2, 6, 5, 2)).astype(np.float32))
    layer = CGRU(3, axis=1, reverse=True, strides=2, dropconnect=0.0)
    layer.build(x.shape)
    randomize(layer, rng)

    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * y)
        return [y, *tape.gradient(loss, layer.trainable_weights + [x])]

    for plain, compiled in zip(tf.function(step)(), tf.function(step, jit_compile=True)()):
        np.testing.assert_allclose(compiled.numpy(), plain.numpy(), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# DropConnect
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.5, 0.25])
def test_dropconnect_mask_drops_the_configured_fraction(rate):
    layer = CGRU(8, axis=1, dropconnect=rate, seed=3)
    layer.build((1, 6, 6, 6, 4))
    kernel = layer.input_kernel.numpy()
    masks = []
    for _ in range(4):
        dropped = layer.dropconnect_kernel(training=True).numpy()
        kept = dropped != 0
        masks.append(kept)
        assert abs((1 - kept.mean()) - rate) < 0.06  # 864 weights: binomial sd of the fraction <= 0.017
        np.testing.assert_allclose(dropped[kept], kernel[kept] / (1 - rate), rtol=1e-6)
    assert not all(np.array_equal(masks[0], m) for m in masks[1:]), "the mask must be fresh at every call"
    np.testing.assert_array_equal(layer.dropconnect_kernel(training=False).numpy(), kernel)


def test_dropconnect_training_varies_inference_is_deterministic(rng):
    x = rng.normal(size=(2, 6, 5, 4, 3)).astype(np.float32)
    layer = MDGRU(4, strides=2, seed=7)
    layer.build(x.shape)
    randomize(layer, rng)
    train_step = tf.function(lambda x: layer(x, training=True))
    first, second = train_step(x).numpy(), train_step(x).numpy()  # fresh masks inside one compiled function
    assert not np.allclose(first, second)
    assert not np.allclose(layer(x, training=True).numpy(), layer(x, training=True).numpy())
    inference = layer(x, training=False).numpy()
    np.testing.assert_array_equal(inference, layer(x, training=False).numpy())
    np.testing.assert_array_equal(inference, layer(x).numpy())
    np.testing.assert_allclose(inference, np_mdgru(x.astype(np.float64), layer), atol=1e-4)


def test_each_cgru_draws_its_own_mask():
    layer = MDGRU(4, dropconnect=0.5, seed=11)
    layer.build((1, 5, 5, 5, 3))
    masks = [cgru.dropconnect_kernel(training=True).numpy() != 0 for cgru in layer.cgrus]
    assert len({m.tobytes() for m in masks}) == len(masks)


# ----------------------------------------------------------------------------------------------------------
# Serialization
# ----------------------------------------------------------------------------------------------------------


def small_model(rng, spatial=(6, 5, 4), channels=2) -> keras.Model:
    inputs = keras.Input((*spatial, channels))
    h = MDGRU(3, strides=2, input_filter=3, state_filter=2, combine="mean", seed=5, name="mdgru_a")(inputs)
    outputs = CGRU(2, axis=2, reverse=True, strides=1, dropconnect=0.25, bias_initializer="ones", name="cgru_b")(h)
    model = keras.Model(inputs, outputs)
    for layer in model.layers:
        if layer.trainable_weights:
            randomize(layer, rng, scale=0.3)
    return model


def test_config_round_trip(rng):
    for layer in [
        CGRU(5, axis=3, reverse=True, strides=2, input_filter=5, state_filter=3, dropconnect=0.3, seed=2),
        MDGRU(4, strides=2, input_filter=7, state_filter=5, dropconnect=0.1, combine="mean", seed=9),
    ]:
        config = layer.get_config()
        clone = type(layer).from_config(config)
        assert clone.get_config() == config
        x = rng.normal(size=(1, 5, 4, 3, 2)).astype(np.float32)
        layer.build(x.shape)
        clone.build(x.shape)
        clone.set_weights(layer.get_weights())
        np.testing.assert_array_equal(layer(x).numpy(), clone(x).numpy())


def test_keras_file_round_trip(tmp_path, rng):
    model = small_model(rng)
    x = rng.normal(size=(2, 6, 5, 4, 2)).astype(np.float32)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(x, training=False).numpy(), model(x, training=False).numpy())
    assert [w.shape for w in loaded.weights] == [w.shape for w in model.weights]


@pytest.mark.slow
def test_saved_model_round_trips(tmp_path, rng):
    model = small_model(rng)
    x = rng.normal(size=(1, 6, 5, 4, 2)).astype(np.float32)
    expected = model(x, training=False).numpy()
    expected_graph = tf.function(lambda volume: model(volume, training=False))(tf.constant(x)).numpy()

    model.export(tmp_path / "export", verbose=False)  # Keras' SavedModel export ("serve" endpoint)
    exported = tf.saved_model.load(str(tmp_path / "export"))  # kept: its variables die with it
    served = exported.serve(tf.constant(x)).numpy()
    np.testing.assert_array_equal(served, expected_graph)
    np.testing.assert_allclose(served, expected, atol=1e-6)  # eager vs graph: float rounding only

    class Wrapper(tf.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, None, 2], tf.float32)])
        def __call__(self, volume):
            return self.model(volume, training=False)

    tf.saved_model.save(Wrapper(model), str(tmp_path / "module"))
    loaded = tf.saved_model.load(str(tmp_path / "module"))
    np.testing.assert_array_equal(loaded(tf.constant(x)).numpy(), expected_graph)


@pytest.mark.parametrize("shape", [(4, 3, 10, 9, 2), (3, 2, 8, 8, 8), (5, 3, 11, 1)])
def test_input_gates_are_the_same_by_either_convolution_method(shape, rng):
    rank = len(shape) - 3
    x = tf.constant(rng.normal(size=shape))  # [T, B, slice..., C], float64: agreement to rounding
    kernel = tf.constant(rng.normal(size=(3,) * rank + (shape[-1], 3 * 4)))
    bias = tf.constant(rng.normal(size=12))
    strided = input_gates(x, kernel, bias, 2, "strided")
    blocked = input_gates(x, kernel, bias, 2, "space_to_depth")
    for want, got in zip(strided, blocked):
        assert got.shape == want.shape == (*shape[:2], *[-(-n // 2) for n in shape[2:-1]], 4)
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="method"):
        input_gates(x, kernel, bias, 2, "im2col")


def test_few_channel_slices_run_no_strided_convolution_kernel(rng):
    """The fine windows' 2 channels at stride 2 take space-to-depth (faster on CPU); 8 channels do not."""
    kernel2, kernel8 = (tf.constant(rng.normal(size=(3, 3, c, 4)), tf.float32) for c in (2, 8))

    def strided_convolutions(kernel: tf.Tensor) -> set[tuple[str, int]]:
        spec = tf.TensorSpec([None, 32, 32, kernel.shape[2]])
        concrete = tf.function(lambda a: slice_convolution(a, kernel, 2)).get_concrete_function(spec)
        return {(kind, stride) for kind, stride in convolution_ops(concrete, "Conv") if stride > 1}

    assert strided_convolutions(kernel2) == set()
    assert strided_convolutions(kernel8) == {("Conv2D", 2)}


# ----------------------------------------------------------------------------------------------------------
# Shapes and arguments
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,strides",
    [((3, 7, 5, 2), 2), ((1, 5, 7, 9, 1), 2), ((2, 7, 4, 5, 3), 3), ((1, 1, 4, 5, 2), 1), ((1, 2, 1, 3, 1), 2)],
)
def test_odd_shapes_match_numpy(shape, strides, rng):
    x = rng.normal(size=shape).astype(np.float32)
    layer = MDGRU(3, strides=strides, dropconnect=0.0)
    layer.build(x.shape)
    randomize(layer, rng)
    out = layer(x).numpy()
    assert out.shape == (shape[0], *[-(-n // strides) for n in shape[1:-1]], 3)
    np.testing.assert_allclose(out, np_mdgru(x.astype(np.float64), layer), atol=1e-4, rtol=0)
    with tf.GradientTape() as tape:  # the training path handles T = 1 and short last pooling groups
        loss = tf.reduce_sum(layer(x, training=True) ** 2)
    assert all(np.all(np.isfinite(g.numpy())) for g in tape.gradient(loss, layer.trainable_weights))


def test_unknown_spatial_sizes(rng):
    inputs = keras.Input((None, None, None, 2))
    model = keras.Model(inputs, MDGRU(3, strides=2)(inputs))
    assert model.output.shape == (None, None, None, None, 3)
    for shape in [(1, 6, 5, 4, 2), (2, 3, 8, 5, 2)]:
        x = rng.normal(size=shape).astype(np.float32)
        assert model.predict(x, verbose=0).shape == (shape[0], *[-(-n // 2) for n in shape[1:-1]], 3)


@pytest.mark.parametrize(
    "make",
    [
        lambda: MDGRU(4, combine="max"),
        lambda: MDGRU(0),
        lambda: CGRU(4, dropconnect=1.0),
        lambda: CGRU(4, strides=0),
        lambda: CGRU(4, state_filter=0),
    ],
)
def test_bad_arguments(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("shape", [(1, 5, 3), (1, 3, 3, 3, 3, 2)])
def test_bad_input_rank(shape):
    with pytest.raises(ValueError, match="2D or 3D"):
        MDGRU(2).build(shape)
    with pytest.raises(ValueError, match="2D or 3D"):
        CGRU(2).build(shape)


def test_axis_out_of_range():
    with pytest.raises(ValueError, match="axis"):
        CGRU(2, axis=3).build((1, 4, 4, 2))
