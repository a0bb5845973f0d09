"""The sequential part of a C-GRU: the state recursion over precomputed input gates.

The equations (``h_0 = 0``)::

    r_t = sigmoid(g_r[t] + (h_{t-1} * u)_r)
    z_t = sigmoid(g_z[t] + (h_{t-1} * u)_z)
    c_t = tanh(g_h[t] + r_t ⊙ (h_{t-1} * u)_h)
    h_t = z_t ⊙ h_{t-1} + (1 - z_t) ⊙ c_t

run in a ``tf.while_loop`` with a hand-written backpropagation through time (:func:`tf.custom_gradient`):
one transposed state convolution and a few small products per step, and the state-kernel gradient as one
convolution-filter gradient over all steps at once. (TensorFlow's automatic gradient of the loop is 2-3x
slower: it differentiates the per-step reads of the gate tensors as full-size updates.)

With ``keep_for_gradient`` (training) the forward loop also keeps ``r, z, c`` and ``(h * u)_h`` of every step
(references to tensors the step computes anyway, no copies); without it (inference) nothing is kept and a
backward pass, if one is asked for, recomputes them step by step (one more state convolution per step).

``*`` is a stride-1 'SAME' convolution over the (d-1) slice axes; ``u`` is ``[k]*(d-1) + [U, 3U]`` with the
gates (r, z, h~) along its last axis.
"""

from __future__ import annotations

import tensorflow as tf


def gru_recursion(
    gates_r: tf.Tensor,
    gates_z: tf.Tensor,
    gates_h: tf.Tensor,
    state_kernel: tf.Tensor,
    reverse: bool = False,
    keep_for_gradient: bool = False,
) -> tf.Tensor:
    """Run the GRU state recursion.

    Args:
        gates_r, gates_z, gates_h: input gates (input convolution plus bias), each ``[T, B, s..., U]``.
        state_kernel: ``[k]*(d-1) + [U, 3U]``.
        reverse: process t = T-1 .. 0 instead of 0 .. T-1.
        keep_for_gradient: keep the per-step gate values for a fast backward pass (training).

    Returns:
        The states ``h_t``, ``[T, B, s..., U]``, in time order (also when ``reverse``).
    """

    @tf.custom_gradient
    def recursion(gates_r, gates_z, gates_h, state_kernel):
        gates = (gates_r, gates_z, gates_h)
        states, kept = _forward(gates, state_kernel, reverse, keep_for_gradient)

        def grad(d_states):
            return _backward(gates, states, kept, d_states, state_kernel, reverse)

        return states, grad

    return recursion(gates_r, gates_z, gates_h, state_kernel)


def _state_convolution(h: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    return tf.nn.convolution(h, kernel, padding="SAME")


def _transposed_state_kernel(kernel: tf.Tensor) -> tf.Tensor:
    """``u`` ``[k.., U, 3U]`` flipped in space, in/out swapped: ``[k.., 3U, U]``; convolving with it is ``u^T *``."""
    spatial = list(range(len(kernel.shape) - 2))
    return tf.transpose(tf.reverse(kernel, spatial), spatial + [len(spatial) + 1, len(spatial)])


def _state_convolution_input_gradient(d_u: tf.Tensor, transposed_kernel: tf.Tensor) -> tf.Tensor:
    """Gradient of :func:`_state_convolution` with respect to its input: ``u^T * d_u``.

    A forward convolution with the flipped kernel (faster on CPU than ``conv_transpose``); 'SAME' pads
    ``(k-1)//2`` before and the rest after, so the gradient pads the other way round (equal for odd k).
    """
    sizes = transposed_kernel.shape[:-2]
    if all(k % 2 == 1 for k in sizes):
        return tf.nn.convolution(d_u, transposed_kernel, padding="SAME")
    pads = [[k - 1 - (k - 1) // 2, (k - 1) // 2] for k in sizes]
    if len(sizes) == 1:  # 1D slices: as 2D with a unit axis
        out = tf.nn.conv2d(d_u[:, None], transposed_kernel[None], 1, [[0, 0], [0, 0], *pads, [0, 0]])
        return out[:, 0]
    return tf.nn.conv2d(d_u, transposed_kernel, 1, [[0, 0], *pads, [0, 0]])


def _state_convolution_kernel_gradient(h: tf.Tensor, d_u: tf.Tensor, kernel_shape: tf.TensorShape) -> tf.Tensor:
    """Gradient of :func:`_state_convolution` with respect to its kernel; ``h`` ``[N, s..., U]``, 1 or 2 slice axes."""
    if len(h.shape) == 3:  # 1D slices: as 2D with a unit axis
        grad = tf.compat.v1.nn.conv2d_backprop_filter(
            h[:, None], [1, *kernel_shape], d_u[:, None], strides=[1, 1, 1, 1], padding="SAME"
        )
        return grad[0]
    return tf.compat.v1.nn.conv2d_backprop_filter(h, kernel_shape, d_u, strides=[1, 1, 1, 1], padding="SAME")


def _step_index(i: tf.Tensor, steps: tf.Tensor, reverse: bool) -> tf.Tensor:
    """Time index of the ``i``-th processed step."""
    return steps - 1 - i if reverse else i


def _first_step(gates_z: tf.Tensor, gates_h: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The step from ``h_0 = 0``: the state convolution and r drop out, ``h = (1 - z) ⊙ tanh(g_h)``.

    Returns (z, c, h)."""
    z = tf.sigmoid(gates_z)
    c = tf.tanh(gates_h)
    return z, c, c - z * c


def _gate_values(gates_t, h: tf.Tensor, state_kernel: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """r, z, c and (h * u)_h of one step from ``h = h_{t-1}``."""
    gate_r, gate_z, gate_h = gates_t
    u_r, u_z, u_h = tf.split(_state_convolution(h, state_kernel), 3, axis=-1)
    r = tf.sigmoid(gate_r + u_r)
    z = tf.sigmoid(gate_z + u_z)
    c = tf.tanh(gate_h + r * u_h)
    return r, z, c, u_h


def _forward(gates, state_kernel, reverse: bool, keep: bool):
    """The recursion; with ``keep`` also TensorArrays of r, z, c and (h * u)_h per step (time-indexed)."""
    steps = tf.shape(gates[0])[0]
    dtype = gates[0].dtype
    element_shape = gates[0].shape[1:]

    def array():
        return tf.TensorArray(dtype, size=steps, element_shape=element_shape)

    first = _step_index(tf.constant(0), steps, reverse)
    z, c, h = _first_step(gates[1][first], gates[2][first])
    states = array().write(first, h)
    kept = ()
    if keep:  # r and (h * u)_h of the first step are never needed: h_0 = 0
        kept = (array(), array().write(first, z), array().write(first, c), array())

    def body(i, h, states, *kept):
        t = _step_index(i, steps, reverse)
        values = _gate_values([g[t] for g in gates], h, state_kernel)
        _, z, c, _ = values
        h = c + z * (h - c)  # = z h_{t-1} + (1 - z) c
        kept = tuple(a.write(t, v) for a, v in zip(kept, values))
        return (i + 1, h, states.write(t, h)) + kept

    result = tf.while_loop(lambda i, *_: i < steps, body, (tf.constant(1), h, states) + kept)
    return result[2].stack(), (result[3:] if keep else None)


def _backward(gates, states, kept, d_states, state_kernel, reverse: bool):
    """Backpropagation through time; returns the gradients of gates r, z, h and of the state kernel.

    Per step t (processing order reversed), with ``dh`` the total gradient of ``h_t``::

        dc  = dh ⊙ (1 - z),            dh~ = dc ⊙ (1 - c²)          (pre-activation of h~)
        dz~ = dh ⊙ (h_{t-1} - c) ⊙ z (1 - z)
        dr~ = dh~ ⊙ (h_{t-1} * u)_h ⊙ r (1 - r)
        dU  = [dr~, dz~, dh~ ⊙ r]      (gradient of h_{t-1} * u)
        dh_{t-1} += dh ⊙ z + u^T * dU

    The gate gradients are ``dr~, dz~, dh~``; the kernel gradient sums ``h_{t-1} ⋆ dU`` over all steps in one op.
    ``kept``: the forward's TensorArrays of r, z, c, (h * u)_h, or None to recompute them per step.
    """
    steps = tf.shape(states)[0]
    dtype = states.dtype
    element_shape = states.shape[1:]
    transposed_kernel = _transposed_state_kernel(state_kernel)

    def array(size):
        return tf.TensorArray(dtype, size=size, element_shape=element_shape)

    def body(i, carry, d_r, d_z, d_h, d_us):
        t = _step_index(i, steps, reverse)
        previous = states[t + 1] if reverse else states[t - 1]
        if kept is None:
            r, z, c, u_h = _gate_values([g[t] for g in gates], previous, state_kernel)
        else:
            r, z, c, u_h = (a.read(t) for a in kept)
        dh = d_states[t] + carry
        dh_z = dh * z
        d_pre_h = tf.raw_ops.TanhGrad(y=c, dy=dh - dh_z)
        d_pre_z = tf.raw_ops.SigmoidGrad(y=z, dy=dh * (previous - c))
        d_pre_r = tf.raw_ops.SigmoidGrad(y=r, dy=d_pre_h * u_h)
        d_u = tf.concat([d_pre_r, d_pre_z, d_pre_h * r], axis=-1)
        carry = dh_z + _state_convolution_input_gradient(d_u, transposed_kernel)
        d_u_index = t if reverse else t - 1  # pairs with states[:-1] (forward) or states[1:] (reverse)
        return (
            i - 1,
            carry,
            d_r.write(t, d_pre_r),
            d_z.write(t, d_pre_z),
            d_h.write(t, d_pre_h),
            d_us.write(d_u_index, d_u),
        )

    d_u_array = tf.TensorArray(dtype, size=steps - 1, element_shape=element_shape[:-1].concatenate([None]))
    loop_vars = (steps - 1, tf.zeros_like(states[0]), array(steps), array(steps), array(steps), d_u_array)
    _, carry, d_r, d_z, d_h, d_us = tf.while_loop(lambda i, *_: i > 0, body, loop_vars)

    # The first step: h_1 = (1 - z) ⊙ c with c = tanh(g_h), no r and no state convolution.
    first = _step_index(tf.constant(0), steps, reverse)
    if kept is None:
        z, c, _ = _first_step(gates[1][first], gates[2][first])
    else:
        z, c = kept[1].read(first), kept[2].read(first)
    dh = d_states[first] + carry
    d_r = d_r.write(first, tf.zeros_like(dh))
    d_z = d_z.write(first, tf.raw_ops.SigmoidGrad(y=z, dy=-dh * c))
    d_h = d_h.write(first, tf.raw_ops.TanhGrad(y=c, dy=dh - dh * z))

    previous = states[1:] if reverse else states[:-1]
    kernel_shape = state_kernel.shape

    def kernel_gradient():
        d_u = d_us.stack()
        return _state_convolution_kernel_gradient(_fold_time(previous), _fold_time(d_u), kernel_shape)

    d_kernel = tf.cond(steps > 1, kernel_gradient, lambda: tf.zeros_like(state_kernel))
    return d_r.stack(), d_z.stack(), d_h.stack(), d_kernel


def _fold_time(x: tf.Tensor) -> tf.Tensor:
    """``[T, B, ...]`` -> ``[T * B, ...]``."""
    shape = tf.shape(x)
    return tf.reshape(x, tf.concat([[shape[0] * shape[1]], shape[2:]], axis=0))
