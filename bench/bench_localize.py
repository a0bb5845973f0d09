"""Benchmark of the two-stage localization of one scan, and of one training step per stage.

Run: ``python -m bench.bench_localize [--repeats 5] [--presets paper,cpu] [--landmarks 1,32]
[--fine-batch-size N] [--train-presets cpu] [--quick]`` (``make bench-localize``).
Writes ``bench/results/bench_localize.json``; summary in ``docs/BENCH_LOCALIZE.md``.

Localization: ``TwoStageLocalizer.__call__`` (one ``tf.function``) on one 193x229x193 float32 volume (the MNI
1 mm grid of the AFIDs demo), preprocessing included, model building and tracing excluded (one warm-up call),
random weights (the cost does not depend on them). Median of ``--repeats`` calls. The coarse stage alone
(``TwoStageLocalizer.coarse``: preprocessing + coarse network + decoding) and ``preprocess`` alone are timed the
same way, so the fine stage is the difference. For K = 32 the ratio to 32 single-landmark runs is reported.

Training step: ``train_on_batch`` of a compiled coarse / fine model (``networks.compile_for_training``) with
``config.training.batch_size`` random samples; two warm-up steps, median of ``--repeats``.

The machine is shared: the load average before and after each measurement is recorded next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from mdgru_keras import networks  # noqa: E402
from mdgru_keras.config import Config, load_preset, with_landmarks  # noqa: E402
from mdgru_keras.geometry.coordinate_classes import window_voxel_to_class  # noqa: E402
from mdgru_keras.geometry.windows import centered_window_origin  # noqa: E402
from mdgru_keras.localizer import TwoStageLocalizer  # noqa: E402
from mdgru_keras.preprocessing import preprocess  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_localize.json"
VOLUME_SHAPE = (193, 229, 193)
# The 32 AFIDs of the MNI ICBM 152 2009c template (autoafids 0.1.4, MIT; `mdgru-localize demo-data`), in voxels
# of its 193x229x193 1 mm grid, rounded: AC, PC, ICS, PMJ, SIPF, RSLMS, LSLMS, RILMS, LILMS, CUL, IMS, RMB, LMB,
# PG, RLVAC, LLVAC, RLVPC, LLVPC, GENU, SPLE, RALTH, LALTH, RSAMTH, LSAMTH, RIAMTH, LIAMTH, RIGO, LIGO, RVOH,
# LVOH, ROSF, LOSF. Used to place the coarse estimates where real ones would be, which decides how many fine
# windows shared-window localization needs.
AFIDS_VOXEL = np.array(
    [[96, 135, 73], [96, 107, 76], [96, 94, 67], [96, 109, 56], [96, 118, 67], [109, 106, 68], [82, 106, 68],
     [107, 101, 56], [85, 101, 57], [96, 79, 80], [96, 124, 62], [98, 124, 63], [94, 124, 63], [96, 100, 79],
     [111, 138, 103], [80, 137, 103], [115, 110, 106], [78, 110, 106], [96, 165, 80], [96, 94, 84],
     [130, 128, 51], [61, 125, 53], [113, 122, 60], [78, 121, 60], [116, 128, 50], [75, 127, 50],
     [111, 91, 83], [81, 89, 82], [117, 52, 83], [77, 49, 82], [108, 151, 66], [83, 149, 65]],
    dtype=np.float64,
)  # fmt: skip


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def timed(fn, repeats: int, warmup: int = 1) -> dict:
    """Seconds of ``fn()`` (which returns host values): wall-clock median, min and all runs; the median CPU
    time of the process (all threads), and the load average before and after.

    On a shared machine the wall time depends on the other workers; the CPU time much less. On two idle cores
    the wall time would lie between ``cpu / 2`` (both cores busy all the time) and ``cpu`` (one core busy).
    """
    for _ in range(warmup):
        fn()
    load_before = load_average()
    seconds, cpu_seconds = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
    return {
        "median_s": round(statistics.median(seconds), 4),
        "min_s": round(min(seconds), 4),
        "all_s": [round(s, 4) for s in seconds],
        "cpu_median_s": round(statistics.median(cpu_seconds), 4),
        "load_before": load_before,
        "load_after": load_average(),
    }


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux: ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def landmark_config(preset: str, landmarks: int) -> Config:
    return with_landmarks(load_preset(preset), [f"L{i:02d}" for i in range(1, landmarks + 1)])


def synthetic_volume(seed: int = 0) -> np.ndarray:
    """A smooth head-sized blob with noise: any content gives the same timing, this one is at least plausible."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in VOLUME_SHAPE), indexing="ij"), -1)
    head = (np.sqrt((grid**2).sum(-1)) < 0.8).astype(np.float32) * 100.0
    return (head + rng.normal(0, 5, VOLUME_SHAPE)).astype(np.float32)


def place_coarse_estimates(coarse: keras.Model, config: Config, volume_voxel: np.ndarray) -> None:
    """Make a random-weight coarse model answer ``volume_voxel [K, 3]`` (in a 193x229x193 volume): a large
    output bias on each landmark's target class outweighs the random logits."""
    size, stride, n = config.coarse.padded_size, config.coarse.input_stride, config.superresolution
    origin = centered_window_origin(np.array(VOLUME_SHAPE), size)
    classes = window_voxel_to_class(volume_voxel - origin, size, n, stride)  # [K, 3]
    heads = coarse.get_layer("coarse_heads")
    bias = np.zeros(heads.output_bias.shape, np.float32)
    per_axis = networks.stage_classes(config, "coarse")[0]
    for axis in range(3):
        bias[np.arange(len(volume_voxel)), axis * per_axis + classes[:, axis]] = 50.0
    heads.output_bias.assign(bias)


def bench_localization(
    preset: str, landmarks: int, repeats: int, fine_batch_size: int | None, share_margin: int | None = None
) -> dict:
    config = landmark_config(preset, landmarks)
    keras.utils.set_random_seed(0)
    start = time.perf_counter()
    coarse, fine = networks.build_coarse_model(config), networks.build_fine_model(config)
    build_s = time.perf_counter() - start
    if landmarks == len(AFIDS_VOXEL):
        place_coarse_estimates(coarse, config, AFIDS_VOXEL)
    localizer = TwoStageLocalizer(
        coarse, fine, config, fine_batch_size=fine_batch_size, share_windows_margin_voxel=share_margin
    )
    volume = tf.constant(synthetic_volume())
    start = time.perf_counter()
    first = localizer(volume)
    first_call_s = time.perf_counter() - start  # tracing + one run
    result = {
        "preset": preset,
        "landmarks": landmarks,
        "coarse_estimates": "AFIDs of the MNI template" if landmarks == len(AFIDS_VOXEL) else "random weights",
        "share_windows_margin_voxel": share_margin,
        "fine_windows": int(first["fine_windows"]),
        "fine_batch_size": localizer.fine_batch_size,
        "parameters": {stage: networks.count_parameters(config, stage)["total"] for stage in ("coarse", "fine")},
        "build_s": round(build_s, 2),
        "first_call_s": round(first_call_s, 2),
        "two_stage": timed(lambda: localizer(volume)["voxel"].numpy(), repeats, warmup=0),
        "coarse_stage": timed(lambda: localizer.coarse(volume)["coarse_voxel"].numpy(), repeats),
    }
    result["fine_stage_median_s"] = round(result["two_stage"]["median_s"] - result["coarse_stage"]["median_s"], 4)
    result["peak_rss_gb_so_far"] = peak_rss_gb()
    print(
        f"{preset:6s} K={landmarks:2d} windows={result['fine_windows']:2d}: "
        f"two-stage {result['two_stage']['median_s']:.3f} s "
        f"(coarse stage {result['coarse_stage']['median_s']:.3f} s, fine {result['fine_stage_median_s']:.3f} s), "
        f"load {result['two_stage']['load_before']}",
        flush=True,
    )
    keras.backend.clear_session()
    return result


def bench_preprocess(repeats: int) -> dict:
    config = load_preset("paper")
    volume = tf.constant(synthetic_volume())
    fn = tf.function(lambda v: preprocess(v, config.spacing_mm, config.highpass_sigma_mm))
    return timed(lambda: fn(volume).numpy(), repeats)


def bench_train_step(config: Config, stage: str, repeats: int) -> dict:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    batch, k = config.training.batch_size, config.num_landmarks
    classes = networks.stage_classes(config, stage)[0]
    model = networks.compile_for_training(networks.build_model(config, stage), config)
    if stage == "coarse":
        size = config.coarse.padded_size
        inputs = {"volume": rng.normal(size=(batch, size, size, size, 2)).astype(np.float32)}
        labels = {a: rng.integers(0, classes, (batch, k)).astype(np.int32) for a in "xyz"}
    else:
        size = config.fine.window_size
        inputs = {
            "window": rng.normal(size=(batch, size, size, size, 2)).astype(np.float32),
            "landmark_index": np.zeros(batch, np.int32),
        }
        labels = {a: rng.integers(0, classes, batch).astype(np.int32) for a in "xyz"}
    result = timed(lambda: model.train_on_batch(inputs, labels), repeats, warmup=2)
    result.update(preset=config.name, stage=stage, batch_size=batch, parameters=model.count_params())
    print(f"{config.name:6s} {stage:6s} train step (batch {batch}): {result['median_s']:.3f} s", flush=True)
    keras.backend.clear_session()
    return result


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
        json.dump(data, handle, indent=2)
        temporary = handle.name
    os.replace(temporary, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--presets", default="paper,cpu")
    parser.add_argument("--landmarks", default="1,32")
    parser.add_argument("--fine-batch-size", type=int, default=None, help="fine windows per network call")
    parser.add_argument(
        "--share-margin",
        default="paper=16,cpu=8,tiny=4",
        help="per preset: also time K > 1 with shared fine windows of this margin ('' for none)",
    )
    parser.add_argument("--train-presets", default="cpu", help="presets whose training steps are timed ('' for none)")
    parser.add_argument("--quick", action="store_true", help="tiny preset, 2 repeats: a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    presets = ["tiny"] if args.quick else [p for p in args.presets.split(",") if p]
    train_presets = ["tiny"] if args.quick else [p for p in args.train_presets.split(",") if p]
    repeats = 2 if args.quick else args.repeats
    landmark_counts = [int(k) for k in args.landmarks.split(",")]

    results = {
        "benchmark": "bench_localize",
        "volume_shape": list(VOLUME_SHAPE),
        "repeats": repeats,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "devices": [d.device_type for d in tf.config.list_physical_devices()],
            "load_at_start": load_average(),
        },
        "preprocess": bench_preprocess(repeats),
        "localization": [],
        "train_step": [],
    }
    print(f"preprocess {VOLUME_SHAPE}: {results['preprocess']['median_s']:.3f} s", flush=True)
    margins = dict(item.split("=") for item in args.share_margin.split(",") if item)
    for preset in presets:
        runs = []
        for k in landmark_counts:
            runs.append(bench_localization(preset, k, repeats, args.fine_batch_size))
            if k > 1 and preset in margins:
                runs.append(bench_localization(preset, k, repeats, args.fine_batch_size, int(margins[preset])))
        single = [r for r in runs if r["landmarks"] == 1]
        for run in runs:
            if run["landmarks"] > 1 and single:
                k, many, one = run["landmarks"], run["two_stage"]["median_s"], single[0]["two_stage"]["median_s"]
                run["ratio_to_k_single_runs"] = round(many / (k * one), 4)
                print(f"{preset:6s} K={k} ({run['fine_windows']} windows): {many:.2f} s = "
                      f"{many / (k * one):.3f} x {k} single-landmark runs")
        results["localization"].extend(runs)
    for preset in train_presets:
        for stage in ("coarse", "fine"):
            results["train_step"].append(bench_train_step(load_preset(preset), stage, repeats))
    results["machine"]["load_at_end"] = load_average()
    write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
