"""StridedConv3D / StridedConv3DTranspose: the forward and both gradients equal TensorFlow's convolutions, no
strided-conv gradient kernel in a training graph, serialization, training, old models, distribution."""

from __future__ import annotations

import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from training_helpers import ROOT, cli_env, convolution_ops

from mdgru_keras import networks as N
from mdgru_keras.config import load_preset
from mdgru_keras.layers import StridedConv3D, StridedConv3DTranspose, upgrade_strided_convolutions
from mdgru_keras.layers.strided_conv import (
    block_conv3d_transpose,
    space_to_depth_convolution,
    strided_conv3d,
    strided_conv3d_flops,
)

# (input shape, kernel size, strides, padding, output channels)
CASES = [
    ((2, 32, 32, 32, 2), 9, 4, "same", 8),  # tiny preset's coarse input convolution
    ((1, 40, 40, 40, 2), 11, 5, "same", 8),  # cpu preset's filter and stride on a smaller volume
    ((1, 13, 15, 11, 2), 9, 4, "same", 3),  # sizes not divisible by the stride
    ((1, 13, 15, 11, 2), 9, 4, "valid", 3),
    ((2, 10, 11, 12, 3), 3, 2, "same", 4),
    ((1, 11, 12, 10, 2), 7, 2, "same", 3),  # padding (3) larger than the stride
    ((1, 17, 16, 15, 1), 4, 3, "valid", 2),  # even filter
    ((2, 9, 9, 9, 2), 1, 2, "same", 2),  # filter smaller than the stride
    ((1, 12, 13, 9, 2), (3, 5, 4), (2, 3, 1), "same", 3),  # per-axis filters and strides
    ((1, 12, 13, 9, 2), (3, 5, 4), (2, 3, 1), "valid", 3),
]


def _triple(value):
    return (value,) * 3 if isinstance(value, int) else tuple(value)


def _conv_and_gradients(conv, x, kernel, dy):
    with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        y = conv(x, kernel)
        loss = tf.reduce_sum(y * dy)
    return (y, *tape.gradient(loss, [x, kernel]))


@pytest.mark.parametrize(("shape", "kernel_size", "strides", "padding", "channels"), CASES)
def test_forward_and_gradients_equal_tensorflows_conv3d(shape, kernel_size, strides, padding, channels, rng):
    kernel_size, strides = _triple(kernel_size), _triple(strides)
    x = tf.constant(rng.normal(size=shape))  # float64: agreement to rounding
    kernel = tf.constant(rng.normal(size=(*kernel_size, shape[-1], channels)))
    tf_strides = [1, *strides, 1]
    reference = tf.nn.conv3d(x, kernel, tf_strides, padding.upper())
    dy = tf.constant(rng.normal(size=reference.shape))
    expected = _conv_and_gradients(lambda a, b: tf.nn.conv3d(a, b, tf_strides, padding.upper()), x, kernel, dy)
    actual = _conv_and_gradients(lambda a, b: strided_conv3d(a, b, strides, padding), x, kernel, dy)
    for name, want, got in zip(("forward", "input gradient", "kernel gradient"), expected, actual):
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-10 * np.abs(want).max(), err_msg=name)


# (input shape, kernel size, stride, output channels): 1-3 spatial axes, 'same' padding
SPACE_TO_DEPTH_CASES = [
    ((6, 32, 32, 2), 3, 2, 5),  # the MD-GRU's first-level slice input convolution (2-channel window)
    ((3, 15, 12, 2), 3, 2, 4),  # odd size: TensorFlow pads one voxel before
    ((2, 11, 13, 3), 5, 2, 2),  # padding (2) as large as the stride
    ((2, 14, 10, 1), 7, 3, 3),  # padding larger than the stride
    ((2, 13, 9, 2), 4, 3, 2),  # even filter
    ((2, 9, 8, 2), 1, 2, 3),  # filter smaller than the stride: blocks no output reads
    ((4, 17, 2), 3, 2, 3),  # 1D slices (a 2D MD-GRU)
    ((2, 9, 10, 11, 2), 3, 2, 3),  # 3 axes
]


@pytest.mark.parametrize(("shape", "kernel_size", "stride", "channels"), SPACE_TO_DEPTH_CASES)
def test_space_to_depth_convolution_and_gradients_equal_the_strided_convolution(
    shape, kernel_size, stride, channels, rng
):
    rank = len(shape) - 2
    x = tf.constant(rng.normal(size=shape))  # float64: agreement to rounding
    kernel = tf.constant(rng.normal(size=(*(kernel_size,) * rank, shape[-1], channels)))
    reference = tf.nn.convolution(x, kernel, strides=stride, padding="SAME")
    dy = tf.constant(rng.normal(size=reference.shape))
    # in tf.function: TensorFlow's eager gradient of a conv3d fails to read the op's data_format
    expected = tf.function(_conv_and_gradients)(
        lambda a, b: tf.nn.convolution(a, b, strides=stride, padding="SAME"), x, kernel, dy
    )
    actual = tf.function(_conv_and_gradients)(lambda a, b: space_to_depth_convolution(a, b, stride), x, kernel, dy)
    for name, want, got in zip(("forward", "input gradient", "kernel gradient"), expected, actual):
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-10 * np.abs(want).max(), err_msg=name)


def test_space_to_depth_convolution_gives_the_same_numbers_with_dynamic_sizes(rng):
    kernel = tf.constant(rng.normal(size=(3, 3, 2, 4)).astype("float32"))

    def conv(signature):
        return tf.function(lambda a: space_to_depth_convolution(a, kernel, 2), input_signature=[signature])

    static = conv(tf.TensorSpec([None, 16, 15, 2]))
    dynamic = conv(tf.TensorSpec([None, None, None, 2]))
    for batch in (1, 5):
        x = tf.constant(rng.normal(size=(batch, 16, 15, 2)).astype("float32"))
        want = tf.nn.convolution(x, kernel, strides=2, padding="SAME")
        np.testing.assert_allclose(static(x).numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
        # the same blocking whether the sizes are known or not: a SavedModel with any input shape computes the
        # numbers its static-shape trace does
        np.testing.assert_array_equal(dynamic(x).numpy(), static(x).numpy())


def test_layer_equals_keras_conv3d_in_float32_with_bias_gradient(rng):
    layer = StridedConv3D(8, 9, strides=4, padding="same", name="conv")
    keras_layer = keras.layers.Conv3D(8, 9, strides=4, padding="same", name="conv")
    x = tf.constant(rng.normal(size=(3, 32, 32, 32, 2)).astype("float32"))
    layer.build(x.shape)
    keras_layer.build(x.shape)
    bias = rng.normal(size=8).astype("float32")
    keras_layer.set_weights([layer.get_weights()[0], bias])
    layer.set_weights([layer.get_weights()[0], bias])
    assert [(w.path, w.shape) for w in layer.weights] == [(w.path, w.shape) for w in keras_layer.weights]
    results = []
    for conv in (keras_layer, layer):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = conv(x)
            loss = tf.reduce_sum(tf.sin(y))
        results.append([y, *tape.gradient(loss, [x, *conv.trainable_weights])])
    for want, got in zip(*results):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize(("kernel_size", "strides", "padding"), [(5, 2, "same"), (7, 3, "valid"), (7, 2, "same")])
def test_dynamic_batch_and_spatial_sizes_inside_tf_function(kernel_size, strides, padding, rng):
    kernel = tf.constant(rng.normal(size=(kernel_size,) * 3 + (2, 3)).astype("float32"))
    tf_strides = [1, strides, strides, strides, 1]

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, None, 2])])
    def gradients(x):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            loss = tf.reduce_sum(strided_conv3d(x, kernel, strides, padding) ** 2)
        return tape.gradient(loss, [x, kernel])

    for shape in ((1, 9, 10, 11, 2), (3, 8, 8, 8, 2)):
        x = tf.constant(rng.normal(size=shape).astype("float32"))
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            loss = tf.reduce_sum(tf.nn.conv3d(x, kernel, tf_strides, padding.upper()) ** 2)
        for want, got in zip(tape.gradient(loss, [x, kernel]), gradients(x)):
            assert got.shape == want.shape
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_conv3d_transpose_with_filter_equal_to_stride_equals_tensorflows(rng):
    x = tf.constant(rng.normal(size=(2, 3, 4, 5, 3)))
    kernel = tf.constant(rng.normal(size=(2, 2, 2, 4, 3)))
    dy = tf.constant(rng.normal(size=(2, 6, 8, 10, 4)))
    expected = _conv_and_gradients(
        lambda a, b: tf.nn.conv3d_transpose(a, b, [2, 6, 8, 10, 4], [1, 2, 2, 2, 1], "VALID"), x, kernel, dy
    )
    actual = _conv_and_gradients(block_conv3d_transpose, x, kernel, dy)
    for want, got in zip(expected, actual):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-10 * float(np.abs(want).max()))
    layer = StridedConv3DTranspose(4, 2, strides=2, name="up")
    keras_layer = keras.layers.Conv3DTranspose(4, 2, strides=2, name="up")
    inputs = tf.constant(rng.normal(size=(2, 4, 4, 4, 3)).astype("float32"))
    layer.build(inputs.shape)
    keras_layer.build(inputs.shape)
    assert [(w.path, w.shape) for w in layer.weights] == [(w.path, w.shape) for w in keras_layer.weights]
    keras_layer.set_weights([layer.get_weights()[0], rng.normal(size=4).astype("float32")])
    layer.set_weights(keras_layer.get_weights())
    np.testing.assert_allclose(layer(inputs).numpy(), keras_layer(inputs).numpy(), rtol=1e-5, atol=1e-5)


def test_training_graphs_contain_no_strided_conv3d_kernels(rng):
    layer = StridedConv3D(8, 9, strides=4, padding="same")
    up = StridedConv3DTranspose(2, 2)
    x = tf.constant(rng.normal(size=(2, 32, 32, 32, 2)).astype("float32"))
    layer.build(x.shape)
    up.build((2, 8, 8, 8, 8))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(up(layer(x)) ** 2)
        return tape.gradient(loss, [x, *layer.trainable_weights, *up.trainable_weights])

    concrete = step.get_concrete_function(x)
    assert convolution_ops(concrete, "Conv3D") == set()  # forward and gradients are matrix products
    assert "MatMul" in {op.type for op in concrete.graph.get_operations()}

    # The whole tiny coarse model's training step as well.
    model = N.build_coarse_model(load_preset("tiny"))
    volume = tf.constant(rng.normal(size=(2, 32, 32, 32, 2)).astype("float32"))

    @tf.function
    def model_step(volume):
        with tf.GradientTape() as tape:
            outputs = model({"volume": volume}, training=True)
            loss = tf.add_n([tf.reduce_sum(v**2) for v in outputs.values()])
        return tape.gradient(loss, model.trainable_variables)

    ops = convolution_ops(model_step.get_concrete_function(volume), "Conv3D")
    assert ("Conv3D", 1) in ops  # the 1x1x1 voxelwise layers: stride 1
    assert not {(kind, stride) for kind, stride in ops if stride > 1}  # no strided conv3d, forward or gradient


def test_config_round_trip_and_argument_errors():
    layer = StridedConv3D(
        8, (9, 9, 7), strides=(4, 4, 3), padding="SAME", use_bias=False, kernel_initializer="he_normal", name="c"
    )
    config = layer.get_config()
    assert config["padding"] == "same" and config["kernel_size"] == [9, 9, 7] and config["strides"] == [4, 4, 3]
    clone = StridedConv3D.from_config(config)
    assert clone.get_config() == config
    clone.build((None, 32, 32, 32, 2))
    assert [w.name for w in clone.weights] == ["kernel"] and tuple(clone.kernel.shape) == (9, 9, 7, 2, 8)
    up = StridedConv3DTranspose(4, 2, name="u")
    assert StridedConv3DTranspose.from_config(up.get_config()).get_config() == up.get_config()
    assert keras.saving.get_registered_name(StridedConv3D) == "mdgru_keras>StridedConv3D"
    for make, message in [
        (lambda: StridedConv3D(8, 9, strides=0), "a positive int or 3 positive ints. Received: strides=0"),
        (lambda: StridedConv3D(8, (9, 9), strides=4), "Received: kernel_size=(9, 9)"),
        (lambda: StridedConv3D(0, 9), "filters must be a positive int. Received: filters=0"),
        (lambda: StridedConv3D(8, 9, padding="causal"), "'same' or 'valid'. Received: padding='causal'"),
        (lambda: StridedConv3DTranspose(8, 3, strides=2), "needs kernel_size == strides"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)) as error:
            make()
        assert "\n" not in str(error.value)


def test_output_shapes_match_keras_conv3d():
    sizes = [(32, 9, 4, "same"), (160, 11, 5, "same"), (13, 9, 4, "valid"), (7, 3, 2, "same")]
    for size, kernel, stride, padding in sizes:
        shape = (None, size, size + 1, size + 2, 2)
        ours = StridedConv3D(3, kernel, strides=stride, padding=padding).compute_output_shape(shape)
        theirs = keras.layers.Conv3D(3, kernel, strides=stride, padding=padding).compute_output_shape(shape)
        assert tuple(ours) == tuple(theirs)
    with pytest.raises(ValueError, match="smaller than the filter"):
        StridedConv3D(3, 9, strides=4, padding="valid").compute_output_shape((None, 13, 13, 5, 2))
    flops = strided_conv3d_flops((8, 160, 160, 160, 2), 11, 5, 8)
    assert flops["direct"] == 2.0 * 8 * 32**3 * 11**3 * 2 * 8
    assert flops["blocked"] == 2.0 * 8 * 32**3 * 125 * 2 * 27 * 8  # 32^3 blocks of 5^3 voxels, 3^3 per field


def _inner_model(conv: keras.layers.Layer) -> keras.Model:
    """1x1x1 conv -> strided conv (its input gradient is needed) -> dense: a model trained in the tests."""
    inputs = keras.Input((13, 14, 15, 2))
    x = keras.layers.Conv3D(3, 1, name="pointwise")(inputs)
    x = conv(x)
    outputs = keras.layers.Dense(1, name="dense")(keras.layers.Flatten()(x))
    return keras.Model(inputs, outputs)


def test_model_trains_like_one_with_keras_conv3d(rng):
    x = rng.normal(size=(4, 13, 14, 15, 2)).astype("float32")
    y = rng.normal(size=(4, 1)).astype("float32")
    ours = _inner_model(StridedConv3D(4, 5, strides=2, padding="same", name="strided"))
    theirs = _inner_model(keras.layers.Conv3D(4, 5, strides=2, padding="same", name="strided"))
    theirs.set_weights(ours.get_weights())
    before = [w.copy() for w in ours.get_weights()]
    for model in (ours, theirs):
        model.compile(keras.optimizers.SGD(0.01), "mse")
        history = model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0)  # 2 steps
        assert np.isfinite(history.history["loss"][0])
    for b, w_ours, w_theirs in zip(before, ours.get_weights(), theirs.get_weights()):
        assert not np.array_equal(b, w_ours)  # every weight moved, the 1x1x1 conv before too
        np.testing.assert_allclose(w_ours, w_theirs, rtol=1e-4, atol=1e-6)


def _with_keras_conv3d(model: keras.Model) -> keras.Model:
    """The same model with ``keras.layers.Conv3D`` in place of StridedConv3D: a model saved before it existed."""

    def clone(layer):
        if isinstance(layer, StridedConv3D):
            config = layer.get_config()
            arguments = ("filters", "kernel_size", "strides", "padding", "use_bias", "name")
            return keras.layers.Conv3D(**{key: config[key] for key in arguments})
        return layer

    old = keras.models.clone_model(model, clone_function=clone)
    old.set_weights(model.get_weights())
    return old


def test_coarse_model_saved_with_keras_conv3d_loads_with_the_same_outputs(tmp_path, rng):
    from mdgru_keras.training.trainer import model_variables

    config = load_preset("tiny")
    old = _with_keras_conv3d(N.build_coarse_model(config))
    assert type(old.get_layer("coarse_input_conv")) is keras.layers.Conv3D
    volume = {"volume": rng.normal(size=(2, 32, 32, 32, 2)).astype("float32")}
    expected = old(volume)

    # .keras file: networks.load_model converts the layer and keeps the weights
    old.save(tmp_path / "old.keras")
    loaded = N.load_model(str(tmp_path / "old.keras"))
    assert type(loaded.get_layer("coarse_input_conv")) is StridedConv3D
    for axis in "xyz":  # same weights; the forward's sums run in another order (float32 rounding)
        np.testing.assert_allclose(loaded(volume)[axis].numpy(), expected[axis].numpy(), rtol=1e-5, atol=1e-5)
    loaded.save(tmp_path / "new.keras")  # and it saves as a current model
    assert type(N.load_model(str(tmp_path / "new.keras")).get_layer("coarse_input_conv")) is StridedConv3D

    # training checkpoints (mdgru_keras/training/trainer.py: every variable by position) restore into the new model
    tf.train.Checkpoint(model=model_variables(old)).write(str(tmp_path / "ckpt" / "ckpt"))
    new = N.build_coarse_model(config)
    tf.train.Checkpoint(model=model_variables(new)).read(str(tmp_path / "ckpt" / "ckpt")).assert_consumed()
    for axis in "xyz":
        np.testing.assert_allclose(new(volume)[axis].numpy(), expected[axis].numpy(), rtol=1e-5, atol=1e-5)


def test_upgrade_replaces_only_plain_strided_layers(rng):
    inputs = keras.Input((8, 8, 8, 2))
    x = keras.layers.Conv3D(4, 3, strides=2, padding="same", name="strided")(inputs)
    x = keras.layers.Conv3D(4, 3, strides=2, padding="same", activation="relu", name="relu")(x)
    x = keras.layers.Conv3D(4, 1, name="pointwise")(x)
    x = keras.layers.Conv3DTranspose(3, 2, strides=2, name="up")(x)
    x = keras.layers.Conv3DTranspose(3, 3, strides=2, padding="same", name="overlapping")(x)
    model = keras.Model(inputs, x)
    upgraded = upgrade_strided_convolutions(model)
    kinds = {layer.name: type(layer) for layer in upgraded.layers[1:]}
    assert kinds == {
        "strided": StridedConv3D,
        "relu": keras.layers.Conv3D,
        "pointwise": keras.layers.Conv3D,
        "up": StridedConv3DTranspose,
        "overlapping": keras.layers.Conv3DTranspose,
    }
    volume = rng.normal(size=(2, 8, 8, 8, 2)).astype("float32")
    np.testing.assert_allclose(upgraded(volume).numpy(), model(volume).numpy(), rtol=1e-5, atol=1e-5)
    assert upgrade_strided_convolutions(upgraded) is upgraded


_MIRRORED = """
import numpy as np, keras, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from mdgru_keras.layers import StridedConv3D
rng = np.random.default_rng(0)
x = rng.normal(size=(4, 16, 16, 16, 2)).astype("float32")
kernel = rng.normal(size=(9, 9, 9, 2, 3)).astype("float32") * 0.1

def gradients(strategy):
    with strategy.scope():
        layer = StridedConv3D(3, 9, strides=4, padding="same")
        layer.build(x.shape)
        layer.kernel.assign(kernel)
    @tf.function
    def step(batch):
        def replica(batch):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.sin(layer(batch)))
            return tape.gradient(loss, layer.trainable_variables)
        per_replica = strategy.run(replica, args=(batch,))
        return [strategy.reduce("SUM", g, axis=None) for g in per_replica]
    dataset = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(x).batch(4))
    return [g.numpy() for g in step(next(iter(dataset)))]

mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert mirrored.num_replicas_in_sync == 2
for a, b in zip(gradients(mirrored), gradients(tf.distribute.get_strategy())):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
print("OK")
"""


@pytest.mark.slow
def test_gradients_under_mirrored_strategy_match_one_device():
    result = subprocess.run(
        [sys.executable, "-c", _MIRRORED], env=cli_env(), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_saved_model_export_serves_the_forward(tmp_path, rng):
    layer = StridedConv3D(3, 9, strides=4, padding="same")
    layer.build((None, 16, 16, 16, 2))
    module = tf.Module()
    module.layer = layer
    module.serve = tf.function(layer.call, input_signature=[tf.TensorSpec([None, 16, 16, 16, 2], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "export"))
    loaded = tf.saved_model.load(str(tmp_path / "export"))
    x = tf.constant(rng.normal(size=(2, 16, 16, 16, 2)).astype("float32"))
    np.testing.assert_allclose(loaded.serve(x).numpy(), layer(x).numpy(), rtol=1e-6, atol=1e-6)
