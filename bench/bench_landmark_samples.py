"""Benchmark: training samples per second per landmark in the fine stage, one landmark per window (before) and
every landmark inside the window (after), in the same run.

The fine stage trains on windows placed around one landmark drawn at random. Before multi-landmark training,
each window trained that landmark only; now every landmark that lies inside it counts
(:func:`mdgru_keras.data.pipeline.fine_landmark_mask`, losses of the others masked). Both are timed here on the
same batches, with the same model, optimizer and compiled step (the real loop's
:func:`mdgru_keras.training.trainer.make_step_functions`), alternating in rounds: the only difference is the
mask, so the step costs the same and the gain is in the landmark samples each step trains. Reported per
landmark: (windows trained per second) x (landmarks trained per window) / K, the mean and the least-covered
landmark, with the same run's 2048² float32 matmul GFLOP/s.

Writes ``bench/results/bench_landmark_samples.json`` and a section of docs/TRAINING.md; run with
``make bench-landmark-samples`` (about 3 min on 2 cores with the shipped model's recipe and dataset:
``make model-afids`` makes it, or ``--data`` another prepared dataset of many landmarks).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench.bench_pretrained import _cpu_name, matmul_gflops
from bench.doc_sections import with_section

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "bench_landmark_samples.json"
DOC = ROOT / "docs" / "TRAINING.md"
BEGIN, END = "<!-- bench-landmark-samples:begin -->", "<!-- bench-landmark-samples:end -->"



def measure(data: Path, config_name: str, batches: int, rounds: int) -> dict:
    import keras
    import tensorflow as tf

    from mdgru_keras.config import load_config, with_landmarks
    from mdgru_keras.data.pipeline import make_dataset
    from mdgru_keras.data.records import read_description
    from mdgru_keras.networks import build_model, label_sigma_classes
    from mdgru_keras.training.stages import per_example_loss
    from mdgru_keras.training.trainer import make_optimizer, make_step_functions

    landmarks = tuple(read_description(data)["landmarks"])
    config = with_landmarks(load_config(config_name), landmarks)
    keras.utils.set_random_seed(0)
    dataset = make_dataset(data, "train", "fine", config, seed=0, deterministic=True, with_metadata=True)
    # the batches are made first and kept: the data pipeline is not what is timed here
    cached = [batch for _, batch in zip(range(batches), dataset)]
    strategy = tf.distribute.get_strategy()
    model = build_model(config, "fine")
    optimizer = make_optimizer(config)
    loss = lambda labels, logits: per_example_loss(labels, logits, label_sigma_classes(config))  # noqa: E731
    steps = make_step_functions(strategy, model, optimizer, loss, config.training.batch_size)
    num_landmarks = len(landmarks)

    def one_landmark(labels: dict, metadata: dict) -> dict:
        """The labels as before: each window trains the landmark it was placed for, and no other."""
        return {**labels, "mask": tf.one_hot(metadata["landmark_index"], num_landmarks, dtype=tf.float32)}

    variants = {
        "one landmark per window (before)": [(x, one_landmark(y, m)) for x, y, m in cached],
        "every landmark in the window (after)": [(x, y) for x, y, _ in cached],
    }
    stop = tf.constant(0, tf.int32)
    for batch in variants.values():  # trace and warm up both
        steps.train_step(*batch[0], stop)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, batch_list in variants.items():
            for inputs, labels in batch_list:
                start = time.perf_counter()
                float(steps.train_step(inputs, labels, stop)[0])
                seconds[name].append(time.perf_counter() - start)
    batch_size = config.training.batch_size
    result = {"landmarks": num_landmarks, "batch_size": batch_size, "batches": batches, "rounds": rounds,
              "window_size": config.fine.window_size, "variants": {}}  # fmt: skip
    for name, batch_list in variants.items():
        masks = np.concatenate([labels["mask"].numpy() for _, labels in batch_list])  # [windows, K]
        step_s = float(np.median(seconds[name]))
        windows_per_s = batch_size / step_s
        per_landmark = masks.mean(axis=0) * windows_per_s  # trained samples per second of each landmark
        result["variants"][name] = {
            "median_step_s": round(step_s, 4),
            "windows_per_s": round(windows_per_s, 2),
            "landmarks_per_window": round(float(masks.sum(axis=1).mean()), 2),
            "samples_per_s_per_landmark_mean": round(float(per_landmark.mean()), 3),
            "samples_per_s_per_landmark_min": round(float(per_landmark.min()), 3),
            "least_covered": landmarks[int(per_landmark.argmin())],
        }
    return result


def markdown(result: dict) -> str:
    run = result["run"]
    lines = [
        f"Measured {result['date']} on {result['machine']['processor']} ({result['machine']['cores']} cores), "
        f"2048² float32 matmul {result['matmul_gflops']:.0f} GFLOP/s in the same run; `make bench-landmark-samples` "
        f"(config `{result['config']}`, {run['landmarks']} landmarks, {run['window_size']}³ windows, batch "
        f"{run['batch_size']}, the same {run['batches']} batches in {run['rounds']} alternating rounds).",
        "",
        "| fine-stage training | median step s | windows/s | landmarks trained per window | samples/s per landmark, "
        "mean | least-covered landmark |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, row in run["variants"].items():
        lines.append(
            f"| {name} | {row['median_step_s']:.3f} | {row['windows_per_s']:.1f} | {row['landmarks_per_window']:.2f} "
            f"| {row['samples_per_s_per_landmark_mean']:.3f} | {row['least_covered']} "
            f"({row['samples_per_s_per_landmark_min']:.3f}/s) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "model-afids" / "dataset",
                        help="a prepared dataset with many landmarks (default: make model-afids's)")
    parser.add_argument("--config", default="afids")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if not (args.data / "dataset.json").is_file():
        parser.error(f"{args.data}: no prepared dataset (make model-afids makes one; or give --data)")
    gflops = matmul_gflops()
    run = measure(args.data, args.config, args.batches, args.rounds)
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"processor": _cpu_name(), "cores": os.cpu_count()},
        "matmul_gflops": round(gflops, 1),
        "config": args.config,
        "run": run,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    text = DOC.read_text()
    if BEGIN in text:
        DOC.write_text(with_section(text, BEGIN, END, markdown(result)))
    print(markdown(result))
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
