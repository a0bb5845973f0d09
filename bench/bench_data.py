"""Benchmark of the data path: does the crop pipeline keep up with training?

Generates a synthetic prepared dataset of 193x229x193 scans (the MNI template's 1 mm grid) in a temp dir with
the real writer, then measures on this machine (its cores, as many as it has):

* ``preprocess`` of one whole volume and ``parse_example`` (decode) of one record;
* samples per second of ``make_dataset`` for the paper preset, coarse and fine, and for the coarse stage with
  every augmentation switched on (rotation/scaling make the 256^3 crop a trilinear resampling);
* the time of one paper-preset coarse training step (``mdgru_keras.networks``, batch 1, after warm-up).

Goal: the pipeline delivers samples at least 3x faster than a training step consumes them.
Writes ``bench/results/bench_data.json``; run with ``make bench-data`` (``--quick`` for a short smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from mdgru_keras.config import AugmentationConfig, load_preset  # noqa: E402
from mdgru_keras.data.pipeline import make_dataset  # noqa: E402
from mdgru_keras.data.records import Subject, make_example, parse_example, write_dataset  # noqa: E402
from mdgru_keras.preprocessing import preprocess  # noqa: E402

SHAPE = (193, 229, 193)
RESULTS = Path(__file__).resolve().parent / "results" / "bench_data.json"


def synthetic_subject(index: int, landmark_names: tuple[str, ...]) -> Subject:
    """A head-like integer volume: a bright ellipsoid with smooth texture and noise, landmarks inside it."""
    rng = np.random.default_rng(index)
    grid = np.ogrid[tuple(slice(0, s) for s in SHAPE)]
    centre = np.array(SHAPE) / 2 + rng.uniform(-5, 5, size=3)
    radii = np.array(SHAPE) * rng.uniform(0.38, 0.45, size=3)
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0
    texture = np.cos(grid[0] / 7.0) * np.sin(grid[1] / 5.0) + np.cos(grid[2] / 9.0)
    volume = inside * (600 + 150 * texture) + rng.normal(0, 20, size=SHAPE)
    volume = np.clip(np.round(volume), 0, None).astype(np.float32)
    landmarks = centre + rng.uniform(-0.4, 0.4, size=(len(landmark_names), 3)) * radii
    affine = np.eye(4)
    affine[:3, 3] = -np.array(SHAPE) / 2
    return Subject(f"synth{index:02d}", volume, affine, landmarks, landmark_names)


def median_time(function, repeats: int) -> float:
    function()  # warm-up (tracing)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pipeline_rate(dataset_dir: Path, stage: str, config, warmup: int, samples: int) -> dict:
    """Samples per second of ``make_dataset`` after ``warmup`` batches (batch size 1)."""
    dataset = make_dataset(dataset_dir, "train", stage, config, seed=0)
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    intervals = []
    start = last = time.perf_counter()
    for _ in range(samples):
        next(iterator)
        now = time.perf_counter()
        intervals.append(now - last)
        last = now
    elapsed = time.perf_counter() - start
    return {
        "samples": samples,
        "seconds": round(elapsed, 3),
        "samples_per_second": round(samples / elapsed, 3),
        "median_interval_s": round(statistics.median(intervals), 4),
    }


def training_step_time(config, warmup: int, steps: int) -> dict:
    from mdgru_keras import networks

    model = networks.compile_for_training(networks.build_model(config, "coarse"), config)
    size = config.coarse.padded_size
    classes = networks.stage_classes(config, "coarse")[0]
    rng = np.random.default_rng(0)
    inputs = {"volume": rng.normal(size=(1, size, size, size, 2)).astype(np.float32)}
    labels = {axis: rng.integers(0, classes, size=(1, config.num_landmarks)).astype(np.int32) for axis in "xyz"}
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        model.train_on_batch(inputs, labels)
        times.append(time.perf_counter() - start)
    return {
        "batch_size": 1,
        "warmup_steps_s": [round(t, 2) for t in times[:warmup]],
        "steps_s": [round(t, 2) for t in times[warmup:]],
        "median_step_s": round(statistics.median(times[warmup:]), 3),
        "parameters": networks.count_parameters(config, "coarse")["total"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=4, help="synthetic training subjects (default 4)")
    parser.add_argument("--samples", type=int, default=20, help="timed samples per pipeline (default 20)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (default 3)")
    parser.add_argument("--no-step", action="store_true", help="skip the training step (needs ~11 GB RAM)")
    parser.add_argument("--quick", action="store_true", help="few samples, no training step (smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.subjects, args.samples, args.no_step = 2, 3, True

    paper = load_preset("paper").replace(landmarks=("L0", "L1", "L2"))
    augmented = paper.replace(augmentation=AugmentationConfig(
        subvoxel_shift=True, intensity_scale=0.1, intensity_shift=0.1, gamma=0.2, noise_std=0.05, bias_field=0.2,
        rotation_deg=10.0, scaling=0.1))
    result: dict = {
        "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "python": platform.python_version(),
                    "tensorflow": tf.__version__, "note": "shared machine (up to 8 workers on 2 cores): noisy"},
        "volume_shape": list(SHAPE),
        "subjects": args.subjects,
    }
    print(f"bench-data: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_data_") as temp:
        dataset_dir = Path(temp)
        subjects = {f"synth{i:02d}": synthetic_subject(i, paper.landmarks) for i in range(args.subjects)}
        start = time.perf_counter()
        write_dataset(dataset_dir, {"train": list(subjects)}, subjects.__getitem__, paper.landmarks, 1.0,
                      shard_size=2)
        result["write_s_per_subject"] = round((time.perf_counter() - start) / args.subjects, 3)
        result["record_mb"] = round(sum(p.stat().st_size for p in dataset_dir.glob("*.tfrecord")) / 1e6
                                    / args.subjects, 2)

        first = next(iter(subjects.values()))
        serialized = tf.constant(make_example(first).SerializeToString())
        volume = tf.constant(first.volume)
        parse = tf.function(parse_example)
        prep = tf.function(lambda v: preprocess(v, 1.0, paper.highpass_sigma_mm))
        result["parse_decode_s"] = round(median_time(lambda: parse(serialized)["volume"].numpy(), 5), 4)
        result["preprocess_s"] = round(median_time(lambda: prep(volume).numpy(), 5), 4)
        print(f"  decode {result['parse_decode_s']} s, preprocess {result['preprocess_s']} s", flush=True)

        pipelines = {
            "coarse_paper": (paper, "coarse", args.samples),
            "fine_paper": (paper, "fine", args.samples),
            "coarse_all_augmentations": (augmented, "coarse", max(args.samples // 4, 2)),
        }
        result["pipeline"] = {}
        for name, (config, stage, samples) in pipelines.items():
            rate = pipeline_rate(dataset_dir, stage, config, warmup=2, samples=samples)
            result["pipeline"][name] = rate
            print(f"  pipeline {name}: {rate['samples_per_second']} samples/s", flush=True)

    if not args.no_step:
        try:
            step = training_step_time(load_preset("paper"), warmup=2, steps=args.steps)
        except ImportError as error:
            step = {"skipped": f"mdgru_keras.networks not available ({error})"}
        result["training_step_coarse_paper"] = step
        if "median_step_s" in step:
            step_rate = 1.0 / step["median_step_s"]
            ratio = result["pipeline"]["coarse_paper"]["samples_per_second"] / step_rate
            result["pipeline_over_training_ratio"] = round(ratio, 2)
            # the same with the median sample interval: robust to the machine's stalls, less conservative
            median_ratio = step["median_step_s"] / result["pipeline"]["coarse_paper"]["median_interval_s"]
            result["pipeline_over_training_ratio_median_interval"] = round(median_ratio, 2)
            result["goal_met"] = bool(ratio >= 3.0)
            print(f"  training step {step['median_step_s']} s -> pipeline/training = {ratio:.1f}x "
                  f"(goal >= 3x: {'met' if ratio >= 3 else 'NOT met'})", flush=True)
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["machine"]["max_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {args.out}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
