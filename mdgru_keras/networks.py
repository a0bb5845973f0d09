"""The localization network of Andermatt et al. (2017), its coarse and fine models, and K-landmark heads.

One localization network serves both stages::

    input [B, N, N, N, C]
      -> 3 x ( MDGRU(units_i, stride 2, DropConnect) -> 1x1x1 conv (fc_channels_i) -> tanh )   # N -> N/8
      -> flatten [B, (N/8)^3 * fc_channels_last]
      -> LandmarkHeads: shared Dense(H) -> leaky ReLU(0.01) -> per-landmark Dense(Cx + Cy + Cz) -> split x/y/z

with ``H = (Cx + Cy + Cz) * head_hidden_factor``. ``C = n * window / factor`` coordinate classes per axis
(:func:`~mdgru_keras.geometry.coordinate_classes.num_classes`). Every axis is its own classifier (softmax over its
logits).

Several landmarks share the trunk *and* the first dense layer: the paper's first dense layer alone is
``(8^3 * 192) x 3072`` (302 M weights, 1.2 GB float32), so K copies of it are out of the question. Each
landmark owns only its output layer ``H x (Cx + Cy + Cz)``. With K = 1 this is exactly the paper's network.

Models (the contract in ``docs/ARCHITECTURE.md``):

* coarse: ``{"volume": [B, P, P, P, 2]}`` -> strided conv (stride s, filter 2s + 1) -> network ->
  ``{"x": [B, K, Cx], "y": [B, K, Cy], "z": [B, K, Cz]}`` logits (``factor = s``, window ``P``).
* fine: ``{"window": [B, W, W, W, 2]}`` -> network -> ``{"x": [B, K, Cx], "y": ..., "z": ...}`` logits of every
  landmark (``factor = 1``, window ``W``); training masks the landmarks outside each window
  (:func:`masked_localization_loss`), inference reads the landmarks each window was placed for.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from mdgru_keras.config import Config, NetworkConfig
from mdgru_keras.geometry.coordinate_classes import num_classes
from mdgru_keras.layers import CGRU, MDGRU, StridedConv3D, upgrade_strided_convolutions

AXES = ("x", "y", "z")
INPUT_CHANNELS = 2  # volume and its high-pass (mdgru_keras.preprocessing)


def head_initializer() -> keras.initializers.Initializer:
    """Uniform in ``[-sqrt(3 / N_in), +sqrt(3 / N_in)]``, ``N_in`` the layer's number of inputs (the paper's)."""
    return keras.initializers.VarianceScaling(scale=1.0, mode="fan_in", distribution="uniform")


# ---------------------------------------------------------------------------------------------------------
# layers


@keras.saving.register_keras_serializable(package="mdgru_keras")
class LandmarkHeads(keras.layers.Layer):
    """Per-landmark coordinate classifiers on a shared hidden layer.

    ``hidden = leaky_relu(features @ W_shared + b_shared, 0.01)``, then landmark ``k`` gets
    ``logits_k = hidden @ W_k + b_k`` (``W_k``: ``[H, Cx + Cy + Cz]``), split into the three axes.

    Two modes:

    * all landmarks (``call(features)``): features ``[B, F]`` -> ``{"x": [B, K, Cx], "y": ..., "z": ...}``.
    * one landmark per sample (``call(features, landmark_index)``): ``landmark_index`` int ``[B]`` ->
      ``{"x": [B, Cx], ...}``. Only the selected output layers are read (a gather), so a batch of all K
      landmarks costs one matrix-vector product per sample, not K.

    Args:
        num_landmarks: K.
        classes: ``(Cx, Cy, Cz)``.
        hidden_units: H; the paper uses ``(Cx + Cy + Cz) * 4``.
        negative_slope: of the leaky ReLU.
    """

    def __init__(
        self,
        num_landmarks: int,
        classes: tuple[int, int, int],
        hidden_units: int,
        negative_slope: float = 0.01,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.num_landmarks = int(num_landmarks)
        self.classes = tuple(int(c) for c in classes)
        self.hidden_units = int(hidden_units)
        self.negative_slope = float(negative_slope)

    def build(self, features_shape: tuple, landmark_index_shape: tuple | None = None) -> None:
        features = int(features_shape[-1])
        total = sum(self.classes)
        self.hidden_kernel = self.add_weight(
            name="hidden_kernel", shape=(features, self.hidden_units), initializer=head_initializer()
        )
        self.hidden_bias = self.add_weight(name="hidden_bias", shape=(self.hidden_units,), initializer="zeros")
        self.output_kernel = self.add_weight(
            name="output_kernel",
            shape=(self.num_landmarks, self.hidden_units, total),
            initializer=_PerLandmarkFanIn(),
        )
        self.output_bias = self.add_weight(
            name="output_bias", shape=(self.num_landmarks, total), initializer="zeros"
        )

    def compute_output_shape(self, features_shape: tuple, landmark_index_shape: tuple | None = None) -> dict:
        batch = features_shape[0]
        if landmark_index_shape is None:
            return {axis: (batch, self.num_landmarks, c) for axis, c in zip(AXES, self.classes)}
        return {axis: (batch, c) for axis, c in zip(AXES, self.classes)}

    def call(self, features: tf.Tensor, landmark_index: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
        hidden = tf.matmul(features, self.hidden_kernel) + self.hidden_bias
        hidden = tf.nn.leaky_relu(hidden, alpha=self.negative_slope)  # [B, H]
        if landmark_index is None:
            logits = tf.einsum("bh,khc->bkc", hidden, self.output_kernel) + self.output_bias  # [B, K, C]
        else:
            index = tf.cast(tf.reshape(landmark_index, [-1]), tf.int32)
            kernel = tf.gather(self.output_kernel, index)  # [B, H, C]
            logits = tf.linalg.matvec(kernel, hidden, transpose_a=True) + tf.gather(self.output_bias, index)
        parts = tf.split(logits, list(self.classes), axis=-1)
        return dict(zip(AXES, parts))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            num_landmarks=self.num_landmarks,
            classes=list(self.classes),
            hidden_units=self.hidden_units,
            negative_slope=self.negative_slope,
        )
        return config


@keras.saving.register_keras_serializable(package="mdgru_keras")
class _PerLandmarkFanIn(keras.initializers.Initializer):
    """The head initializer for a stack of K kernels ``[K, N_in, N_out]``: each uniform in ±sqrt(3 / N_in)."""

    def __call__(self, shape, dtype=None):
        limit = math.sqrt(3.0 / shape[-2])
        return keras.random.uniform(shape, -limit, limit, dtype=dtype)

    def get_config(self) -> dict:
        return {}


@keras.saving.register_keras_serializable(package="mdgru_keras")
class MarginalLandmarkHeads(keras.layers.Layer):
    """Per-landmark coordinate classifiers read off a feature map by marginalization (translation-equivariant).

    ``features [B, G, G, G, F]`` is a grid of G cells per axis, each ``cell_classes`` (S) coordinate classes
    wide (``C = G * S`` classes per axis). Landmark ``k`` and axis ``a`` get a score map
    ``s[b, i, j, l, :] = features[b, i, j, l] @ W[k, a] + bias[k, a]`` (``[S]`` per cell: where in the cell), and
    the axis' logits are the log-sum-exp of the scores over the two other axes::

        logits_x[b, k, i * S + t] = logsumexp_{j, l} s_x[b, i, j, l, t]

    so the softmax over ``logits_x`` is the marginal along x of a softmax over all ``G^3 * S`` positions. The
    same weights score every cell: a structure learnt at one place of the window is found at every other,
    which the dense heads (flatten, then a dense layer per position) must learn position by position.

    Two modes, as :class:`LandmarkHeads`: ``call(features)`` -> ``{"x": [B, K, C], ...}``;
    ``call(features, landmark_index [B])`` -> ``{"x": [B, C], ...}`` (only the selected landmarks are scored).

    Args:
        num_landmarks: K.
        cell_classes: S, coordinate classes per grid cell and axis.
    """

    def __init__(self, num_landmarks: int, cell_classes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_landmarks = int(num_landmarks)
        self.cell_classes = int(cell_classes)

    def build(self, features_shape: tuple, landmark_index_shape: tuple | None = None) -> None:
        features = int(features_shape[-1])
        # [K, axis, F, S]: _PerLandmarkFanIn scales each [F, S] kernel by its fan-in F
        self.kernel = self.add_weight(
            name="kernel", shape=(self.num_landmarks, 3, features, self.cell_classes), initializer=_PerLandmarkFanIn()
        )
        self.bias = self.add_weight(name="bias", shape=(self.num_landmarks, 3, self.cell_classes), initializer="zeros")

    def compute_output_shape(self, features_shape: tuple, landmark_index_shape: tuple | None = None) -> dict:
        batch, grid = features_shape[0], features_shape[1]
        classes = None if grid is None else grid * self.cell_classes
        if landmark_index_shape is None:
            return {axis: (batch, self.num_landmarks, classes) for axis in AXES}
        return {axis: (batch, classes) for axis in AXES}

    def call(self, features: tf.Tensor, landmark_index: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
        if landmark_index is None:
            scores = tf.einsum("bijlf,kafs->bkaijls", features, self.kernel)  # [B, K, 3, G, G, G, S]
            scores += self.bias[None, :, :, None, None, None, :]
        else:
            index = tf.cast(tf.reshape(landmark_index, [-1]), tf.int32)
            scores = tf.einsum("bijlf,bafs->baijls", features, tf.gather(self.kernel, index))  # [B, 3, G, G, G, S]
            scores += tf.gather(self.bias, index)[:, :, None, None, None, :]
        per_axis = tf.unstack(scores, 3, axis=-5)  # each [B, (K,) G, G, G, S]
        marginals = [
            tf.reduce_logsumexp(per_axis[0], axis=[-3, -2]),
            tf.reduce_logsumexp(per_axis[1], axis=[-4, -2]),
            tf.reduce_logsumexp(per_axis[2], axis=[-4, -3]),
        ]  # each [B, (K,) G, S]: cell-major, so class = cell * S + t
        shape = tf.shape(marginals[0])
        flat = tf.concat([shape[:-2], [shape[-2] * shape[-1]]], axis=0)
        return {axis: tf.reshape(m, flat) for axis, m in zip(AXES, marginals)}

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(num_landmarks=self.num_landmarks, cell_classes=self.cell_classes)
        return config


# ---------------------------------------------------------------------------------------------------------
# sizes


def stage_classes(config: Config, stage: str) -> tuple[int, int, int]:
    """``(Cx, Cy, Cz)`` of a stage: ``n * window / factor`` per axis (cubic windows)."""
    if stage == "coarse":
        size, factor = config.coarse.padded_size, config.coarse.input_stride
    elif stage == "fine":
        size, factor = config.fine.window_size, 1
    else:
        raise ValueError(f"stage must be 'coarse' or 'fine', got {stage!r}")
    return (num_classes(size, config.superresolution, factor),) * 3


def network_input_size(config: Config, stage: str) -> int:
    """Voxels per axis that enter the localization network of a stage (after the coarse input conv)."""
    if stage == "coarse":
        return config.coarse.padded_size // config.coarse.input_stride
    return config.fine.window_size


def count_parameters(config: Config, stage: str) -> dict[str, int]:
    """Trainable parameters of a stage's model, computed analytically (without building it).

    Returns ``{"input_conv", "trunk", "head_hidden", "head_output", "total"}``; tests check it against Keras.
    """
    net = config.coarse.network if stage == "coarse" else config.fine.network
    counts = {"input_conv": 0}
    channels = INPUT_CHANNELS
    if stage == "coarse":
        s = config.coarse.input_stride
        counts["input_conv"] = (2 * s + 1) ** 3 * channels * config.coarse.input_channels + config.coarse.input_channels
        channels = config.coarse.input_channels
    trunk = 0
    for units, fc in zip(net.mdgru_units, net.fc_channels):
        per_cgru = net.input_filter**2 * channels * 3 * units + net.state_filter**2 * units * 3 * units + 3 * units
        trunk += 6 * per_cgru + units * fc + fc
        channels = fc
    counts["trunk"] = trunk
    if net.head == "marginal":  # head_hidden: the voxelwise mix of all levels; head_output: score kernels
        mix = net.fc_channels[-1]
        cell_classes = config.superresolution * net.mdgru_stride
        counts["head_hidden"] = sum(net.fc_channels) * mix + mix
        counts["head_output"] = config.num_landmarks * 3 * (mix * cell_classes + cell_classes)
        counts["total"] = sum(counts.values())
        return counts
    size = network_input_size(config, stage) // net.mdgru_stride ** len(net.mdgru_units)
    features = size**3 * channels
    total_classes = sum(stage_classes(config, stage))
    hidden = head_hidden_units(net, total_classes)
    counts["head_hidden"] = features * hidden + hidden
    counts["head_output"] = config.num_landmarks * (hidden * total_classes + total_classes)
    counts["total"] = sum(counts.values())
    return counts


# ---------------------------------------------------------------------------------------------------------
# builders


def head_hidden_units(net: NetworkConfig, total_classes: int) -> int:
    """H, the shared hidden layer's width: ``net.head_hidden_units`` if set, else ``(Cx + Cy + Cz) * factor``."""
    return net.head_hidden_units or total_classes * net.head_hidden_factor


def localization_trunk(x: keras.KerasTensor, net: NetworkConfig, name: str) -> keras.KerasTensor:
    """The [strided MD-GRU -> voxelwise dense -> tanh] compositions, then flatten: ``[B, F]``."""
    return keras.layers.Flatten(name=f"{name}_flatten")(trunk_levels(x, net, name)[-1])


def trunk_levels(x: keras.KerasTensor, net: NetworkConfig, name: str) -> list[keras.KerasTensor]:
    """The output of every [strided MD-GRU -> voxelwise dense -> tanh] composition, finest first:
    ``[B, N / s, ..., fc_0]``, ``[B, N / s^2, ..., fc_1]``, ..."""
    levels = []
    for i, (units, fc) in enumerate(zip(net.mdgru_units, net.fc_channels)):
        x = MDGRU(
            units,
            strides=net.mdgru_stride,
            input_filter=net.input_filter,
            state_filter=net.state_filter,
            dropconnect=net.dropconnect,
            combine=net.combine,
            name=f"{name}_mdgru{i}",
        )(x)
        x = keras.layers.Conv3D(
            fc,
            1,
            activation="tanh",
            kernel_initializer="glorot_uniform",
            bias_initializer="zeros",
            name=f"{name}_voxelwise{i}",
        )(x)
        levels.append(x)
    return levels


def marginal_trunk(x: keras.KerasTensor, net: NetworkConfig, name: str) -> keras.KerasTensor:
    """Every level brought to the first level's grid (nearest upsampling), concatenated and mixed by a
    voxelwise dense layer with tanh: ``[B, N / s, N / s, N / s, fc_last]``, the input of
    :class:`MarginalLandmarkHeads` (fine cells from the first level, context from the deeper ones)."""
    levels = trunk_levels(x, net, name)
    grid = levels[0].shape[1]
    upsampled = [levels[0]] + [
        keras.layers.UpSampling3D(grid // level.shape[1], name=f"{name}_upsample{i + 1}")(level)
        for i, level in enumerate(levels[1:])
    ]
    joined = keras.layers.Concatenate(name=f"{name}_levels")(upsampled) if len(upsampled) > 1 else upsampled[0]
    return keras.layers.Conv3D(
        net.fc_channels[-1], 1, activation="tanh", kernel_initializer="glorot_uniform", name=f"{name}_mix"
    )(joined)


def marginal_features_mixed_by_level(
    trunk: keras.Model, stage: str = "fine"
) -> Callable[[tf.Tensor], tf.Tensor] | None:
    """Inference form of a marginal trunk (:func:`marginal_trunk`): the same features, with the voxelwise mix
    applied to each level before upsampling; ``None`` for a trunk without a level mix (dense heads).

    A 1x1x1 convolution of concatenated channels is the sum of one convolution per level, and it commutes with
    nearest upsampling, so ``tanh(sum_i up(W_i level_i) + b)`` equals ``tanh(W concat_i(up(level_i)) + b)`` up
    to float rounding. The deeper levels are mixed on their own grids (8^3 and 4^3 rather than 16^3 in the fine
    trunk), which spares most of the mix's arithmetic and the upsampled copies of their channels. Training keeps
    the concatenation (one layer, the checkpoints' layout). The function uses the trunk's layers and weights:
    ``window [B, W, W, W, C] -> features [B, G, G, G, F]``, always in inference mode.
    """
    names = {layer.name for layer in trunk.layers}
    if f"{stage}_mix" not in names:
        return None
    mix = trunk.get_layer(f"{stage}_mix")
    count = 0
    while f"{stage}_voxelwise{count}" in names:
        count += 1
    levels_model = keras.Model(
        trunk.input, [trunk.get_layer(f"{stage}_voxelwise{index}").output for index in range(count)],
        name=f"{stage}_trunk_levels",
    )

    def features(windows: tf.Tensor) -> tf.Tensor:
        levels = levels_model(windows, training=False)
        grid = levels[0].shape[1]
        kernel = tf.convert_to_tensor(mix.kernel)[0, 0, 0]  # [sum of the levels' channels, F]
        total, start = None, 0
        for level in levels:
            channels, factor = level.shape[-1], grid // level.shape[1]
            part = tf.tensordot(level, kernel[start : start + channels], axes=1)  # [B, g, g, g, F]
            start += channels
            if factor > 1:  # nearest upsampling: every cell copied to factor^3 cells
                part = tf.repeat(tf.repeat(tf.repeat(part, factor, axis=1), factor, axis=2), factor, axis=3)
            total = part if total is None else total + part
        if mix.use_bias:
            total = total + mix.bias
        return mix.activation(total)  # tanh (marginal_trunk)

    return features


def landmark_heads(x: keras.KerasTensor, config: Config, stage: str, net: NetworkConfig) -> dict:
    """The trunk and heads of ``net.head`` on the stage's network input ``x``: logits ``{"x": [B, K, C], ...}``.

    ``dense`` (the paper): flatten, then :class:`LandmarkHeads`; ``marginal``: :func:`marginal_trunk`, then
    :class:`MarginalLandmarkHeads` with ``S = superresolution * mdgru_stride`` classes per first-level cell.
    """
    classes = stage_classes(config, stage)
    if net.head == "marginal":
        features = marginal_trunk(x, net, stage)
        return MarginalLandmarkHeads(
            config.num_landmarks, config.superresolution * net.mdgru_stride, name=f"{stage}_heads"
        )(features)
    features = localization_trunk(x, net, stage)
    return LandmarkHeads(
        config.num_landmarks, classes, head_hidden_units(net, sum(classes)), name=f"{stage}_heads"
    )(features)


def build_coarse_model(config: Config) -> keras.Model:
    """Coarse model: ``{"volume": [B, P, P, P, 2]}`` -> ``{"x": [B, K, Cx], "y": ..., "z": ...}`` logits."""
    size, stride = config.coarse.padded_size, config.coarse.input_stride
    net = config.coarse.network
    volume = keras.Input(shape=(size, size, size, INPUT_CHANNELS), name="volume")
    # The paper reduces the padded scan with one strided convolution of filter 2s + 1 (linear). StridedConv3D:
    # Conv3D's output and weights, forward and exact gradients by matrix products (strided conv3d is slow on AVX2).
    x = StridedConv3D(
        config.coarse.input_channels,
        2 * stride + 1,
        strides=stride,
        padding="same",
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        name="coarse_input_conv",
    )(volume)
    heads = landmark_heads(x, config, "coarse", net)
    outputs = {axis: keras.layers.Identity(name=axis)(heads[axis]) for axis in AXES}
    return keras.Model(inputs={"volume": volume}, outputs=outputs, name="coarse")


def build_fine_model(config: Config) -> keras.Model:
    """Fine model: ``{"window": [B, W, W, W, 2]}`` -> ``{"x": [B, K, Cx], "y": ..., "z": ...}`` logits.

    Every landmark's classifier sees every window: training masks the landmarks that lie outside a window
    (:func:`masked_localization_loss`), so one window teaches all the landmarks inside it, and at inference
    landmarks close together can share one window (the trunk runs once per window).
    """
    size = config.fine.window_size
    net = config.fine.network
    window = keras.Input(shape=(size, size, size, INPUT_CHANNELS), name="window")
    heads = landmark_heads(window, config, "fine", net)
    outputs = {axis: keras.layers.Identity(name=axis)(heads[axis]) for axis in AXES}
    return keras.Model(inputs={"window": window}, outputs=outputs, name="fine")


def split_fine_model(model: keras.Model) -> tuple[keras.Model, keras.layers.Layer]:
    """The fine model's trunk ``window [B, W, W, W, 2] -> features [B, F]`` (``[B, G, G, G, F]`` for marginal
    heads) and its heads (:class:`LandmarkHeads` or :class:`MarginalLandmarkHeads`).

    Both share the model's weights. Calling ``heads(trunk(window), landmark_index)`` is the fine model; split,
    one window's features can serve several landmarks (``TwoStageLocalizer``'s shared windows).
    """
    heads = model.get_layer("fine_heads")
    trunk = keras.Model(model.input["window"], heads.input, name="fine_trunk")
    return trunk, heads


def build_model(config: Config, stage: str) -> keras.Model:
    """:func:`build_coarse_model` or :func:`build_fine_model` by name."""
    if stage == "coarse":
        return build_coarse_model(config)
    if stage == "fine":
        return build_fine_model(config)
    raise ValueError(f"stage must be 'coarse' or 'fine', got {stage!r}")


def custom_objects() -> dict[str, type]:
    """The classes needed to load a saved model (``keras.saving.load_model(path, custom_objects=...)``)."""
    return {
        "MDGRU": MDGRU,
        "CGRU": CGRU,
        "LandmarkHeads": LandmarkHeads,
        "MarginalLandmarkHeads": MarginalLandmarkHeads,
        "StridedConv3D": StridedConv3D,
        "AxisCrossEntropy": AxisCrossEntropy,
    }


def load_model(path: str) -> keras.Model:
    """Load a coarse or fine model saved with ``model.save(path)`` (``.keras``).

    A coarse model saved with a ``keras.layers.Conv3D`` input convolution (before :class:`StridedConv3D`) is
    converted to the current layer with the same weights (:func:`upgrade_strided_convolutions`).
    """
    model = keras.saving.load_model(path, custom_objects=custom_objects(), compile=False)
    return upgrade_strided_convolutions(model)


# ---------------------------------------------------------------------------------------------------------
# loss and training


@keras.saving.register_keras_serializable(package="mdgru_keras")
class AxisCrossEntropy(keras.losses.Loss):
    """Cross-entropy of one axis' logits, summed over landmarks.

    ``y_true`` int class indices ``[B]`` or ``[B, K]``, ``y_pred`` logits ``[B, C]`` or ``[B, K, C]``; the
    per-sample loss is the sum over landmarks, and Keras averages it over the batch. With one such loss per
    axis (``compile_for_training``) the total is the paper's loss: the sum of the three cross-entropies,
    summed over landmarks (mean over the batch).

    ``label_sigma_classes > 0`` replaces the one-hot target by a Gaussian over the class axis centred on the
    true class (standard deviation in classes, truncated to the ``C`` classes and renormalized), and the loss
    becomes the Kullback-Leibler divergence from that target: still 0 for a perfect prediction, and equal to
    the paper's cross-entropy when the standard deviation is 0. Why: with one-hot targets and ``C`` = 128
    classes per axis each class is the target of only 1/128 of the samples and a near miss costs as much as a
    far one, so a few hundred CPU steps learn nothing; neighbouring classes sharing the target lets every
    sample teach the whole neighbourhood (the label smoothing of coordinate-classification methods such as
    SimCC), and the softmax stays a smooth peak for the parabola fit.
    """

    def __init__(self, label_sigma_classes: float = 0.0, name: str = "axis_cross_entropy", **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        self.label_sigma_classes = float(label_sigma_classes)

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        labels = tf.cast(tf.reshape(y_true, tf.shape(y_pred)[:-1]), tf.int32)
        if self.label_sigma_classes > 0:
            per_landmark = soft_label_divergence(labels, y_pred, self.label_sigma_classes)
        else:
            per_landmark = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=y_pred)
        if len(y_pred.shape) == 3:
            return tf.reduce_sum(per_landmark, axis=-1)
        return per_landmark

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(label_sigma_classes=self.label_sigma_classes)
        return config


def gaussian_class_targets(labels: tf.Tensor, num_classes: int, sigma_classes: float) -> tf.Tensor:
    """``[..., C]`` target distributions: a Gaussian of ``sigma_classes`` over the class index, centred on the
    int class ``labels [...]``, truncated to ``0 .. C - 1`` and normalized to sum 1."""
    classes = tf.range(num_classes, dtype=tf.float32)
    distance = classes - tf.cast(labels, tf.float32)[..., None]
    return tf.nn.softmax(-0.5 * tf.square(distance / float(sigma_classes)), axis=-1)


def soft_label_divergence(labels: tf.Tensor, logits: tf.Tensor, sigma_classes: float) -> tf.Tensor:
    """``KL(target || softmax(logits))`` per row ``[...]`` for the Gaussian targets of
    :func:`gaussian_class_targets` (int ``labels [...]``, ``logits [..., C]``)."""
    logits = tf.convert_to_tensor(logits, tf.float32)
    target = gaussian_class_targets(labels, logits.shape[-1] or tf.shape(logits)[-1], sigma_classes)
    cross_entropy = tf.nn.softmax_cross_entropy_with_logits(labels=target, logits=logits)
    entropy = -tf.reduce_sum(target * tf.math.log(tf.maximum(target, 1e-30)), axis=-1)
    return cross_entropy - entropy


def label_sigma_classes(config: Config) -> float:
    """``config.training.label_sigma_grid_voxel`` in coordinate classes: ``superresolution`` classes per voxel of
    the stage's grid (fine: volume voxels; coarse: voxels after the stride-s input convolution), so that both
    stages get targets of the same width relative to their resolution."""
    return config.training.label_sigma_grid_voxel * config.superresolution


def localization_loss(
    labels: dict[str, tf.Tensor], logits: dict[str, tf.Tensor], label_sigma_classes: float = 0.0
) -> tf.Tensor:
    """The paper's loss for custom loops: sum over axes and landmarks of the cross-entropies, batch mean.

    ``labels[axis]``: int ``[B]`` or ``[B, K]``; ``logits[axis]``: ``[B, C]`` or ``[B, K, C]``. With
    ``label_sigma_classes > 0`` the Gaussian soft-label divergence of :class:`AxisCrossEntropy`.
    """
    loss = AxisCrossEntropy(label_sigma_classes)
    return tf.add_n([loss(labels[axis], logits[axis]) for axis in AXES])


def masked_localization_loss(
    labels: dict[str, tf.Tensor], logits: dict[str, tf.Tensor], mask: tf.Tensor, label_sigma_classes: float = 0.0
) -> tf.Tensor:
    """Per-sample loss ``[B]`` over the landmarks present in each window.

    ``labels[axis]``: int ``[B, K]``; ``logits[axis]``: ``[B, K, C]``; ``mask``: ``[B, K]``, 1 where landmark
    ``k`` lies inside sample ``b``'s window (its label is meaningful), 0 elsewhere. The loss is
    ``sum_k mask[b, k] * sum_axis loss(labels[axis][b, k], logits[axis][b, k])`` with the per-landmark loss of
    :class:`AxisCrossEntropy` (one-hot cross-entropy, or the Gaussian soft-label divergence): a window with
    several landmarks teaches each of them, and an absent landmark contributes nothing, gradient included.
    """
    mask = tf.cast(mask, tf.float32)
    total = tf.zeros_like(mask)
    for axis in AXES:
        target = tf.cast(labels[axis], tf.int32)
        prediction = tf.cast(logits[axis], tf.float32)
        if label_sigma_classes > 0:
            total += soft_label_divergence(target, prediction, label_sigma_classes)
        else:
            total += tf.nn.sparse_softmax_cross_entropy_with_logits(labels=target, logits=prediction)
    # where() rather than a product: a label far outside the window must not turn 0 * inf into NaN
    return tf.reduce_sum(tf.where(mask > 0, total * mask, 0.0), axis=-1)


def make_optimizer(config: Config) -> keras.optimizers.Optimizer:
    """The optimizer of ``config.training`` (the paper: AdaDelta, learning rate 0.001)."""
    name, rate = config.training.optimizer, config.training.learning_rate
    if name == "adadelta":
        return keras.optimizers.Adadelta(learning_rate=rate)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=rate)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=rate, momentum=0.9)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=rate)
    raise ValueError(f"unknown optimizer {name!r}")


def compile_for_training(model: keras.Model, config: Config, jit_compile: bool | str = False) -> keras.Model:
    """Compile a coarse or fine model with the loss and optimizer of ``config.training``.

    Labels are ``{"x", "y", "z"}`` int class indices (``[B, K]`` coarse, ``[B]`` fine), as produced by
    ``mdgru_keras.data.pipeline.make_dataset``.
    """
    model.compile(
        optimizer=make_optimizer(config),
        loss={
            axis: AxisCrossEntropy(label_sigma_classes(config), name=f"{axis}_cross_entropy")
            for axis in AXES
        },
        jit_compile=jit_compile,
    )
    return model


def parameter_bytes(count: int, dtype: str = "float32") -> int:
    """Bytes of ``count`` parameters of ``dtype``."""
    return int(count) * np.dtype(dtype).itemsize
