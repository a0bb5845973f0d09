"""Benchmark of the models' strided convolutions: TensorFlow's kernels against the formulations that replace them.

Run: ``python -m bench.bench_strided_conv [--repeats 5] [--cases tiny,cpu,unet_up1,unet_up0,...]``
(``make bench-strided-conv``); writes ``bench/results/bench_strided_conv.json``. ``--cases paper`` adds the
paper preset's coarse input convolution (256^3 x 2, batch 1: about 0.7 GB of temporaries; not in the default).

Cases:
- ``tiny`` / ``cpu`` / ``paper``: the coarse input convolution (filter 2S + 1, stride S, 'same') of the preset
  at batch 8 (tiny: 32^3 x 2, S = 4, 8 channels; cpu: 160^3 x 2, S = 5, 8 channels) or 1 (paper: 256^3 x 2,
  S = 4, 16 channels): ``keras.layers.Conv3D`` against :class:`~mdgru_keras.layers.StridedConv3D`.
- ``unet_up1`` / ``unet_up0``: the U-Net baseline's 2x2x2 stride-2 upsampling layers for the cpu preset's
  32^3 fine window (3 levels, 8/16/32 filters, batch 8): ``keras.layers.Conv3DTranspose`` against
  :class:`~mdgru_keras.layers.StridedConv3DTranspose`.
- ``mdgru_fine0`` / ``mdgru_fine0_train`` / ``mdgru_fine1`` / ``mdgru_coarse0``: an MD-GRU direction's input
  gates (:func:`~mdgru_keras.layers.cgru.input_gates`: three 'same' 3x3 convolutions of ``units`` channels with
  stride 2 on every slice, time folded into the batch) of the afids preset, ``method="strided"`` (TensorFlow's
  kernel) against ``method="space_to_depth"``: the fine trunk's first level on the 32 windows of a first pass
  (32 steps x 32 windows of 32^2 x 2) and on a training batch (8 windows), its second level (16 x 32 of
  16^2 x 16, 32 units), the coarse trunk's first level on a training batch (32 x 8 of 32^2 x 8). The layers
  choose space-to-depth by the channels (``SPACE_TO_DEPTH_MAX_CHANNELS``): only the first two cases take it.

Timed with ``tf.function`` on whatever device TensorFlow picks, as in ``bench/bench_layer.py`` (its helpers:
machine info, median of ``--repeats`` runs after two warm-ups, wall clock and process CPU time, a 2048^2
matmul's GFLOP/s before and after the cases). ``forward``: the layer's output. ``forward+backward``: the
gradient of ``sum(y * dy)`` with respect to the weights (the coarse input convolution is the network's first
layer: no input gradient) and ``forward+backward+input``: also with respect to the input (inner layers, the
U-Net's). Both implementations start from the same weights; the largest relative difference of their
gradients is recorded as a check.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.bench_layer import (  # noqa: E402
    load_average,
    machine_info,
    matmul_gflops,
    medians,
    time_function,
    write_json_atomic,
)
from mdgru_keras.layers import StridedConv3D, StridedConv3DTranspose  # noqa: E402
from mdgru_keras.layers.cgru import input_gates  # noqa: E402
from mdgru_keras.layers.strided_conv import strided_conv3d_flops  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_strided_conv.json"

CASES = {
    "tiny": {"kind": "conv", "shape": (8, 32, 32, 32, 2), "filter": 9, "strides": 4, "filters": 8},
    "cpu": {"kind": "conv", "shape": (8, 160, 160, 160, 2), "filter": 11, "strides": 5, "filters": 8},
    "paper": {"kind": "conv", "shape": (1, 256, 256, 256, 2), "filter": 9, "strides": 4, "filters": 16},
    "unet_up1": {"kind": "transpose", "shape": (8, 8, 8, 8, 32), "filter": 2, "strides": 2, "filters": 16},
    "unet_up0": {"kind": "transpose", "shape": (8, 16, 16, 16, 16), "filter": 2, "strides": 2, "filters": 8},
    # MD-GRU input gates, shape [T, B, slice, slice, C]; "filters" = units (3 gates of them)
    "mdgru_fine0": {"kind": "gates", "shape": (32, 32, 32, 32, 2), "filter": 3, "strides": 2, "filters": 8},
    "mdgru_fine0_train": {"kind": "gates", "shape": (32, 8, 32, 32, 2), "filter": 3, "strides": 2, "filters": 8},
    "mdgru_fine1": {"kind": "gates", "shape": (16, 32, 16, 16, 16), "filter": 3, "strides": 2, "filters": 32},
    "mdgru_coarse0": {"kind": "gates", "shape": (32, 8, 32, 32, 8), "filter": 3, "strides": 2, "filters": 8},
}
DEFAULT_CASES = (
    "tiny",
    "cpu",
    "unet_up1",
    "unet_up0",
    "mdgru_fine0",
    "mdgru_fine0_train",
    "mdgru_fine1",
    "mdgru_coarse0",
)


class InputGates(keras.layers.Layer):
    """One MD-GRU direction's input gates (:func:`input_gates`) with a fixed ``method``, concatenated:
    ``[T, B, s, s, C]`` -> ``[T, B, s / S, s / S, 3 units]``."""

    def __init__(self, units: int, kernel_size: int, strides: int, method: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.units, self.kernel_size, self.strides, self.method = units, kernel_size, strides, method

    def build(self, input_shape: tuple) -> None:
        shape = (self.kernel_size, self.kernel_size, input_shape[-1], 3 * self.units)
        self.kernel = self.add_weight(name="kernel", shape=shape, initializer="glorot_uniform")
        self.bias = self.add_weight(name="bias", shape=(3 * self.units,), initializer="zeros")

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        slices = [-(-n // self.strides) for n in input_shape[2:-1]]
        return (*input_shape[:2], *slices, 3 * self.units)

    def call(self, x: tf.Tensor) -> tf.Tensor:
        gates = input_gates(
            x, tf.convert_to_tensor(self.kernel), tf.convert_to_tensor(self.bias), self.strides, self.method
        )
        return tf.concat(gates, axis=-1)


def make_layers(case: dict) -> tuple[keras.layers.Layer, keras.layers.Layer]:
    """``(tensorflow_layer, new_layer)`` built on the case's input, with the same kernel and bias."""
    k, s, filters = case["filter"], case["strides"], case["filters"]
    if case["kind"] == "conv":
        plain = keras.layers.Conv3D(filters, k, strides=s, padding="same")
        new = StridedConv3D(filters, k, strides=s, padding="same")
    elif case["kind"] == "gates":
        plain = InputGates(filters, k, s, "strided")
        new = InputGates(filters, k, s, "space_to_depth")
    else:
        plain = keras.layers.Conv3DTranspose(filters, k, strides=s)
        new = StridedConv3DTranspose(filters, k, strides=s)
    plain.build(case["shape"])
    new.build(case["shape"])
    kernel = plain.get_weights()[0]
    bias = np.random.default_rng(0).normal(size=plain.get_weights()[1].shape).astype(np.float32)
    plain.set_weights([kernel, bias])
    new.set_weights([kernel, bias])
    return plain, new


def case_flops(case: dict) -> dict[str, float]:
    """GFLOP of the forward pass and of one gradient: direct convolution and the new layer's matmul form."""
    batch, *spatial, channels = case["shape"]
    if case["kind"] == "conv":
        flops = strided_conv3d_flops(case["shape"], case["filter"], case["strides"], case["filters"])
        return {"forward_gflop": flops["direct"] / 1e9, "matmul_gradient_gflop": flops["blocked"] / 1e9}
    if case["kind"] == "gates":  # per output voxel: k^2 taps (strided) or m^2 S^2 (space-to-depth) of C inputs
        steps, batch, *slices, channels = case["shape"]
        k, stride = case["filter"], case["strides"]
        outputs = steps * batch * np.prod([-(-n // stride) for n in slices]) * 3 * case["filters"]
        blocked_taps = (((k - 1) // stride + 1) * stride) ** len(slices)
        return {
            "forward_gflop": 2.0 * outputs * k ** len(slices) * channels / 1e9,
            "space_to_depth_gflop": 2.0 * outputs * blocked_taps * channels / 1e9,
        }
    # filter = stride: every input voxel times a [C_in, S^3 C_out] matrix, forward and each gradient alike
    forward = 2.0 * batch * np.prod(spatial) * channels * case["strides"] ** 3 * case["filters"]
    return {"forward_gflop": forward / 1e9, "matmul_gradient_gflop": forward / 1e9}


def time_layer(layer: keras.layers.Layer, x: tf.Tensor, dy: tf.Tensor, repeats: int) -> tuple[dict, dict]:
    """Timings of forward, forward+backward (weights) and forward+backward+input; the gradients of the last."""
    forward = tf.function(lambda: layer(x))

    def gradient_function(with_input: bool):
        @tf.function
        def run():
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(layer(x) * dy)
            return tape.gradient(loss, [*layer.trainable_weights, *([x] if with_input else [])])

        return run

    weights, weights_input = gradient_function(False), gradient_function(True)
    times = {
        "forward": time_function(lambda: forward().numpy(), repeats),
        "forward_backward": time_function(lambda: [g.numpy() for g in weights()], repeats),
        "forward_backward_input": time_function(lambda: [g.numpy() for g in weights_input()], repeats),
    }
    return times, {"gradients": [g.numpy() for g in weights_input()]}


def run_case(name: str, case: dict, repeats: int) -> dict:
    x = tf.random.normal(case["shape"], seed=3)
    plain, new = make_layers(case)
    dy = tf.random.normal(tf.shape(plain(x)), seed=4)
    result = {
        **{key: (list(v) if isinstance(v, tuple) else v) for key, v in case.items()},
        "output_shape": list(plain.compute_output_shape(case["shape"])),
        **case_flops(case),
    }
    gradients = {}
    for label, layer in (("tensorflow", plain), ("new", new)):
        start = time.perf_counter()
        times, extra = time_layer(layer, x, dy, repeats)
        gradients[label] = extra["gradients"]
        result[label] = {
            **{f"{part}_{clock}_s": value for part, t in times.items() for clock, value in medians(t).items()},
            "times_s": times,
            "total_wall_s": time.perf_counter() - start,
        }
        m = result[label]
        print(
            f"{name} {label}: forward {m['forward_wall_s'] * 1e3:.1f} ms wall / {m['forward_cpu_s'] * 1e3:.1f} ms "
            f"CPU; forward+backward {m['forward_backward_wall_s'] * 1e3:.1f} / {m['forward_backward_cpu_s'] * 1e3:.1f}"
            f" ms; with input gradient {m['forward_backward_input_wall_s'] * 1e3:.1f} / "
            f"{m['forward_backward_input_cpu_s'] * 1e3:.1f} ms",
            flush=True,
        )
    result["gradient_max_relative_difference"] = max(
        float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))
        for a, b in zip(gradients["tensorflow"], gradients["new"])
    )
    for part in ("forward", "forward_backward", "forward_backward_input"):
        for clock in ("wall", "cpu"):
            key = f"{part}_{clock}_s"
            result[f"speedup_{part}_{clock}"] = result["tensorflow"][key] / result["new"][key]
    print(
        f"{name}: forward+backward {result['speedup_forward_backward_cpu']:.2f}x faster in CPU time "
        f"(with input gradient {result['speedup_forward_backward_input_cpu']:.2f}x); "
        f"gradients agree to {result['gradient_max_relative_difference']:.1e}",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help="comma-separated subset of " + ",".join(CASES))
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON path")
    args = parser.parse_args()
    names = args.cases.split(",")
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")

    result = {"machine": machine_info(), "load_average_start": load_average(), "repeats": args.repeats}
    print(
        f"machine: {result['machine']['cpu']}, {result['machine']['cpu_count']} CPUs, "
        f"GPU: {result['machine']['gpu'] or 'none'}, load average {result['load_average_start']}",
        flush=True,
    )
    matmul_before = matmul_gflops(args.repeats)
    print(
        f"matmul 2048^2 float32: {matmul_before['gflops_per_s']:.0f} GFLOP/s wall, "
        f"{matmul_before['gflops_per_cpu_s']:.0f} GFLOP per CPU-s",
        flush=True,
    )
    result["cases"] = {name: run_case(name, CASES[name], args.repeats) for name in names}
    matmul_after = matmul_gflops(args.repeats)
    print(
        f"matmul 2048^2 float32 (after): {matmul_after['gflops_per_s']:.0f} GFLOP/s wall, "
        f"{matmul_after['gflops_per_cpu_s']:.0f} GFLOP per CPU-s",
        flush=True,
    )
    result["matmul"] = {
        "before": matmul_before,
        "after": matmul_after,
        "gflops_per_s": statistics.median([matmul_before["gflops_per_s"], matmul_after["gflops_per_s"]]),
        "gflops_per_cpu_s": statistics.median([matmul_before["gflops_per_cpu_s"], matmul_after["gflops_per_cpu_s"]]),
    }
    result["load_average_end"] = load_average()
    write_json_atomic(args.output, result)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
