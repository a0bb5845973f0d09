"""Benchmark of training: wall time per training step of each stage and preset on this machine.

For every preset (tiny, cpu, paper) a synthetic prepared dataset is written with the real writer (tiny:
24x26x22 scans, cpu and paper: 193x229x193 scans, the MNI template's 1 mm grid), then each stage trains for
one short epoch through :func:`mdgru_keras.training.stages.train_stage` (the real loop: pipeline, model,
optimizer, per-epoch validation and checkpoint) in a fresh Python process, so that tracing and caches of one run
do not help the next.
Reported per run: the median step time after the first step, the first step (tracing included), the wall time
of the whole command, and the size of one checkpoint.

Writes ``bench/results/bench_training.json``; run with ``make bench-training`` (``--quick``: tiny and cpu only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RESULTS = Path(__file__).resolve().parent / "results" / "bench_training.json"
ROOT = Path(__file__).resolve().parent.parent
# preset -> (scan shape, training subjects, samples per subject): one epoch of about 20 / 10 / 6 steps.
PLAN = {
    "tiny": ((24, 26, 22), 4, 20),
    "cpu": ((193, 229, 193), 4, 5),
    "paper": ((193, 229, 193), 3, 2),
}


def write_synthetic_dataset(directory: Path, preset: str) -> Path:
    """A prepared dataset of head-like volumes (bright ellipsoid, texture, noise) with the preset's landmarks."""
    import numpy as np

    from mdgru_keras.config import load_preset
    from mdgru_keras.data.records import Subject, write_dataset

    config = load_preset(preset)
    shape, train, _ = PLAN[preset]
    names = tuple(config.landmarks)

    def load(subject_id: str) -> Subject:
        index = int(subject_id[-2:])
        rng = np.random.default_rng(index)
        grid = np.ogrid[tuple(slice(0, s) for s in shape)]
        centre = np.array(shape) / 2 + rng.uniform(-2, 2, size=3)
        radii = np.array(shape) * 0.42
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0
        texture = np.cos(grid[0] / 7.0) * np.sin(grid[1] / 5.0) + np.cos(grid[2] / 9.0)
        volume = (inside * (600 + 150 * texture) + rng.normal(0, 20, size=shape)).astype(np.float32)
        landmarks = centre + rng.uniform(-0.3, 0.3, size=(len(names), 3)) * radii
        return Subject(subject_id, volume, np.eye(4), landmarks, names)

    out = directory / preset
    out.mkdir(parents=True)
    splits = {"train": [f"train{i:02d}" for i in range(train)], "val": ["val90"]}
    write_dataset(out, splits, load, names, config.spacing_mm, shard_size=2)
    return out


def run_one(preset: str, stage: str, dataset: Path, out: Path) -> dict:
    """Train one stage for one short epoch in this process; returns the measurements."""
    from mdgru_keras.config import load_preset
    from mdgru_keras.training.stages import train_stage

    config = load_preset(preset)
    _, _, samples_per_subject = PLAN[preset]
    training = dataclasses.replace(config.training, samples_per_subject=samples_per_subject, epochs=1,
                                   checkpoint_every_steps=10_000)
    config = config.replace(training=training)
    started = time.monotonic()
    result = train_stage(stage, config, dataset, out, verbose=0)
    wall = time.monotonic() - started
    checkpoint = next((out / "checkpoints").glob("ckpt-*"))
    return {
        "preset": preset,
        "stage": stage,
        "batch_size": config.training.batch_size,
        "steps": result.step,
        "median_step_s": round(result.step_time_s_median, 4),
        "first_step_s": round(result.first_step_s, 2),
        "wall_s": round(wall, 1),
        "checkpoint_mb": round(sum(f.stat().st_size for f in checkpoint.iterdir()) / 1e6, 2),
        "val_error_mm_mean": round(result.last_validation["val_error_mm_mean"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny and cpu only")
    parser.add_argument("--presets", nargs="+", choices=sorted(PLAN), help="only these presets (results of the "
                        "others already in the JSON file are kept)")
    parser.add_argument("--one", nargs=4, metavar=("PRESET", "STAGE", "DATASET", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        preset, stage, dataset, out = args.one
        print(json.dumps(run_one(preset, stage, Path(dataset), Path(out))))
        return

    presets = args.presets or (["tiny", "cpu"] if args.quick else ["tiny", "cpu", "paper"])
    runs = []
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-training-") as temp:
        temp = Path(temp)
        for preset in presets:
            dataset = write_synthetic_dataset(temp / "data", preset)
            for stage in ("coarse", "fine"):
                out = temp / "runs" / f"{preset}-{stage}"
                env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
                completed = subprocess.run(
                    [sys.executable, "-m", "bench.bench_training", "--one", preset, stage, str(dataset), str(out)],
                    cwd=ROOT, env=env, capture_output=True, text=True, check=False,
                )
                if completed.returncode != 0:
                    raise SystemExit(f"{preset} {stage} failed:\n{completed.stderr[-3000:]}")
                run = json.loads(completed.stdout.strip().splitlines()[-1])
                runs.append(run)
                print(f"{preset:6s} {stage:6s} batch {run['batch_size']}: {run['median_step_s']:.3f} s/step "
                      f"(first step {run['first_step_s']:.1f} s, {run['steps']} steps, wall {run['wall_s']:.0f} s, "
                      f"checkpoint {run['checkpoint_mb']:.1f} MB)", flush=True)
    import tensorflow as tf

    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_start": list(load_start),
            "loadavg_end": list(os.getloadavg()),
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "note": "shared machine (up to 8 workers on 2 cores): noisy",
        },
        "runs": runs,
    }
    if args.presets and RESULTS.exists():  # keep the earlier measurements of the other presets
        earlier = json.loads(RESULTS.read_text(encoding="utf-8"))
        kept = [run for run in earlier.get("runs", []) if run["preset"] not in presets]
        results["runs"] = sorted(kept + runs, key=lambda run: (list(PLAN).index(run["preset"]), run["stage"]))
        results["machine"]["note"] += f"; {', '.join(presets)} measured again, the rest kept from before"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, RESULTS)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
