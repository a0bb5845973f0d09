"""Strided 3D convolutions whose training never runs a strided-convolution gradient kernel.

Why: on CPUs without AVX-512 (e.g. 2-core AMD EPYC with AVX2), TensorFlow's kernels for the gradients of a
strided ``conv3d`` are catastrophically slow: for batch 8, 32^3 x 2 channels, filter 9, stride 4, 8 outputs the
forward convolution takes 0.03 s but ``Conv3DBackpropFilterV2`` 16.8 s and ``Conv3DBackpropInputV2`` 15.1 s.
(With oneDNN on AVX-512 they are fast.) The forward convolution is fast everywhere, so:

* :func:`strided_conv3d` / :class:`StridedConv3D`: the forward is the plain ``tf.nn.conv3d``; its gradient
  (a ``tf.custom_gradient``) is computed exactly with two matrix products in a *space-to-depth* formulation.
* :func:`block_conv3d_transpose` / :class:`StridedConv3DTranspose`: a transposed convolution whose filter
  equals its stride (the U-Net's 2x2x2, stride-2 upsampling) is a per-voxel matrix product followed by
  depth-to-space; forward and gradients are matrix products, reshapes and transposes only.
* :func:`upgrade_strided_convolutions`: replaces ``keras.layers.Conv3D`` / ``Conv3DTranspose`` layers of a
  loaded model by these, with the same weights (models saved before these layers existed).

The space-to-depth formulation (per axis; the three axes are independent). Output ``i`` of a convolution
with filter ``k``, stride ``S`` and ``p`` zeros padded before the input reads the padded input at
``i S + t``, ``t = 0 .. k - 1``. Cut the padded input into blocks of ``S`` voxels: position ``i S + t`` is
offset ``r = t mod S`` in block ``i + u``, ``u = t div S``. With ``m = ceil(k / S)`` blocks per receptive
field (3 for ``k = 2 S + 1``) and the kernel zero-padded to ``m S`` taps, the strided convolution is a
stride-1 convolution over blocks::

    y[i, o] = sum_{u < m, r < S, c} X[i + u, (r, c)] W[u S + r, c, o]       X: blocks, S^3 C_in channels

so with ``D[J, (u, o)] = dy[J - u, o]`` (``m^3`` shifted, zero-padded copies of the output gradient: small,
``C_out`` channels each) both gradients are one matrix product each, sharing ``D``::

    dW_blocked[(r, c), (u, o)] = sum_{b, J} X[b, J, (r, c)] D[b, J, (u, o)]      (X^T D)
    dX[b, J, (r, c)]           = sum_{u, o} D[b, J, (u, o)] W_blocked[(r, c), (u, o)]   (D W_blocked^T)

followed by undoing the blocking (depth-to-space) and slicing off the zero padding. The matrix products do
``(m S / k)^3`` times the multiply-adds of a direct convolution gradient (2.5 x for ``k = 2 S + 1``,
``S = 5``) but run at the machine's matmul speed on every CPU BLAS and GPU.
"""

from __future__ import annotations

import itertools
import math

import keras
import tensorflow as tf

_PADDINGS = ("same", "valid")


# ---------------------------------------------------------------------------------------------------------
# argument checks


def _triple(value: int | tuple | list, name: str) -> tuple[int, int, int]:
    """``value`` as three positive ints (one per spatial axis); raises ``ValueError`` quoting it."""
    values = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise ValueError(f"{name} must be a positive int or 3 positive ints. Received: {name}={value!r}")
    return values


def _padding(padding: str) -> str:
    """``padding`` lower-cased; raises ``ValueError`` unless it is 'same' or 'valid'."""
    normalized = str(padding).lower()
    if normalized not in _PADDINGS:
        raise ValueError(f"padding must be 'same' or 'valid'. Received: padding={padding!r}")
    return normalized


def conv_output_size(size: int | None, kernel: int, stride: int, padding: str) -> int | None:
    """Output voxels along one axis of a convolution (TensorFlow's 'SAME' / 'VALID'); None stays None."""
    if size is None:
        return None
    if padding == "same":
        return -(-size // stride)
    return max((size - kernel) // stride + 1, 0)


# ---------------------------------------------------------------------------------------------------------
# the strided convolution and its gradient


def _axis_geometry(size: tf.Tensor, kernel: int, stride: int, padding: str) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """``(outputs, pad_before, blocked_length)`` of one axis of input ``size`` (int32 scalars).

    ``blocked_length = (outputs + m - 1) * stride`` voxels of the padded input (``m = ceil(kernel / stride)``)
    hold every receptive field, aligned to blocks of ``stride`` voxels.
    """
    blocks = -(-kernel // stride)
    if padding == "same":
        outputs = (size + stride - 1) // stride
        pad_before = tf.maximum((outputs - 1) * stride + kernel - size, 0) // 2
    else:
        outputs = (size - kernel) // stride + 1
        pad_before = tf.zeros_like(size)
    return outputs, pad_before, (outputs + blocks - 1) * stride


def _space_to_depth_input(x: tf.Tensor, geometry: list, strides: tuple[int, int, int]) -> tf.Tensor:
    """Padded (or end-cropped) input cut into blocks: ``[B * Nb1 * Nb2 * Nb3, S1 * S2 * S3 * C_in]``.

    Row ``(b, J1, J2, J3)`` holds block ``J`` of sample ``b``, columns ordered ``(r1, r2, r3, c)``.
    """
    shape = tf.shape(x)
    sizes = [shape[1 + a] for a in range(3)]
    pads = [[0, 0]]
    for size, (_, pad_before, length) in zip(sizes, geometry):
        pads.append([pad_before, tf.maximum(length - pad_before - size, 0)])
    pads.append([0, 0])
    padded = tf.pad(x, tf.stack(pads))
    lengths = [length for _, _, length in geometry]
    padded = padded[:, : lengths[0], : lengths[1], : lengths[2]]  # voxels past the last receptive field
    s1, s2, s3 = strides
    channels = x.shape[-1]
    blocks = [length // s for length, s in zip(lengths, strides)]
    blocked = tf.reshape(padded, [shape[0], blocks[0], s1, blocks[1], s2, blocks[2], s3, channels])
    blocked = tf.transpose(blocked, [0, 1, 3, 5, 2, 4, 6, 7])
    return tf.reshape(blocked, [-1, s1 * s2 * s3 * channels])


def _depth_to_space_input(
    blocked: tf.Tensor, x_shape: tf.Tensor, geometry: list, strides: tuple[int, int, int], channels: int
) -> tf.Tensor:
    """Inverse of :func:`_space_to_depth_input` for a gradient: ``[B, N1, N2, N3, C_in]``.

    Padding voxels are dropped; voxels that were cropped (read by no output) get zero gradient.
    """
    s1, s2, s3 = strides
    lengths = [length for _, _, length in geometry]
    blocks = [length // s for length, s in zip(lengths, strides)]
    grad = tf.reshape(blocked, [x_shape[0], blocks[0], blocks[1], blocks[2], s1, s2, s3, channels])
    grad = tf.transpose(grad, [0, 1, 4, 2, 5, 3, 6, 7])
    grad = tf.reshape(grad, [x_shape[0], lengths[0], lengths[1], lengths[2], channels])
    begin, size, pads = [0], [-1], [[0, 0]]
    for a, (_, pad_before, length) in enumerate(geometry):
        kept = tf.minimum(x_shape[1 + a], length - pad_before)
        begin.append(pad_before)
        size.append(kept)
        pads.append([0, x_shape[1 + a] - kept])
    begin.append(0)
    size.append(-1)
    pads.append([0, 0])
    return tf.pad(tf.slice(grad, tf.stack(begin), tf.stack(size)), tf.stack(pads))


def _shifted_output_gradient(dy: tf.Tensor, blocks: tuple[int, int, int], geometry: list) -> tf.Tensor:
    """``D[(b, J), (u, o)] = dy[b, J - u, o]`` (zero outside), ``[B * Nb1 * Nb2 * Nb3, m1 * m2 * m3 * C_out]``.

    ``u = (u1, u2, u3)`` runs over the ``m`` blocks of a receptive field per axis, ``u1`` slowest.
    """
    m1, m2, m3 = blocks
    padded = tf.pad(dy, [[0, 0], [m1 - 1, m1 - 1], [m2 - 1, m2 - 1], [m3 - 1, m3 - 1], [0, 0]])
    extents = [outputs + m - 1 for (outputs, _, _), m in zip(geometry, blocks)]
    shifted = []
    for u1, u2, u3 in itertools.product(range(m1), range(m2), range(m3)):
        begin = tf.stack([0, m1 - 1 - u1, m2 - 1 - u2, m3 - 1 - u3, 0])
        shifted.append(tf.slice(padded, begin, tf.stack([-1, *extents, -1])))
    return tf.reshape(tf.concat(shifted, axis=-1), [-1, m1 * m2 * m3 * dy.shape[-1]])


def _blocked_kernel_matrix(kernel: tf.Tensor, strides: tuple[int, int, int], blocks: tuple[int, int, int]) -> tf.Tensor:
    """Kernel ``[k1, k2, k3, C_in, C_out]`` zero-padded to ``m S`` taps per axis, as ``[S^3 C_in, m^3 C_out]``."""
    k = kernel.shape[:3]
    channels_in, channels_out = kernel.shape[3], kernel.shape[4]
    padded = tf.pad(kernel, [[0, m * s - n] for m, s, n in zip(blocks, strides, k)] + [[0, 0], [0, 0]])
    (m1, m2, m3), (s1, s2, s3) = blocks, strides
    blocked = tf.reshape(padded, [m1, s1, m2, s2, m3, s3, channels_in, channels_out])
    blocked = tf.transpose(blocked, [1, 3, 5, 6, 0, 2, 4, 7])
    return tf.reshape(blocked, [s1 * s2 * s3 * channels_in, m1 * m2 * m3 * channels_out])


def _kernel_from_blocked_matrix(
    matrix: tf.Tensor, kernel_size: tuple[int, int, int], strides: tuple[int, int, int], blocks: tuple[int, int, int]
) -> tf.Tensor:
    """Inverse of :func:`_blocked_kernel_matrix`: ``[S^3 C_in, m^3 C_out]`` -> ``[k1, k2, k3, C_in, C_out]``."""
    (m1, m2, m3), (s1, s2, s3) = blocks, strides
    channels_out = matrix.shape[1] // (m1 * m2 * m3)
    channels_in = matrix.shape[0] // (s1 * s2 * s3)
    grad = tf.reshape(matrix, [s1, s2, s3, channels_in, m1, m2, m3, channels_out])
    grad = tf.transpose(grad, [4, 0, 5, 1, 6, 2, 3, 7])
    grad = tf.reshape(grad, [m1 * s1, m2 * s2, m3 * s3, channels_in, channels_out])
    k1, k2, k3 = kernel_size
    return grad[:k1, :k2, :k3]


def strided_conv3d(x: tf.Tensor, kernel: tf.Tensor, strides: tuple[int, int, int], padding: str = "same") -> tf.Tensor:
    """``tf.nn.conv3d(x, kernel, strides, padding)`` whose gradient uses matrix products, no conv gradient.

    Args:
        x: ``[B, N1, N2, N3, C_in]`` (batch and spatial sizes may be dynamic; ``C_in`` static).
        kernel: ``[k1, k2, k3, C_in, C_out]`` (static shape).
        strides: ``(S1, S2, S3)``.
        padding: ``'same'`` or ``'valid'``, as TensorFlow defines them.

    Returns:
        ``[B, n1, n2, n3, C_out]``, ``n = ceil(N / S)`` ('same') or ``(N - k) // S + 1`` ('valid').

    The gradients with respect to ``x`` and ``kernel`` are exact (the space-to-depth formulation in the
    module docstring); second derivatives are those of the matrix products (also exact).
    """
    strides = _triple(strides, "strides")
    padding = _padding(padding)
    tf_strides = [1, *strides, 1]
    tf_padding = padding.upper()
    kernel_size = tuple(int(n) for n in kernel.shape[:3])
    blocks = tuple(-(-k // s) for k, s in zip(kernel_size, strides))

    @tf.custom_gradient
    def conv(x: tf.Tensor, kernel: tf.Tensor):
        y = tf.nn.conv3d(x, kernel, tf_strides, tf_padding)

        def grad(dy: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            x_shape = tf.shape(x)
            geometry = [_axis_geometry(x_shape[1 + a], kernel_size[a], strides[a], padding) for a in range(3)]
            shifted = _shifted_output_gradient(dy, blocks, geometry)  # [B Nb, m^3 C_out]
            blocked_x = _space_to_depth_input(x, geometry, strides)  # [B Nb, S^3 C_in]
            kernel_grad = tf.matmul(blocked_x, shifted, transpose_a=True)  # [S^3 C_in, m^3 C_out]
            kernel_grad = _kernel_from_blocked_matrix(kernel_grad, kernel_size, strides, blocks)
            blocked_kernel = _blocked_kernel_matrix(kernel, strides, blocks)
            input_grad = tf.matmul(shifted, blocked_kernel, transpose_b=True)  # [B Nb, S^3 C_in]
            input_grad = _depth_to_space_input(input_grad, x_shape, geometry, strides, x.shape[-1])
            input_grad.set_shape(x.shape)
            kernel_grad.set_shape(kernel.shape)
            return input_grad, kernel_grad

        return y, grad

    if strides == (1, 1, 1):  # stride 1: the plain convolution and its (unstrided) gradient kernels
        return tf.nn.conv3d(x, kernel, tf_strides, tf_padding)
    return conv(x, kernel)


def block_conv3d_transpose(x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """``conv3d_transpose`` with filter = stride (non-overlapping), as a matrix product and depth-to-space.

    Args:
        x: ``[B, N1, N2, N3, C_in]``.
        kernel: ``[S1, S2, S3, C_out, C_in]`` (Keras ``Conv3DTranspose`` layout; filter = stride ``S``).

    Returns:
        ``[B, N1 S1, N2 S2, N3 S3, C_out]`` with ``out[b, i S + a, o] = sum_c x[b, i, c] kernel[a, o, c]``
        (per axis): every input voxel paints its own ``S1 x S2 x S3`` block. Gradients are those of matmul,
        reshape and transpose.
    """
    s1, s2, s3, channels_out, channels_in = (int(n) for n in kernel.shape)
    shape = tf.shape(x)
    matrix = tf.reshape(tf.transpose(kernel, [4, 0, 1, 2, 3]), [channels_in, s1 * s2 * s3 * channels_out])
    y = tf.matmul(tf.reshape(x, [-1, channels_in]), matrix)  # [B N^3, S^3 C_out]
    y = tf.reshape(y, [shape[0], shape[1], shape[2], shape[3], s1, s2, s3, channels_out])
    y = tf.transpose(y, [0, 1, 4, 2, 5, 3, 6, 7])
    return tf.reshape(y, [shape[0], shape[1] * s1, shape[2] * s2, shape[3] * s3, channels_out])


# ---------------------------------------------------------------------------------------------------------
# layers


@keras.saving.register_keras_serializable(package="mdgru_keras")
class StridedConv3D(keras.layers.Layer):
    """3D convolution (``keras.layers.Conv3D``, channels last, linear) trained without strided-conv gradients.

    The forward pass is ``tf.nn.conv3d`` with the stride, as in ``keras.layers.Conv3D``. The gradients with
    respect to the input and the kernel are computed exactly by two matrix products in a space-to-depth
    formulation (:func:`strided_conv3d`; the derivation is in the module docstring) instead of TensorFlow's
    ``Conv3DBackpropFilterV2`` / ``Conv3DBackpropInputV2`` kernels, which are hundreds of times slower than
    the forward pass on CPUs without AVX-512 when the stride is > 1 (16.8 s against 0.03 s for the tiny
    preset's coarse input convolution at batch 8 on a 2-core AVX2 EPYC). With stride 1 it is the plain
    convolution.

    The weights have the names and shapes of ``keras.layers.Conv3D``'s (``kernel [k1, k2, k3, C_in,
    filters]``, ``bias [filters]``), so its variables are interchangeable with a ``Conv3D``'s
    (:func:`upgrade_strided_convolutions` converts a loaded model).

    Args:
        filters: output channels ``C_out``.
        kernel_size: filter size ``k``, an int or 3 ints.
        strides: stride ``S``, an int or 3 ints.
        padding: ``'same'`` (``ceil(N / S)`` outputs; ``max((ceil(N / S) - 1) S + k - N, 0)`` zeros in total,
            half of them (rounded down) before the input) or ``'valid'`` (no padding), as TensorFlow defines
            them.
        use_bias: add a bias per output channel.
        kernel_initializer, bias_initializer: as in Keras.

    Input shape: ``[batch, N1, N2, N3, C_in]`` (``C_in`` known).
    Output shape: ``[batch, n1, n2, n3, filters]`` with ``n = ceil(N / S)`` ('same') or
    ``(N - k) // S + 1`` ('valid').
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int | tuple[int, int, int],
        strides: int | tuple[int, int, int] = 1,
        padding: str = "valid",
        use_bias: bool = True,
        kernel_initializer: str | keras.initializers.Initializer = "glorot_uniform",
        bias_initializer: str | keras.initializers.Initializer = "zeros",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(filters, int) or isinstance(filters, bool) or filters < 1:
            raise ValueError(f"filters must be a positive int. Received: filters={filters!r}")
        self.filters = filters
        self.kernel_size = _triple(kernel_size, "kernel_size")
        self.strides = _triple(strides, "strides")
        self.padding = _padding(padding)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.input_spec = keras.layers.InputSpec(ndim=5)

    def build(self, input_shape: tuple) -> None:
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(f"StridedConv3D needs a known number of input channels. Received: {tuple(input_shape)}")
        self.input_spec = keras.layers.InputSpec(ndim=5, axes={-1: channels})
        self.kernel = self.add_weight(
            name="kernel", shape=(*self.kernel_size, channels, self.filters), initializer=self.kernel_initializer
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer=self.bias_initializer)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        spatial = [
            conv_output_size(n, k, s, self.padding) for n, k, s in zip(input_shape[1:4], self.kernel_size, self.strides)
        ]
        if any(n is not None and n < 1 for n in spatial):
            raise ValueError(
                f"StridedConv3D: the input is smaller than the filter {self.kernel_size} with padding "
                f"'{self.padding}'. Received: input_shape={tuple(input_shape)}"
            )
        return (input_shape[0], *spatial, self.filters)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        outputs = strided_conv3d(inputs, tf.convert_to_tensor(self.kernel), self.strides, self.padding)
        if self.use_bias:
            outputs = tf.nn.bias_add(outputs, tf.convert_to_tensor(self.bias))
        return outputs

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            filters=self.filters,
            kernel_size=list(self.kernel_size),
            strides=list(self.strides),
            padding=self.padding,
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
        )
        return config


@keras.saving.register_keras_serializable(package="mdgru_keras")
class StridedConv3DTranspose(keras.layers.Layer):
    """``keras.layers.Conv3DTranspose`` with filter = stride (non-overlapping upsampling), as matrix products.

    Every input voxel paints its own ``S1 x S2 x S3`` output block: ``out[i S + a, o] = sum_c x[i, c]
    kernel[a, o, c] + bias[o]``, a per-voxel product with a ``[C_in, S^3 filters]`` matrix followed by
    depth-to-space (:func:`block_conv3d_transpose`). Why: a transposed convolution's forward pass *is*
    TensorFlow's strided ``Conv3DBackpropInputV2`` and its kernel gradient ``Conv3DBackpropFilterV2``, the
    kernels that are very slow on CPUs without AVX-512; here forward and gradients are matmuls, reshapes and
    transposes. ``padding`` 'same' and 'valid' give the same result when the filter equals the stride.

    Weights as ``keras.layers.Conv3DTranspose``'s: ``kernel [S1, S2, S3, filters, C_in]``, ``bias [filters]``.

    Args:
        filters: output channels.
        kernel_size: filter size, an int or 3 ints; must equal ``strides``.
        strides: upsampling factor ``S``, an int or 3 ints (default: ``kernel_size``).
        padding: 'valid' or 'same' (identical here).
        use_bias: add a bias per output channel.
        kernel_initializer, bias_initializer: as in Keras.

    Input shape: ``[batch, N1, N2, N3, C_in]`` (``C_in`` known).
    Output shape: ``[batch, N1 S1, N2 S2, N3 S3, filters]``.
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int | tuple[int, int, int],
        strides: int | tuple[int, int, int] | None = None,
        padding: str = "valid",
        use_bias: bool = True,
        kernel_initializer: str | keras.initializers.Initializer = "glorot_uniform",
        bias_initializer: str | keras.initializers.Initializer = "zeros",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(filters, int) or isinstance(filters, bool) or filters < 1:
            raise ValueError(f"filters must be a positive int. Received: filters={filters!r}")
        self.filters = filters
        self.kernel_size = _triple(kernel_size, "kernel_size")
        self.strides = _triple(kernel_size if strides is None else strides, "strides")
        if self.strides != self.kernel_size:
            raise ValueError(
                "StridedConv3DTranspose needs kernel_size == strides (non-overlapping blocks); use "
                f"keras.layers.Conv3DTranspose otherwise. Received: kernel_size={kernel_size!r}, strides={strides!r}"
            )
        self.padding = _padding(padding)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.input_spec = keras.layers.InputSpec(ndim=5)

    def build(self, input_shape: tuple) -> None:
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(
                f"StridedConv3DTranspose needs a known number of input channels. Received: {tuple(input_shape)}"
            )
        self.input_spec = keras.layers.InputSpec(ndim=5, axes={-1: channels})
        self.kernel = self.add_weight(
            name="kernel", shape=(*self.kernel_size, self.filters, channels), initializer=self.kernel_initializer
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer=self.bias_initializer)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        spatial = [None if n is None else n * s for n, s in zip(input_shape[1:4], self.strides)]
        return (input_shape[0], *spatial, self.filters)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        outputs = block_conv3d_transpose(inputs, tf.convert_to_tensor(self.kernel))
        if self.use_bias:
            outputs = tf.nn.bias_add(outputs, tf.convert_to_tensor(self.bias))
        return outputs

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            filters=self.filters,
            kernel_size=list(self.kernel_size),
            strides=list(self.strides),
            padding=self.padding,
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
        )
        return config


# ---------------------------------------------------------------------------------------------------------
# models saved with the Keras layers


def _replacement_class(layer: keras.layers.Layer) -> type | None:
    """:class:`StridedConv3D` / :class:`StridedConv3DTranspose` if ``layer`` is a plain Keras layer they can
    replace (strided, channels last, no dilation or groups, linear, no regularizer or constraint), else None."""
    if type(layer) not in (keras.layers.Conv3D, keras.layers.Conv3DTranspose) or max(layer.strides) == 1:
        return None
    plain = (
        layer.data_format == "channels_last"
        and max(layer.dilation_rate) == 1
        and getattr(layer, "groups", 1) == 1
        and layer.activation is keras.activations.linear
        and not (layer.kernel_regularizer or layer.bias_regularizer or layer.activity_regularizer)
        and not (layer.kernel_constraint or layer.bias_constraint)
    )
    if not plain:
        return None
    if type(layer) is keras.layers.Conv3D:
        return StridedConv3D
    return StridedConv3DTranspose if tuple(layer.kernel_size) == tuple(layer.strides) else None


def upgrade_strided_convolutions(model: keras.Model) -> keras.Model:
    """``model`` with its strided ``Conv3D`` / filter-equals-stride ``Conv3DTranspose`` layers replaced.

    Only plain layers of ``model.layers`` are replaced (see :func:`_replacement_class`; nested models are left
    as they are); the new layers get the old ones' names and weights, every other layer is shared with
    ``model``. Returns ``model`` itself when nothing needs replacing. Use it on models saved before
    :class:`StridedConv3D` existed: their ``.keras`` files hold ``Conv3D`` layers, and Keras addresses the
    weights in such files by class name, so they cannot be loaded straight into a model built with the new
    layers.
    """
    if not any(_replacement_class(layer) for layer in model.layers):
        return model
    replaced = []

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        kind = _replacement_class(layer)
        if kind is None:
            return layer
        new = kind(
            filters=layer.filters,
            kernel_size=tuple(layer.kernel_size),
            strides=tuple(layer.strides),
            padding=layer.padding,
            use_bias=layer.use_bias,
            kernel_initializer=layer.kernel_initializer,
            bias_initializer=layer.bias_initializer,
            name=layer.name,
            dtype=layer.dtype_policy,
        )
        replaced.append((layer, new))
        return new

    upgraded = keras.models.clone_model(model, clone_function=clone)
    for old, new in replaced:
        new.set_weights(old.get_weights())
    return upgraded


def strided_conv3d_flops(
    input_shape: tuple, kernel_size: tuple, strides: tuple, channels_out: int, padding: str = "same"
) -> dict[str, float]:
    """Multiply-add FLOPs (2 per multiply-add) of one strided convolution and of its two gradients.

    Returns ``{"direct": ..., "blocked": ...}``: a direct convolution (forward; each gradient costs the
    same) and one of the space-to-depth matrix products (the kernel or the input gradient).
    """
    batch, *spatial, channels_in = input_shape
    kernel_size, strides = _triple(kernel_size, "kernel_size"), _triple(strides, "strides")
    outputs = [conv_output_size(n, k, s, padding) for n, k, s in zip(spatial, kernel_size, strides)]
    direct = 2.0 * batch * math.prod(outputs) * math.prod(kernel_size) * channels_in * channels_out
    blocks = [-(-k // s) for k, s in zip(kernel_size, strides)]
    rows = batch * math.prod(n + m - 1 for n, m in zip(outputs, blocks))
    blocked = 2.0 * rows * math.prod(strides) * channels_in * math.prod(blocks) * channels_out
    return {"direct": direct, "blocked": blocked}
