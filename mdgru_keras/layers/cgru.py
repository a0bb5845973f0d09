"""Convolutional GRU along one axis of a d-D input, with spatial subsampling and DropConnect."""

from __future__ import annotations

import keras
import tensorflow as tf


class CGRU(keras.layers.Layer):
    """A convolutional GRU that runs along one spatial axis ("time") of a d-D input.

    For every time step ``t`` the slice ``x_t`` (a (d-1)-D image) is convolved with stride ``S`` on each of
    its axes, and the state ``h`` lives on that subsampled grid::

        r   = sigmoid(x_t * w_r + h_{t-1} * u_r + b_r)
        z   = sigmoid(x_t * w_z + h_{t-1} * u_z + b_z)
        h~  = tanh(x_t * w_h + r . (h_{t-1} * u_h) + b_h)
        h_t = z . h_{t-1} + (1 - z) . h~

    The outputs ``h_t`` are average-pooled along time by ``S``.

    Input shape: ``[batch, n_1, ..., n_d, channels]`` (d = 2 or 3).
    Output shape: ``[batch, ceil(n_1 / S), ..., ceil(n_d / S), units]``. Along the slice axes the strided
    convolution uses 'same' padding (zeros, split evenly, the extra one at the end); along time the last
    pooling group averages only the steps that exist.

    Args:
        units: state channels.
        axis: the spatial axis to run along, 1..d (1 is the first spatial axis).
        reverse: run from the last slice to the first.
        strides: subsampling factor S on every spatial axis.
        input_filter: filter size of the input convolutions ``w`` (each slice axis).
        state_filter: filter size of the state convolutions ``u``.
        dropconnect: fraction of input-filter weights dropped during training (fresh mask each call);
            kept weights are scaled by ``1 / (1 - dropconnect)`` so that inference uses the weights as they are.
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
            raise ValueError(f"CGRU expects a 2D or 3D input with channels, got shape {input_shape}")
        if not 1 <= self.axis <= spatial_rank:
            raise ValueError(f"axis must be in 1..{spatial_rank}, got {self.axis}")
        channels = input_shape[-1]
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
        def sub(n):
            return None if n is None else -(-n // self.strides)

        return (input_shape[0],) + tuple(sub(n) for n in input_shape[1:-1]) + (self.units,)

    def _time_first_permutation(self, rank: int) -> list[int]:
        """Permutation that moves the time axis to position 1: [batch, time, slice axes..., channels]."""
        slice_axes = [a for a in range(1, rank - 1) if a != self.axis]
        return [0, self.axis] + slice_axes + [rank - 1]

    def call(self, inputs: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        rank = len(inputs.shape)
        perm = self._time_first_permutation(rank)
        inverse_perm = [perm.index(i) for i in range(rank)]
        x = tf.transpose(inputs, perm)  # [B, T, s..., C]
        shape = tf.shape(x)
        batch, steps = shape[0], shape[1]

        input_kernel = self.input_kernel
        if training and self.dropconnect > 0.0:
            keep = 1.0 - self.dropconnect
            mask = keras.random.uniform(tf.shape(input_kernel), seed=self.seed_generator) < keep
            input_kernel = tf.where(mask, input_kernel / keep, tf.zeros_like(input_kernel))

        # All input convolutions at once: time folded into the batch.
        folded = tf.reshape(x, tf.concat([[batch * steps], shape[2:]], axis=0))
        slice_rank = rank - 3
        x_parts = tf.nn.convolution(folded, input_kernel, strides=[self.strides] * slice_rank, padding="SAME")
        x_parts = x_parts + self.bias
        sub_shape = tf.shape(x_parts)[1:-1]
        x_parts = tf.reshape(x_parts, tf.concat([[batch, steps], sub_shape, [3 * self.units]], axis=0))
        time_major = tf.transpose(x_parts, [1, 0] + list(range(2, rank)))  # [T, B, s'..., 3U]

        state_kernel = self.state_kernel
        units = self.units

        def step(h, x_t):
            x_r, x_z, x_h = tf.split(x_t, 3, axis=-1)
            h_parts = tf.nn.convolution(h, state_kernel, padding="SAME")
            u_r, u_z, u_h = tf.split(h_parts, 3, axis=-1)
            r = tf.sigmoid(x_r + u_r)
            z = tf.sigmoid(x_z + u_z)
            candidate = tf.tanh(x_h + r * u_h)
            return z * h + (1.0 - z) * candidate

        h0 = tf.zeros(tf.concat([[batch], sub_shape, [units]], axis=0), dtype=time_major.dtype)
        states = tf.scan(step, time_major, initializer=h0, reverse=self.reverse)  # [T, B, s'..., U]
        pooled = average_pool_time(states, self.strides)  # [ceil(T/S), B, s'..., U]
        batch_major = tf.transpose(pooled, [1, 0] + list(range(2, rank)))
        return tf.transpose(batch_major, inverse_perm)

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


def average_pool_time(states: tf.Tensor, strides: int) -> tf.Tensor:
    """Average ``states[T, ...]`` over groups of ``strides`` steps; the last group may be shorter."""
    if strides == 1:
        return states
    steps = tf.shape(states)[0]
    groups = (steps + strides - 1) // strides
    padded = tf.pad(
        states, tf.concat([[[0, groups * strides - steps]], tf.zeros([tf.rank(states) - 1, 2], tf.int32)], 0)
    )
    grouped = tf.reshape(padded, tf.concat([[groups, strides], tf.shape(states)[1:]], axis=0))
    counts = tf.minimum(strides, steps - tf.range(groups) * strides)
    counts = tf.reshape(
        tf.cast(counts, states.dtype), tf.concat([[groups], tf.ones([tf.rank(states) - 1], tf.int32)], 0)
    )
    return tf.reduce_sum(grouped, axis=1) / counts
