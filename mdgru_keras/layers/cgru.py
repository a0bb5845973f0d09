"""Convolutional GRU along one axis of a d-D input, with spatial subsampling and DropConnect.

The layer is three steps that :class:`~mdgru_keras.layers.MDGRU` reuses:

- :func:`input_gates`: the input convolutions of all time steps at once (time folded into the batch),
- :func:`~mdgru_keras.layers.recursion.gru_recursion`: the sequential state recursion (a ``tf.while_loop``
  with a hand-written backpropagation through time),
- :func:`average_pool_time`: the subsampling of the outputs along time.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from mdgru_keras.layers.recursion import gru_recursion
from mdgru_keras.layers.strided_conv import space_to_depth_convolution


@keras.saving.register_keras_serializable(package="mdgru_keras")
class CGRU(keras.layers.Layer):
    """A convolutional GRU that runs along one spatial axis ("time") of a d-D input.

    For every time step ``t`` the slice ``x_t`` (a (d-1)-D image) is convolved (``⋆``) with stride ``S`` on
    each of its axes; the state ``h`` lives on that subsampled grid and is convolved (``*``) with stride 1::

        r   = sigmoid(x_t ⋆ w_r + h_{t-1} * u_r + b_r)
        z   = sigmoid(x_t ⋆ w_z + h_{t-1} * u_z + b_z)
        h~  = tanh(x_t ⋆ w_h + r ⊙ (h_{t-1} * u_h) + b_h)
        h_t = z ⊙ h_{t-1} + (1 - z) ⊙ h~            with h_0 = 0

    The outputs ``h_t`` are average-pooled along time by ``S``.

    Input shape: ``[batch, n_1, ..., n_d, channels]`` (d = 2 or 3).
    Output shape: ``[batch, ceil(n_1 / S), ..., ceil(n_d / S), units]``.

    Padding (TensorFlow's ``'SAME'``, zeros): on a slice axis of size ``n`` the strided input convolution
    with filter size ``k`` pads ``p = max((ceil(n/S) - 1) S + k - n, 0)`` zeros in total, ``p // 2`` before
    and the rest after, so output voxel ``j`` sees input voxels ``j S - p // 2 ... j S - p // 2 + k - 1``
    (for S = 1 and odd k: centred on ``j``; for S = 2, k = 3: centred on ``2j + 1`` when n is even, on
    ``2j`` when n is odd). The state convolutions (stride 1) pad ``(k-1)//2`` before and ``k//2`` after.
    Along time the outputs ``h_t`` are averaged in groups ``[j S, (j+1) S)``; when ``S`` does not divide
    ``n`` the last group averages only the steps that exist.

    Weights: ``input_kernel`` ``[k_in]*(d-1) + [channels, 3 units]`` and ``state_kernel``
    ``[k_state]*(d-1) + [units, 3 units]``, gates ordered (r, z, h~) along the last axis; ``bias [3 units]``.

    Args:
        units: state channels.
        axis: the spatial axis to run along, 1..d (1 is the first spatial axis).
        reverse: run from the last slice to the first.
        strides: subsampling factor S on every spatial axis.
        input_filter: filter size of the input convolutions ``w`` (each slice axis).
        state_filter: filter size of the state convolutions ``u``.
        dropconnect: fraction of input-filter weights (``w_r, w_z, w_h``) dropped during training, with a
            fresh mask at every call; kept weights are scaled by ``1 / (1 - dropconnect)`` so that inference
            (deterministic) uses the weights as they are.
        kernel_initializer, recurrent_initializer, bias_initializer: for ``w``, ``u`` and ``b``.
        seed: seed of the DropConnect masks (``None``: random).
    """

    def __init__(
        self,
        units: int,
        axis: int = 1,
        reverse: bool = False,
        strides: int = 1,
        input_filter: int = 3,
        state_filter: int = 3,
        dropconnect: float = 0.5,
        kernel_initializer: str | keras.initializers.Initializer = "glorot_uniform",
        recurrent_initializer: str | keras.initializers.Initializer = "glorot_uniform",
        bias_initializer: str | keras.initializers.Initializer = "zeros",
        seed: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_gru_arguments(units, strides, input_filter, state_filter, dropconnect)
        self.units = int(units)
        self.axis = int(axis)
        self.reverse = bool(reverse)
        self.strides = int(strides)
        self.input_filter = int(input_filter)
        self.state_filter = int(state_filter)
        self.dropconnect = float(dropconnect)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.recurrent_initializer = keras.initializers.get(recurrent_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape: tuple) -> None:
        spatial_rank = len(input_shape) - 2
        if spatial_rank not in (2, 3):
            raise ValueError(f"CGRU expects a 2D or 3D input with channels, got shape {tuple(input_shape)}")
        if not 1 <= self.axis <= spatial_rank:
            raise ValueError(f"axis must be in 1..{spatial_rank}, got {self.axis}")
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(f"CGRU needs a known number of channels, got shape {tuple(input_shape)}")
        slice_rank = spatial_rank - 1
        self.input_kernel = self.add_weight(
            name="input_kernel",
            shape=(self.input_filter,) * slice_rank + (channels, 3 * self.units),
            initializer=self.kernel_initializer,
        )
        self.state_kernel = self.add_weight(
            name="state_kernel",
            shape=(self.state_filter,) * slice_rank + (self.units, 3 * self.units),
            initializer=self.recurrent_initializer,
        )
        self.bias = self.add_weight(name="bias", shape=(3 * self.units,), initializer=self.bias_initializer)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return subsampled_shape(input_shape, self.strides, self.units)

    def dropconnect_kernel(self, training: bool | None) -> tf.Tensor:
        """The input kernel as used by this call: with a fresh DropConnect mask when training."""
        kernel = tf.convert_to_tensor(self.input_kernel)
        if not is_training(training) or self.dropconnect == 0.0:
            return kernel
        keep = 1.0 - self.dropconnect
        noise = keras.random.uniform(tf.shape(kernel), dtype=kernel.dtype, seed=self.seed_generator)
        return tf.where(noise < keep, kernel / keep, tf.zeros_like(kernel))

    def call(self, inputs: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        perm = time_batch_first_permutation(len(inputs.shape), self.axis)
        outputs = self.time_first_call(tf.transpose(inputs, perm), training)
        return tf.transpose(outputs, inverse_permutation(perm))

    def time_first_call(self, x: tf.Tensor, training: bool | None) -> tf.Tensor:
        """The C-GRU on ``x`` already in ``[T, B, slice..., C]`` order; returns ``[ceil(T/S), B, slice'..., U]``."""
        # Training takes TensorFlow's strided kernels, whose weight gradient is faster than that of space-to-depth;
        # inference chooses by the channels (`slice_convolution`; docs/BENCH_STRIDED_CONV.md).
        method = "strided" if is_training(training) else None
        kernel, bias = self.dropconnect_kernel(training), tf.convert_to_tensor(self.bias)
        gates = input_gates(x, kernel, bias, self.strides, method)
        states = gru_recursion(
            *gates,
            tf.convert_to_tensor(self.state_kernel),
            reverse=self.reverse,
            keep_for_gradient=is_training(training),
        )
        return average_pool_time(states, self.strides)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            units=self.units,
            axis=self.axis,
            reverse=self.reverse,
            strides=self.strides,
            input_filter=self.input_filter,
            state_filter=self.state_filter,
            dropconnect=self.dropconnect,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            recurrent_initializer=keras.initializers.serialize(self.recurrent_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            seed=self.seed,
        )
        return config


def check_gru_arguments(units: int, strides: int, input_filter: int, state_filter: int, dropconnect: float) -> None:
    """Raise ``ValueError`` for arguments shared by :class:`CGRU` and ``MDGRU`` that make no sense."""
    for name, value in (("units", units), ("strides", strides), ("input_filter", input_filter)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if int(state_filter) < 1:
        raise ValueError(f"state_filter must be >= 1, got {state_filter}")
    if not 0.0 <= float(dropconnect) < 1.0:
        raise ValueError(f"dropconnect must be in [0, 1), got {dropconnect}")


def is_training(training: bool | tf.Tensor | None) -> bool:
    """Keras' ``training`` argument as a Python bool (a symbolic tensor counts only if its value is static)."""
    if isinstance(training, tf.Tensor):
        training = tf.get_static_value(training)
    return bool(training)


def subsampled_shape(input_shape: tuple, strides: int, units: int) -> tuple:
    """``[B, n_1, ..., n_d, C]`` -> ``[B, ceil(n_1/S), ..., ceil(n_d/S), units]`` (``None`` stays ``None``)."""
    spatial = tuple(None if n is None else -(-n // strides) for n in input_shape[1:-1])
    return (input_shape[0],) + spatial + (units,)


def time_batch_first_permutation(rank: int, axis: int) -> list[int]:
    """Permutation of ``[B, n_1..n_d, C]`` to ``[T, B, slice axes..., C]`` where T is spatial axis ``axis``.

    Time before batch, so that the input convolutions (time folded into the batch) come out time-major
    without another transpose.
    """
    slice_axes = [a for a in range(1, rank - 1) if a != axis]
    return [axis, 0] + slice_axes + [rank - 1]


def inverse_permutation(perm: list[int]) -> list[int]:
    return [perm.index(i) for i in range(len(perm))]


def input_gates(
    x: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor, strides: int, method: str | None = None
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Input convolutions (plus bias) of all time steps at once, time folded into the batch.

    Args:
        x: ``[T, B, slice..., C]``.
        kernel: ``[k]*(d-1) + [C, 3U]``, gates (r, z, h~) along the last axis; bias ``[3U]``.
        method: how the strided convolutions are computed (:func:`slice_convolution`); ``None``: by the channels.

    Returns:
        The gates r, z, h~, each ``[T, B, slice'..., U]`` with slice' = ``ceil(slice / strides)`` ('SAME').
        One convolution per gate: as fast as one convolution with 3U outputs, and no split copies after it.
    """
    shape = tf.shape(x)
    slice_sizes = [n if n is not None else shape[2 + a] for a, n in enumerate(x.shape[2:-1])]
    folded = tf.reshape(x, [-1, *slice_sizes, x.shape[-1]])
    gates = []
    for gate_kernel, gate_bias in zip(tf.split(kernel, 3, axis=-1), tf.split(bias, 3)):
        gate = tf.nn.bias_add(slice_convolution(folded, gate_kernel, strides, method), gate_bias)
        gates.append(tf.reshape(gate, tf.concat([shape[:2], tf.shape(gate)[1:]], axis=0)))
    return tuple(gates)


# Most input channels times S^(d-1) (the channels of a block) for which a strided slice convolution is computed
# as space-to-depth and a stride-1 convolution. On a 2-core AVX2 EPYC its forward is faster for the fine
# windows' 2 channels at stride 2 (8 channels of blocks: 1.6x, the fine trunk 15 % faster) and slower for 8 or 16
# channels; its weight gradient is slower in every case (`make bench-strided-conv`, docs/BENCH_STRIDED_CONV.md).
SPACE_TO_DEPTH_MAX_CHANNELS = 8
SLICE_CONVOLUTION_METHODS = ("strided", "space_to_depth")


def slice_convolution(slices: tf.Tensor, kernel: tf.Tensor, strides: int, method: str | None = None) -> tf.Tensor:
    """The 'SAME' convolution of ``slices`` ``[N, slice..., C]`` with ``kernel`` and stride ``strides``.

    ``method``: ``"space_to_depth"`` (:func:`space_to_depth_convolution`: the same numbers up to the order of
    the float32 sums, whether the slice sizes are static or not), ``"strided"`` (TensorFlow's convolution), or
    ``None``: space-to-depth where the blocks have at most ``SPACE_TO_DEPTH_MAX_CHANNELS`` channels.
    """
    rank = len(slices.shape) - 2
    if method is None:
        few_channels = slices.shape[-1] * strides**rank <= SPACE_TO_DEPTH_MAX_CHANNELS
        method = "space_to_depth" if strides > 1 and few_channels else "strided"
    if method not in SLICE_CONVOLUTION_METHODS:
        raise ValueError(f"method must be one of {SLICE_CONVOLUTION_METHODS} or None, got {method!r}")
    if method == "space_to_depth":
        return space_to_depth_convolution(slices, kernel, strides)
    return tf.nn.convolution(slices, kernel, strides=[strides] * rank, padding="SAME")


def average_pool_time(states: tf.Tensor, strides: int) -> tf.Tensor:
    """Average ``states[T, ...]`` over groups of ``strides`` steps; the last group may be shorter."""
    if strides == 1:
        return states
    steps = tf.shape(states)[0]
    groups = (steps + strides - 1) // strides
    rest = tf.shape(states)[1:]
    paddings = tf.concat([[[0, groups * strides - steps]], tf.zeros([tf.rank(states) - 1, 2], tf.int32)], 0)
    padded = tf.pad(states, paddings)
    grouped = tf.reshape(padded, tf.concat([[groups, strides], rest], axis=0))
    counts = tf.cast(tf.minimum(strides, steps - tf.range(groups) * strides), states.dtype)
    counts = tf.reshape(counts, tf.concat([[groups], tf.ones_like(rest)], 0))
    return tf.reduce_sum(grouped, axis=1) / counts
