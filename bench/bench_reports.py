"""Benchmark: size and rendering time of a QC page (:func:`mdgru_keras.reports.participant_report`) with 32 landmarks
on a 1 mm head of 193 x 229 x 193 voxels.

Run: ``python -m bench.bench_reports [--demo demo] [--repeats 3]`` (``make bench-reports``). Writes
``bench/results/bench_reports.json``.

The head is the demo's MNI152NLin2009cAsym 1 mm T1w template with its 32 AFIDs (``make demo-data``) when present,
else a synthetic head of the same grid (nested ellipsoids and noise). The landmarks are given, not predicted
(the page's cost does not depend on the model): a few get flags so that every status colour is drawn. The time
includes reading the NIfTI file, as the page does.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "bench_reports.json"
SHAPE = (193, 229, 193)


def synthetic_head(path: Path) -> tuple[Path, np.ndarray]:
    """A 1 mm LPS head of :data:`SHAPE` (scalp, skull, brain, ventricles, noise) and 32 points inside it."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    radius = np.sqrt((x / 0.85) ** 2 + (y / 0.9) ** 2 + (z / 0.85) ** 2)
    volume = np.select([radius < 0.3, radius < 0.75, radius < 0.82, radius < 0.9], [80, 420, 150, 300], 0.0)
    volume = volume + rng.normal(0, 20, SHAPE)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = [96.0, 132.0, -78.0]
    nib.save(nib.Nifti1Image(volume.astype(np.int16), affine), str(path))
    voxel = np.stack([rng.uniform(0.3 * n, 0.7 * n, 32) for n in SHAPE], axis=1)
    return path, voxel @ affine[:3, :3].T + affine[:3, 3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=ROOT / "demo", help="the demo-data folder (make demo-data)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from mdgru_keras.io import read_landmarks
    from mdgru_keras.prediction import ScanPrediction
    from mdgru_keras.reports import participant_report

    with tempfile.TemporaryDirectory() as work:
        template = args.demo / "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"
        if template.is_file() and (args.demo / "afids.fcsv").is_file():
            scan, source = template, "MNI152NLin2009cAsym 1 mm T1w template, its 32 AFIDs"
            landmarks = read_landmarks(args.demo / "afids.fcsv")
            names, world_mm = tuple(landmarks), np.stack(list(landmarks.values()))
        else:
            scan, world_mm = synthetic_head(Path(work) / "head.nii.gz")
            names, source = tuple(f"L{k + 1}" for k in range(len(world_mm))), "synthetic head, 32 random points"
        import nibabel as nib

        image = nib.load(str(scan))
        voxel = (world_mm - image.affine[:3, 3]) @ np.linalg.inv(image.affine[:3, :3]).T
        count = len(names)
        confidence = np.full(count, 0.5, np.float32)
        confidence[[1, 5]] = 0.001
        disagreement = np.full(count, 2.0)
        disagreement[[5, 9]] = 12.0
        prediction = ScanPrediction(str(scan), names, world_mm, voxel, world_mm, voxel, confidence,
                                    tuple(image.shape), disagreement)  # fmt: skip
        seconds, out = [], Path(work) / "page.html"
        for _ in range(args.repeats):
            start = time.perf_counter()
            participant_report(out, [(scan, prediction)], title="bench")
            seconds.append(time.perf_counter() - start)
        size = out.stat().st_size
    result = {
        "benchmark": "participant_report: one page, 32 landmarks, 3 views each",
        "scan": source,
        "shape": list(image.shape),
        "landmarks": count,
        "page_bytes": size,
        "bytes_per_landmark": round(size / count),
        "seconds_median": round(statistics.median(seconds), 3),
        "seconds": [round(s, 3) for s in seconds],
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
