"""Strided 3D convolutions computed by matrix products: no strided-convolution kernel, forward or gradient.

Why: on CPUs without AVX-512 (e.g. 2-core AMD EPYC with AVX2), TensorFlow's kernels for the gradients of a
strided ``conv3d`` are catastrophically slow: for batch 8, 32^3 x 2 channels, filter 9, stride 4, 8 outputs the
forward convolution takes 0.03 s but ``Conv3DBackpropFilterV2`` 16.8 s and ``Conv3DBackpropInputV2`` 15.1 s.
(With oneDNN on AVX-512 they are fast.) Its strided forward is slow there too for the big coarse input
(8 x 160^3 x 2, filter 11, stride 5: 1.44 s, 11 GFLOP at 8 GFLOP/s on a 130 GFLOP/s machine). So:

* :func:`strided_conv3d` / :class:`StridedConv3D`: forward and both gradients are one matrix product each in a
  *space-to-depth* formulation (a ``tf.custom_gradient``), plus reshapes, transposes and shifted slices.
* :func:`block_conv3d_transpose` / :class:`StridedConv3DTranspose`: a transposed convolution whose filter
  equals its stride (the U-Net's 2x2x2, stride-2 upsampling) is a per-voxel matrix product followed by
  depth-to-space; forward and gradients are matrix products, reshapes and transposes only.
* :func:`space_to_depth_convolution`: a strided convolution with 1-3 spatial axes as space-to-depth and a
  stride-1 convolution (the MD-GRUs' slice input convolutions where their input has few channels; forward
  and gradients are stride-1 convolutions, reshapes and transposes).
* :func:`upgrade_strided_convolutions`: replaces ``keras.layers.Conv3D`` / ``Conv3DTranspose`` layers of a
  loaded model by these, with the same weights (models saved before these layers existed).

The space-to-depth formulation (per axis; the three axes are independent). With 'same' padding TensorFlow
pads ``p = max((n - 1) S + k - N, 0) // 2`` zeros before the input (``p = 0`` for 'valid'), so output ``i``
reads input voxels ``i S - p + t``, ``t = 0 .. k - 1``. Cut the input into blocks of ``S`` voxels starting
at voxel 0 (zeros fill the last block when ``S`` does not divide ``N``): voxel ``i S - p + t`` is offset
``r`` in block ``i + u`` with ``u S + r = t - p``. ``u`` runs over ``m`` consecutive values from
``u_low = floor(-p / S)`` (3 blocks for the presets' ``k = 2 S + 1``), and with the kernel shifted into
``m S`` taps (zeros before and after it) the strided convolution is a stride-1 convolution over blocks::

    y[i, o] = sum_{v < m, r < S, c} X[i + u_low + v, (r, c)] W_blocked[v S + r, c, o]    X: S^3 C_in channels

The forward is one matrix product ``P = X W_blocked`` (``[B Nb, m^3 C_out]``) followed by the sum of ``m^3``
shifted slices, ``y[i, o] = sum_v P[i + u_low + v, (v, o)]``.

Blocks that would hold only padding (before voxel 0, after the last block) are left out: they add nothing to
the kernel gradient and need no input gradient. With ``D[J, (v, o)] = dy[J - u_low - v, o]`` (``m^3``
shifted, zero-padded copies of the output gradient: small, ``C_out`` channels each) both gradients are one
matrix product each, sharing ``D``::

    dW_blocked[(r, c), (v, o)] = sum_{b, J} X[b, J, (r, c)] D[b, J, (v, o)]              (X^T D)
    dX[b, J, (r, c)]           = sum_{v, o} D[b, J, (v, o)] W_blocked[(r, c), (v, o)]     (D W_blocked^T)

followed by undoing the blocking (depth-to-space) and the kernel's shift. The matrix products do
``(m S / k)^3`` times the multiply-adds of a direct convolution gradient (2.5 x for ``k = 11``, ``S = 5``;
3.4 x for ``k = 9``, ``S = 4``) but run at the machine's matmul speed on every CPU BLAS and GPU, and the
input is only reshaped and transposed, never padded, when ``S`` divides its size (all presets).
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class _AxisPlan:
    """How one spatial axis is cut into blocks of ``stride`` voxels (see the module docstring).

    Block ``J`` holds input voxels ``[J S - front, (J + 1) S - front)`` (zeros outside the input). Output ``i``
    reads blocks ``i + u_low .. i + u_low + blocks_per_field - 1``; the kernel, preceded by ``kernel_front``
    zeros and followed by zeros up to ``blocks_per_field * S`` taps, is the blocked kernel.
    Ints when the input size is static; ``outputs``, ``front``, ``back`` and ``blocks`` may be int32 tensors.
    """

    outputs: int | tf.Tensor  # n
    front: int | tf.Tensor  # zeros before the input (0 when the size is static: blocks start at voxel 0)
    back: int | tf.Tensor  # zeros after it, to fill the last block
    blocks: int | tf.Tensor  # Nb, blocks of the (padded) input
    u_low: int  # first block of output i's receptive field, relative to block i
    blocks_per_field: int  # m
    kernel_front: int  # zeros before the kernel's first tap in the blocked kernel


def _axis_plan(size: int | tf.Tensor, kernel: int, stride: int, padding: str) -> _AxisPlan:
    """The :class:`_AxisPlan` of one axis of ``size`` voxels (an int, or an int32 tensor when dynamic).

    With 'same' padding TensorFlow puts ``pad = max((n - 1) S + k - N, 0) // 2`` zeros before the input, so
    output ``i`` reads input voxels ``i S - pad + t``, ``t < k``. A static size puts the block grid at voxel 0,
    so no zeros are padded in front (the blocks before it would only hold padding: they add nothing to the
    kernel gradient and need no input gradient) and none at the end when ``S`` divides ``N``; the receptive
    field then starts ``pad`` voxels before its block. A dynamic size starts the grid ``pad`` voxels before the
    input (``pad`` is a tensor, the number of blocks per field must be static).
    """
    static = isinstance(size, int)
    if padding == "same":
        outputs = (size + stride - 1) // stride
        pad = (outputs - 1) * stride + kernel - size
        pad = max(pad, 0) // 2 if static else tf.maximum(pad, 0) // 2
    else:
        outputs = (size - kernel) // stride + 1
        pad = 0
    if static:
        front, offset = 0, -pad  # receptive field of output i starts at voxel i S + offset of the block grid
    else:
        front, offset = pad, 0
    u_low = offset // stride
    u_high = (offset + kernel - 1) // stride
    blocks = (size + front + stride - 1) // stride
    return _AxisPlan(
        outputs=outputs,
        front=front,
        back=blocks * stride - size - front,
        blocks=blocks,
        u_low=u_low,
        blocks_per_field=u_high - u_low + 1,
        kernel_front=offset - u_low * stride,
    )


def _is_zero(value: int | tf.Tensor) -> bool:
    return isinstance(value, int) and value == 0


def _space_to_depth_input(x: tf.Tensor, plans: list[_AxisPlan], strides: tuple[int, int, int]) -> tf.Tensor:
    """The input cut into blocks: ``[B * Nb1 * Nb2 * Nb3, S1 * S2 * S3 * C_in]``.

    Row ``(b, J1, J2, J3)`` holds block ``J`` of sample ``b``, columns ordered ``(r1, r2, r3, c)``.
    """
    if not all(_is_zero(p.front) and _is_zero(p.back) for p in plans):
        x = tf.pad(x, [[0, 0], *[[p.front, p.back] for p in plans], [0, 0]])
    (s1, s2, s3), (n1, n2, n3) = strides, (p.blocks for p in plans)
    channels = x.shape[-1]
    blocked = tf.reshape(x, [tf.shape(x)[0], n1, s1, n2, s2, n3, s3, channels])
    blocked = tf.transpose(blocked, [0, 1, 3, 5, 2, 4, 6, 7])
    return tf.reshape(blocked, [-1, s1 * s2 * s3 * channels])


def _depth_to_space_input(
    blocked: tf.Tensor, batch: tf.Tensor, plans: list[_AxisPlan], strides: tuple[int, int, int], channels: int
) -> tf.Tensor:
    """Inverse of :func:`_space_to_depth_input` (for the input gradient): ``[B, N1, N2, N3, C_in]``."""
    (s1, s2, s3), (n1, n2, n3) = strides, (p.blocks for p in plans)
    grad = tf.reshape(blocked, [batch, n1, n2, n3, s1, s2, s3, channels])
    grad = tf.transpose(grad, [0, 1, 4, 2, 5, 3, 6, 7])
    grad = tf.reshape(grad, [batch, n1 * s1, n2 * s2, n3 * s3, channels])
    if all(_is_zero(p.front) and _is_zero(p.back) for p in plans):
        return grad
    begin = [0, *(p.front for p in plans), 0]
    size = [-1, *(p.blocks * s - p.front - p.back for p, s in zip(plans, strides)), -1]
    return tf.slice(grad, tf.stack(begin), tf.stack(size))


def _shifted_output_gradient(dy: tf.Tensor, plans: list[_AxisPlan]) -> tf.Tensor:
    """``D[(b, J), (v, o)] = dy[b, J - v - u_low, o]`` (zero outside): ``[B * Nb1 * Nb2 * Nb3, m1 m2 m3 C_out]``.

    ``v = (v1, v2, v3)``, ``v_a < m_a``, ``v1`` slowest. Built one axis at a time (last axis first), each step
    concatenating the ``m`` shifted copies along the channels, so the big concatenations move long rows.
    """
    pads = [[0, 0]]
    for p in plans:
        high = p.blocks_per_field - 1 + p.u_low  # front padding: J - v - u_low >= -high
        back = p.blocks - p.u_low - p.outputs  # J - v - u_low < outputs + back
        pads.append([high, max(back, 0) if isinstance(back, int) else tf.maximum(back, 0)])
    pads.append([0, 0])
    shifted = tf.pad(dy, pads)
    for axis in (3, 2, 1):
        plan = plans[axis - 1]
        size = [-1] * 5
        size[axis] = plan.blocks
        copies = []
        for v in range(plan.blocks_per_field):
            begin = [0] * 5
            begin[axis] = plan.blocks_per_field - 1 - v
            copies.append(tf.slice(shifted, begin, tf.stack(size)))
        shifted = tf.concat(copies, axis=-1)
    return tf.reshape(shifted, [-1, math.prod(p.blocks_per_field for p in plans) * dy.shape[-1]])


def _vector(values: list) -> list | tf.Tensor:
    """``values`` as a list of ints when they all are, else stacked to one int32 tensor."""
    return values if all(isinstance(v, int) for v in values) else tf.stack(values)


def _sum_shifted_blocks(products: tf.Tensor, batch: tf.Tensor, plans: list[_AxisPlan], channels_out: int) -> tf.Tensor:
    """``y[b, i, o] = sum_v P[b, i + u_low + v, (v, o)]`` (zero outside the blocks): ``[B, n1, n2, n3, C_out]``.

    ``products`` is ``P = X W_blocked``, ``[B * Nb1 * Nb2 * Nb3, m1 m2 m3 C_out]`` (:func:`_space_to_depth_input`
    times :func:`_blocked_kernel_matrix`, columns ``(v1, v2, v3, o)``, ``v1`` slowest); this is the adjoint of
    :func:`_shifted_output_gradient`. Each of the ``m^3`` terms is one slice of ``P`` (only its valid part,
    padded to the output's size afterwards: padding ``P`` itself, or shifting it axis by axis, moves the whole
    ``m^3 C_out``-channel tensor several times and took 2-4 x longer on a 2-core AVX2 EPYC).
    """
    grid = tf.reshape(products, [batch, *(p.blocks for p in plans), products.shape[-1]])
    terms = []
    for index, offsets in enumerate(itertools.product(*(range(p.blocks_per_field) for p in plans))):
        begin, size, pads = [0], [-1], [[0, 0]]
        for plan, v in zip(plans, offsets):
            shift = plan.u_low + v  # output i reads block i + shift
            first = max(-shift, 0)  # outputs before this one read blocks before 0 (zeros)
            if isinstance(plan.outputs, int) and isinstance(plan.blocks, int):
                count = max(min(plan.outputs, plan.blocks - shift) - first, 0)
            else:
                count = tf.maximum(tf.minimum(plan.outputs, plan.blocks - shift) - first, 0)
            begin.append(first + shift)
            size.append(count)
            pads.append([first, plan.outputs - first - count])
        if any(isinstance(n, int) and n == 0 for n in size):
            continue  # a term that reads only padding
        begin.append(index * channels_out)
        size.append(channels_out)
        pads.append([0, 0])
        terms.append(tf.pad(tf.slice(grid, _vector(begin), _vector(size)), pads))
    return tf.add_n(terms)


def _blocked_kernel_matrix(kernel: tf.Tensor, plans: list[_AxisPlan], strides: tuple[int, int, int]) -> tf.Tensor:
    """The kernel ``[k1, k2, k3, C_in, C_out]`` as the blocked kernel matrix ``[S^3 C_in, m^3 C_out]``."""
    channels_in, channels_out = kernel.shape[3], kernel.shape[4]
    (m1, m2, m3), (s1, s2, s3) = (p.blocks_per_field for p in plans), strides
    pads = [
        [p.kernel_front, p.blocks_per_field * s - k - p.kernel_front]
        for p, s, k in zip(plans, strides, kernel.shape[:3])
    ]
    padded = tf.pad(kernel, [*pads, [0, 0], [0, 0]])
    blocked = tf.reshape(padded, [m1, s1, m2, s2, m3, s3, channels_in, channels_out])
    blocked = tf.transpose(blocked, [1, 3, 5, 6, 0, 2, 4, 7])
    return tf.reshape(blocked, [s1 * s2 * s3 * channels_in, m1 * m2 * m3 * channels_out])


def _kernel_from_blocked_matrix(
    matrix: tf.Tensor, kernel_size: tuple[int, int, int], plans: list[_AxisPlan], strides: tuple[int, int, int]
) -> tf.Tensor:
    """Inverse of :func:`_blocked_kernel_matrix`: ``[S^3 C_in, m^3 C_out]`` -> ``[k1, k2, k3, C_in, C_out]``."""
    (m1, m2, m3), (s1, s2, s3) = (p.blocks_per_field for p in plans), strides
    channels_in, channels_out = matrix.shape[0] // (s1 * s2 * s3), matrix.shape[1] // (m1 * m2 * m3)
    grad = tf.reshape(matrix, [s1, s2, s3, channels_in, m1, m2, m3, channels_out])
    grad = tf.transpose(grad, [4, 0, 5, 1, 6, 2, 3, 7])
    grad = tf.reshape(grad, [m1 * s1, m2 * s2, m3 * s3, channels_in, channels_out])
    (f1, f2, f3), (k1, k2, k3) = (p.kernel_front for p in plans), kernel_size
    return grad[f1 : f1 + k1, f2 : f2 + k2, f3 : f3 + k3]


def strided_conv3d(x: tf.Tensor, kernel: tf.Tensor, strides: tuple[int, int, int], padding: str = "same") -> tf.Tensor:
    """``tf.nn.conv3d(x, kernel, strides, padding)`` computed, with its gradients, by matrix products.

    Args:
        x: ``[B, N1, N2, N3, C_in]`` (batch and spatial sizes may be dynamic; ``C_in`` static).
        kernel: ``[k1, k2, k3, C_in, C_out]`` (static shape).
        strides: ``(S1, S2, S3)``.
        padding: ``'same'`` or ``'valid'``, as TensorFlow defines them.

    Returns:
        ``[B, n1, n2, n3, C_out]``, ``n = ceil(N / S)`` ('same') or ``(N - k) // S + 1`` ('valid').

    The gradients with respect to ``x`` and ``kernel`` are exact (the space-to-depth formulation in the
    module docstring); second derivatives are those of the matrix products (also exact). Static spatial sizes
    are faster (no padding of the input when ``S`` divides ``N``).
    """
    strides = _triple(strides, "strides")
    padding = _padding(padding)
    tf_strides = [1, *strides, 1]
    tf_padding = padding.upper()
    kernel_size = tuple(int(n) for n in kernel.shape[:3])
    if strides == (1, 1, 1):  # stride 1: the plain convolution and its (unstrided) gradient kernels
        return tf.nn.conv3d(x, kernel, tf_strides, tf_padding)

    @tf.custom_gradient
    def conv(x: tf.Tensor, kernel: tf.Tensor):
        shape = tf.shape(x)
        sizes = [x.shape[1 + a] if x.shape[1 + a] is not None else shape[1 + a] for a in range(3)]
        plans = [_axis_plan(sizes[a], kernel_size[a], strides[a], padding) for a in range(3)]
        blocked_x = _space_to_depth_input(x, plans, strides)  # [B Nb, S^3 C_in], kept for the kernel gradient
        blocked_kernel = _blocked_kernel_matrix(kernel, plans, strides)  # [S^3 C_in, m^3 C_out], also for dX
        products = tf.matmul(blocked_x, blocked_kernel)  # [B Nb, m^3 C_out]
        y = _sum_shifted_blocks(products, shape[0], plans, kernel.shape[-1])
        spatial = (conv_output_size(n, k, s, padding) for n, k, s in zip(x.shape[1:4], kernel_size, strides))
        y.set_shape([x.shape[0], *spatial, kernel.shape[-1]])

        def grad(dy: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            shifted = _shifted_output_gradient(dy, plans)  # [B Nb, m^3 C_out]
            kernel_grad = tf.matmul(blocked_x, shifted, transpose_a=True)  # [S^3 C_in, m^3 C_out]
            kernel_grad = _kernel_from_blocked_matrix(kernel_grad, kernel_size, plans, strides)
            input_grad = tf.matmul(shifted, blocked_kernel, transpose_b=True)
            input_grad = _depth_to_space_input(input_grad, shape[0], plans, strides, x.shape[-1])
            input_grad.set_shape(x.shape)
            kernel_grad.set_shape(kernel.shape)
            return input_grad, kernel_grad

        return y, grad

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


def space_to_depth_convolution(x: tf.Tensor, kernel: tf.Tensor, stride: int) -> tf.Tensor:
    """``tf.nn.convolution(x, kernel, strides=stride, padding='SAME')`` as space-to-depth and a stride-1 convolution.

    Args:
        x: ``[B, N_1, ..., N_r, C_in]`` with ``r`` = 1, 2 or 3 spatial axes (batch and sizes may be dynamic).
        kernel: ``[k]*r + [C_in, C_out]`` (static shape).
        stride: ``S`` on every spatial axis.

    Returns:
        ``[B, n_1, ..., n_r, C_out]``, ``n = ceil(N / S)``: TensorFlow's strided convolution, up to the order of the
        float32 sums (the same order whether the sizes are static or not).

    Per axis TensorFlow pads ``p = max((n - 1) S + k - N, 0) // 2`` zeros before the input, so output ``i`` reads
    voxels ``i S - p .. i S - p + k - 1``. With ``p`` zeros before the input and zeros after it up to
    ``(n + m - 1) S`` voxels, ``m = ceil(k / S)``, that is blocks ``i .. i + m - 1`` of ``S`` voxels. The blocks
    become ``S^r C_in`` channels, the kernel (zeros after its taps up to ``m S``) ``[m]*r + [S^r C_in, C_out]``,
    and a stride-1 'VALID' convolution of the two is the strided convolution. Its gradients are stride-1
    convolution gradients and the adjoints of pad, reshape and transpose. Where ``C_in`` is small its forward is
    faster than TensorFlow's strided kernel on CPU (the MD-GRUs' first-level input convolutions of 2-channel
    windows, ``docs/BENCH_STRIDED_CONV.md``); with many channels it is slower (``(m S / k)^r`` times the
    multiply-adds), and so is its weight gradient.
    """
    rank = len(x.shape) - 2
    shape = tf.shape(x)
    sizes = [n if n is not None else shape[1 + a] for a, n in enumerate(x.shape[1:-1])]
    kernel_size = [int(n) for n in kernel.shape[:rank]]
    channels_in, channels_out = int(x.shape[-1]), int(kernel.shape[-1])
    fields = [(k - 1) // stride + 1 for k in kernel_size]  # m per axis
    outputs = [(n + stride - 1) // stride for n in sizes]
    fronts = [_maximum((o - 1) * stride + k - n, 0) // 2 for o, k, n in zip(outputs, kernel_size, sizes)]
    blocks = [o + m - 1 for o, m in zip(outputs, fields)]
    padded = tf.pad(x, [[0, 0], *[[f, b * stride - f - n] for f, b, n in zip(fronts, blocks, sizes)], [0, 0]])
    grid = tf.reshape(padded, [-1, *[v for b in blocks for v in (b, stride)], channels_in])
    order = [0, *range(1, 2 * rank, 2), *range(2, 2 * rank + 1, 2), 2 * rank + 1]
    grid = tf.reshape(tf.transpose(grid, order), [-1, *blocks, stride**rank * channels_in])
    blocked = tf.pad(kernel, [*[[0, m * stride - k] for m, k in zip(fields, kernel_size)], [0, 0], [0, 0]])
    blocked = tf.reshape(blocked, [*[v for m in fields for v in (m, stride)], channels_in, channels_out])
    order = [*range(0, 2 * rank, 2), *range(1, 2 * rank, 2), 2 * rank, 2 * rank + 1]
    blocked = tf.reshape(tf.transpose(blocked, order), [*fields, stride**rank * channels_in, channels_out])
    return tf.nn.convolution(grid, blocked, padding="VALID")


def _maximum(value: int | tf.Tensor, floor: int) -> int | tf.Tensor:
    return max(value, floor) if isinstance(value, int) else tf.maximum(value, floor)


# ---------------------------------------------------------------------------------------------------------
# layers


@keras.saving.register_keras_serializable(package="mdgru_keras")
class StridedConv3D(keras.layers.Layer):
    """3D convolution (``keras.layers.Conv3D``, channels last, linear) without TensorFlow's strided conv3d kernels.

    The output is ``keras.layers.Conv3D``'s; the forward pass and the gradients with respect to the input and
    the kernel are computed exactly by matrix products in a space-to-depth formulation (:func:`strided_conv3d`;
    the derivation is in the module docstring) instead of TensorFlow's strided ``Conv3D``,
    ``Conv3DBackpropFilterV2`` and ``Conv3DBackpropInputV2`` kernels, which are slow on CPUs without AVX-512
    when the stride is > 1 (the gradients hundreds of times slower than the forward: 16.8 s against 0.03 s
    for the tiny preset's coarse input convolution at batch 8 on a 2-core AVX2 EPYC). With stride 1 it is
    the plain convolution.

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
    padding = _padding(padding)
    plans = [_axis_plan(int(n), k, s, padding) for n, k, s in zip(spatial, kernel_size, strides)]
    outputs = math.prod(p.outputs for p in plans)
    direct = 2.0 * batch * outputs * math.prod(kernel_size) * channels_in * channels_out
    rows = batch * math.prod(p.blocks for p in plans)
    columns = math.prod(p.blocks_per_field for p in plans) * channels_out
    blocked = 2.0 * rows * math.prod(strides) * channels_in * columns
    return {"direct": direct, "blocked": blocked}
