"""Benchmark of one MD-GRU layer: forward and forward+backward time, analytic GFLOP and GFLOP/s.

Run: ``python -m bench.bench_layer [--repeats 7] [--cases a,b3,b7] [--no-filter-study]`` (``make bench-layer``).
Writes ``bench/results/bench_layer.json``.

Cases (32 units, batch 1):
- ``a``: the paper's first layer, input 64^3 x 2 channels, stride 2, 3x3 filters;
- ``b3`` / ``b7``: 32^3 x 16 channels, stride 1, 3x3 / 7x7 filters.

Timed with ``tf.function`` on whatever device TensorFlow picks (CPU or GPU, no code change): the median of
``--repeats`` runs after two warm-up runs. ``forward`` is inference (``training=False``); ``forward+backward``
is a training step's gradient (``training=True``: DropConnect masks and the hand-written BPTT) of the sum of
the outputs with respect to the weights (the first layer, case a, needs no input gradient) and, for the inner
layers b, also the input. The GFLOP/s of a 2048x2048 float32 matmul is measured in the same run, before and
after the layer cases. The filter-size study trains a tiny 3D task with 3x3, 5x5 and 7x7 filters.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from mdgru_keras.layers import MDGRU  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_layer.json"

CASES = {
    "a": {"shape": (1, 64, 64, 64, 2), "strides": 2, "filter": 3, "input_gradient": False},
    "b3": {"shape": (1, 32, 32, 32, 16), "strides": 1, "filter": 3, "input_gradient": True},
    "b7": {"shape": (1, 32, 32, 32, 16), "strides": 1, "filter": 7, "input_gradient": True},
}
UNITS = 32


def mdgru_flops(shape: tuple, strides: int, input_filter: int, state_filter: int, units: int) -> dict[str, float]:
    """Forward FLOPs (2 per multiply-add) of the convolutions of one MD-GRU, summed over its 2d C-GRUs.

    The state convolution of the first step is not counted: it meets h_0 = 0 and is skipped. Gate
    nonlinearities and products (a few FLOPs per state value) are left out.
    """
    batch, *spatial, channels = shape
    sub = [-(-n // strides) for n in spatial]
    d = len(spatial)
    input_flops = state_flops = 0.0
    for axis in range(d):
        steps = spatial[axis]
        slice_voxels = float(np.prod([n for i, n in enumerate(sub) if i != axis]))
        per_input = 2.0 * input_filter ** (d - 1) * channels * 3 * units
        per_state = 2.0 * state_filter ** (d - 1) * units * 3 * units
        input_flops += 2 * batch * steps * slice_voxels * per_input  # forward and backward C-GRU
        state_flops += 2 * batch * (steps - 1) * slice_voxels * per_state
    return {"input": input_flops, "state": state_flops}


def backward_flops(flops: dict[str, float], input_gradient: bool) -> float:
    """Convolution FLOPs of the backward pass: kernel gradients (input and state), the state-input gradient
    in the recursion, and the input gradient of the input convolutions when asked for."""
    return flops["input"] * (2 if input_gradient else 1) + 2 * flops["state"]


def time_function(fn, repeats: int, warmup: int = 2) -> list[float]:
    """Wall-clock seconds of ``fn()`` (which must return host values, forcing device sync)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def matmul_gflops(repeats: int, size: int = 2048) -> dict:
    a = tf.random.normal([size, size], seed=1)
    b = tf.random.normal([size, size], seed=2)
    matmul = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
    times = time_function(lambda: matmul().numpy(), repeats)
    median = statistics.median(times)
    return {"size": size, "median_s": median, "times_s": times, "gflops_per_s": 2.0 * size**3 / median / 1e9}


def run_case(name: str, case: dict, repeats: int) -> dict:
    k = case["filter"]
    layer = MDGRU(UNITS, strides=case["strides"], input_filter=k, state_filter=k, seed=0)
    x = tf.random.normal(case["shape"], seed=3)
    layer(x)
    forward = tf.function(lambda: layer(x, training=False))
    forward_train = tf.function(lambda: layer(x, training=True))

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True))
        sources = layer.trainable_weights + ([x] if case["input_gradient"] else [])
        return tape.gradient(loss, sources)

    t_forward = time_function(lambda: forward().numpy(), repeats)
    t_forward_train = time_function(lambda: forward_train().numpy(), repeats)
    t_backward = time_function(lambda: [g.numpy() for g in forward_backward()], repeats)
    flops = mdgru_flops(case["shape"], case["strides"], k, k, UNITS)
    forward_gflop = (flops["input"] + flops["state"]) / 1e9
    total_gflop = forward_gflop + backward_flops(flops, case["input_gradient"]) / 1e9
    fwd, fwd_bwd = statistics.median(t_forward), statistics.median(t_backward)
    result = {
        **{key: (list(v) if isinstance(v, tuple) else v) for key, v in case.items()},
        "units": UNITS,
        "output_shape": list(layer.compute_output_shape(case["shape"])),
        "forward_gflop": forward_gflop,
        "forward_backward_gflop": total_gflop,
        "forward_s": fwd,
        "forward_training_s": statistics.median(t_forward_train),
        "forward_backward_s": fwd_bwd,
        "forward_gflops_per_s": forward_gflop / fwd,
        "forward_backward_gflops_per_s": total_gflop / fwd_bwd,
        "backward_ratio": fwd_bwd / fwd,
        "times_s": {"forward": t_forward, "forward_training": t_forward_train, "forward_backward": t_backward},
    }
    print(
        f"{name}: {case['shape']} S={case['strides']} k={k}: forward {fwd * 1e3:.0f} ms "
        f"({forward_gflop:.1f} GFLOP, {result['forward_gflops_per_s']:.0f} GFLOP/s), forward+backward "
        f"{fwd_bwd * 1e3:.0f} ms ({total_gflop:.1f} GFLOP, {result['forward_backward_gflops_per_s']:.0f} GFLOP/s), "
        f"ratio {result['backward_ratio']:.2f}",
        flush=True,
    )
    return result


def sphere_or_cube_volumes(rng: np.random.Generator, count: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Noisy volumes with one ball and one cube of similar volume; the label marks the ball's voxels.

    Telling the two shapes apart needs context of the objects' size, so the task reacts to filter sizes.
    """
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).astype(np.float32)
    volumes = np.zeros((count, size, size, size, 1), np.float32)
    labels = np.zeros((count, size, size, size, 1), np.float32)
    for i in range(count):
        radius = rng.uniform(2.5, 3.5)
        half = radius * 0.8
        while True:
            ball, cube = rng.uniform(4, size - 4, size=(2, 3))
            if np.abs(ball - cube).max() > 2 * radius + 1:
                break
        in_ball = np.linalg.norm(grid - ball, axis=-1) <= radius
        in_cube = np.abs(grid - cube).max(axis=-1) <= half
        volumes[i, ..., 0] = in_ball | in_cube
        labels[i, ..., 0] = in_ball
    volumes += rng.normal(0.0, 0.3, volumes.shape).astype(np.float32)
    return volumes, labels


def filter_study(filters=(3, 5, 7), seeds=(0, 1), steps: int = 150) -> dict:
    """Train MD-GRU(8) -> MD-GRU(8) -> 1x1 head on :func:`sphere_or_cube_volumes` with each filter size."""
    rng = np.random.default_rng(0)
    train_x, train_y = sphere_or_cube_volumes(rng, 64)
    val_x, val_y = sphere_or_cube_volumes(rng, 32)
    runs = []
    for k in filters:
        for seed in seeds:
            keras.utils.set_random_seed(seed)
            inputs = keras.Input((16, 16, 16, 1))
            h = MDGRU(8, input_filter=k, state_filter=k, dropconnect=0.0, seed=seed)(inputs)
            h = MDGRU(8, input_filter=k, state_filter=k, dropconnect=0.0, seed=seed + 100)(h)
            outputs = keras.layers.Dense(1)(h)
            model = keras.Model(inputs, outputs)
            model.compile(keras.optimizers.Adam(3e-3), keras.losses.BinaryCrossentropy(from_logits=True))
            dataset = tf.data.Dataset.from_tensor_slices((train_x, train_y)).repeat().shuffle(64, seed=seed).batch(4)
            start = time.perf_counter()
            model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0)
            train_s = time.perf_counter() - start
            logits = model.predict(val_x, batch_size=8, verbose=0)
            predicted = logits > 0
            truth = val_y > 0.5
            dice = 2 * np.sum(predicted & truth) / (np.sum(predicted) + np.sum(truth))
            loss = float(keras.losses.BinaryCrossentropy(from_logits=True)(val_y, logits))
            runs.append({"filter": k, "seed": seed, "val_dice": float(dice), "val_loss": loss, "train_s": train_s})
            print(f"filter study: k={k} seed={seed}: val dice {dice:.3f}, loss {loss:.3f}, {train_s:.0f} s", flush=True)
    summary = {
        k: {
            "val_dice_mean": float(np.mean([r["val_dice"] for r in runs if r["filter"] == k])),
            "val_loss_mean": float(np.mean([r["val_loss"] for r in runs if r["filter"] == k])),
            "train_s_mean": float(np.mean([r["train_s"] for r in runs if r["filter"] == k])),
        }
        for k in filters
    }
    return {
        "task": sphere_or_cube_volumes.__doc__.split("\n")[0],
        "steps": steps,
        "batch": 4,
        "runs": runs,
        "summary": summary,
    }


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "devices": [d.name + " " + d.device_type for d in tf.config.list_physical_devices()],
        "gpu": [
            tf.config.experimental.get_device_details(d).get("device_name", d.name)
            for d in tf.config.list_physical_devices("GPU")
        ],
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
    }


def load_average() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median reported)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    parser.add_argument("--no-filter-study", action="store_true", help="skip the 3x3/5x5/7x7 training study")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    result = {"machine": machine_info(), "load_average_start": load_average(), "repeats": args.repeats}
    print(
        f"machine: {result['machine']['cpu']}, {result['machine']['cpu_count']} CPUs, "
        f"GPU: {result['machine']['gpu'] or 'none'}, load average {result['load_average_start']}",
        flush=True,
    )
    matmul_before = matmul_gflops(args.repeats)
    print(f"matmul 2048^2 float32: {matmul_before['gflops_per_s']:.0f} GFLOP/s", flush=True)
    result["cases"] = {name: run_case(name, CASES[name], args.repeats) for name in args.cases.split(",")}
    matmul_after = matmul_gflops(args.repeats)
    print(f"matmul 2048^2 float32 (after): {matmul_after['gflops_per_s']:.0f} GFLOP/s", flush=True)
    matmul = statistics.median([matmul_before["gflops_per_s"], matmul_after["gflops_per_s"]])
    result["matmul"] = {"before": matmul_before, "after": matmul_after, "gflops_per_s": matmul}
    for case in result["cases"].values():
        case["forward_fraction_of_matmul"] = case["forward_gflops_per_s"] / matmul
        case["forward_backward_fraction_of_matmul"] = case["forward_backward_gflops_per_s"] / matmul
    if "a" in result["cases"]:
        a = result["cases"]["a"]
        result["goals_case_a"] = {
            "forward_at_least_half_matmul": a["forward_fraction_of_matmul"] >= 0.5,
            "forward_backward_at_most_3x_forward": a["backward_ratio"] <= 3.0,
        }
        print(
            f"case a: forward {a['forward_fraction_of_matmul']:.2f} x matmul GFLOP/s (goal >= 0.5), "
            f"forward+backward {a['backward_ratio']:.2f} x forward (goal <= 3)",
            flush=True,
        )
    if not args.no_filter_study:
        result["filter_study"] = filter_study()
    result["load_average_end"] = load_average()
    write_json_atomic(args.output, result)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
