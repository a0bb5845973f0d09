"""Multi-dimensional GRU: C-GRUs along every axis in both directions."""

from __future__ import annotations

import keras
import tensorflow as tf

from mdgru_keras.layers.cgru import (
    CGRU,
    check_gru_arguments,
    inverse_permutation,
    subsampled_shape,
    time_batch_first_permutation,
)


@keras.saving.register_keras_serializable(package="mdgru_keras")
class MDGRU(keras.layers.Layer):
    """Runs ``2 d`` :class:`CGRU` layers (forward and backward along each of the d spatial axes), each with
    its own weights, and sums (or averages) their outputs.

    The forward and backward C-GRU of one axis share the transposition of the input (time axis first) and
    the transposition back. Each C-GRU keeps its own DropConnect mask.

    Input shape: ``[batch, n_1, ..., n_d, channels]`` (d = 2 or 3).
    Output shape: ``[batch, ceil(n_1 / S), ..., ceil(n_d / S), units]`` (padding as in :class:`CGRU`).

    Args: as :class:`CGRU` (without ``axis`` and ``reverse``), plus ``combine``: ``"sum"`` (default) or
    ``"mean"`` of the 2d outputs. With a ``seed``, the C-GRU ``i`` (axis-major, forward first) gets ``seed + i``.
    """

    def __init__(
        self,
        units: int,
        strides: int = 1,
        input_filter: int = 3,
        state_filter: int = 3,
        dropconnect: float = 0.5,
        combine: str = "sum",
        kernel_initializer: str | keras.initializers.Initializer = "glorot_uniform",
        recurrent_initializer: str | keras.initializers.Initializer = "glorot_uniform",
        bias_initializer: str | keras.initializers.Initializer = "zeros",
        seed: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if combine not in ("sum", "mean"):
            raise ValueError(f"combine must be 'sum' or 'mean', got {combine!r}")
        check_gru_arguments(units, strides, input_filter, state_filter, dropconnect)
        self.units = int(units)
        self.strides = int(strides)
        self.input_filter = int(input_filter)
        self.state_filter = int(state_filter)
        self.dropconnect = float(dropconnect)
        self.combine = combine
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.recurrent_initializer = keras.initializers.get(recurrent_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.seed = seed
        self.cgrus: list[CGRU] = []

    def build(self, input_shape: tuple) -> None:
        spatial_rank = len(input_shape) - 2
        if spatial_rank not in (2, 3):
            raise ValueError(f"MDGRU expects a 2D or 3D input with channels, got shape {tuple(input_shape)}")
        cgrus = []
        for axis in range(1, spatial_rank + 1):
            for reverse in (False, True):
                cgru = CGRU(
                    self.units,
                    axis=axis,
                    reverse=reverse,
                    strides=self.strides,
                    input_filter=self.input_filter,
                    state_filter=self.state_filter,
                    dropconnect=self.dropconnect,
                    kernel_initializer=self.kernel_initializer,
                    recurrent_initializer=self.recurrent_initializer,
                    bias_initializer=self.bias_initializer,
                    seed=None if self.seed is None else self.seed + len(cgrus),
                    dtype=self.dtype_policy,
                    name=f"cgru_axis{axis}_{'backward' if reverse else 'forward'}",
                )
                cgru.build(input_shape)
                cgrus.append(cgru)
        self.cgrus = cgrus

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return subsampled_shape(input_shape, self.strides, self.units)

    def call(self, inputs: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        rank = len(inputs.shape)
        total = None
        for forward, backward in zip(self.cgrus[::2], self.cgrus[1::2]):
            # Both directions of one axis share the transposed input and the transpose back.
            perm = time_batch_first_permutation(rank, forward.axis)
            x = tf.transpose(inputs, perm)  # [T, B, slice..., C]
            both = forward.time_first_call(x, training) + backward.time_first_call(x, training)
            both = tf.transpose(both, inverse_permutation(perm))
            total = both if total is None else total + both
        if self.combine == "mean":
            total = total / float(len(self.cgrus))
        return total

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            units=self.units,
            strides=self.strides,
            input_filter=self.input_filter,
            state_filter=self.state_filter,
            dropconnect=self.dropconnect,
            combine=self.combine,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            recurrent_initializer=keras.initializers.serialize(self.recurrent_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            seed=self.seed,
        )
        return config
