"""Benchmark: seconds per synthetic subject from the 193x229x193 MNI template (demo data).

Run: ``python -m bench.bench_synth [--n 6] [--demo-dir DIR]``. Writes ``bench/results/synth.json``.
Measures whole subjects (draw, resample, bias, noise, write NIfTI + landmarks): the median of the per-subject
times inside the workers, and the wall-clock time per subject of the whole run, for 1 and 2 workers and for
.nii and .nii.gz output.
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

from mdgru_keras.data.demo import fetch_demo_data
from mdgru_keras.data.synth import SynthOptions, load_template, synthesize_population

RESULTS = Path(__file__).resolve().parent / "results" / "synth.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=6, help="subjects per configuration")
    parser.add_argument("--demo-dir", type=Path, default=Path(__file__).resolve().parent.parent / "demo")
    args = parser.parse_args()
    demo = fetch_demo_data(args.demo_dir)
    started = time.perf_counter()
    template = load_template(demo.t1w, demo.landmarks, demo.t2w)
    load_seconds = time.perf_counter() - started
    runs = []
    for suffix in (".nii", ".nii.gz"):
        for workers in (1, 2):
            with tempfile.TemporaryDirectory() as out:
                rows: list[dict] = []
                started = time.perf_counter()
                synthesize_population(
                    template,
                    args.n,
                    out,
                    seed=0,
                    options=SynthOptions(image_suffix=suffix),
                    workers=workers,
                    progress=False,
                    on_subject=rows.append,
                )
                wall = time.perf_counter() - started
            run = {
                "suffix": suffix,
                "workers": workers,
                "n": args.n,
                "median_seconds_per_subject_in_worker": round(statistics.median(r["seconds"] for r in rows), 3),
                "wall_seconds_per_subject": round(wall / args.n, 3),
                "shapes": [r["shape"] for r in rows],
            }
            print(json.dumps(run))
            runs.append(run)
    result = {
        "benchmark": "synth",
        "template": "MNI152NLin2009cAsym 1 mm T1w+T2w, 193x229x193",
        "template_load_seconds": round(load_seconds, 3),
        "runs": runs,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {RESULTS}")


if __name__ == "__main__":
    main()
