"""Benchmark: wall time and accuracy of the atlas-registration baseline.

Default (phantom): template and scan are 193x229x193 voxels at 1 mm (the MNI152 1 mm grid); the scan shows a
smooth ellipsoid phantom moved rigidly (10 degrees about an oblique axis, 8 mm), on a grid with another origin.
With ``--template T1.nii.gz --template-landmarks afids.fcsv --manifest DIR/manifest.csv`` (the files of
``mdgru-localize demo-data`` and ``synth``): the template is registered to every scan of the manifest and the
errors against the scans' landmark files are reported with :mod:`mdgru_keras.evaluation`.
Writes ``bench/results/registration.json`` (or ``--out``). Run: ``.venv/bin/python -m bench.bench_registration``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk  # noqa: N813
from scipy.spatial.transform import Rotation

from mdgru_keras.baselines.registration import RegistrationSettings, register_landmarks
from mdgru_keras.geometry import affine_maps

# (centre mm, semi-axes mm, rotation about z in degrees, intensity), head-sized
ELLIPSOIDS = [
    ((0.0, -18.0, 10.0), (70.0, 88.0, 72.0), 0.0, 1.0),
    ((25.0, 10.0, 20.0), (22.0, 12.0, 10.0), 30.0, 1.5),
    ((-28.0, -12.0, 8.0), (14.0, 22.0, 12.0), -20.0, 2.2),
    ((4.0, 28.0, -20.0), (12.0, 10.0, 18.0), 60.0, 0.4),
    ((-8.0, -40.0, 30.0), (10.0, 10.0, 10.0), 0.0, 3.0),
    ((10.0, -60.0, -10.0), (16.0, 8.0, 8.0), 45.0, 0.7),
]
MNI_SHAPE = (193, 229, 193)


def rotation_matrix(axis: np.ndarray, degrees: float) -> np.ndarray:
    """Rotation by ``degrees`` about ``axis`` (any length)."""
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    return Rotation.from_rotvec(np.deg2rad(degrees) * axis).as_matrix()


def phantom_on_grid(shape: tuple[int, int, int], affine: np.ndarray, motion: np.ndarray) -> np.ndarray:
    """The phantom moved by the 4x4 RAS ``motion``, sampled on a grid (float32 ``[x, y, z]``)."""
    inverse = np.linalg.inv(motion) @ affine  # voxel -> world of the unmoved phantom
    out = np.zeros(shape, np.float32)
    for x in range(shape[0]):  # slice by slice keeps memory small
        voxel = np.stack(np.meshgrid([x], np.arange(shape[1]), np.arange(shape[2]), indexing="ij"), -1)[0]
        world = affine_maps.voxel_to_world(voxel, inverse)
        for centre, axes, angle, value in ELLIPSOIDS:
            local = (world - np.asarray(centre)) @ rotation_matrix([0, 0, 1], angle)
            radius = np.sqrt(((local / np.asarray(axes)) ** 2).sum(-1))
            out[x] += value / (1.0 + np.exp((radius - 1.0) * min(axes) / 2.0))
    return out


def write_json_atomic(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, suffix=".tmp", delete=False) as handle:
        json.dump(result, handle, indent=2)
    os.replace(handle.name, out)


def bench_manifest(args: argparse.Namespace) -> None:
    """Template -> every scan of a manifest; errors against the scans' landmarks."""
    from mdgru_keras.evaluation import GroundTruth, Prediction, evaluate
    from mdgru_keras.io import read_landmarks, read_volume

    template = read_volume(args.template, spacing_mm=None)
    template_landmarks = dict(read_landmarks(args.template_landmarks))
    manifest = Path(args.manifest)
    with open(manifest, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    settings = RegistrationSettings(threads=args.threads)
    predictions, truths, times, cpu_times = [], [], [], []
    for row in rows:
        scan = read_volume(manifest.parent / row["image"], spacing_mm=None)
        truth = dict(read_landmarks(manifest.parent / row["landmarks"]))
        t0, c0 = time.perf_counter(), time.process_time()
        found = register_landmarks(
            template.data, template.voxel_to_world, template_landmarks, scan.data, scan.voxel_to_world,
            seed=0, settings=settings,
        )  # fmt: skip
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        print(f"{row['subject']} {scan.shape}: {times[-1]:.2f} s wall, {cpu_times[-1]:.2f} s CPU")
        predictions.append(Prediction(row["subject"], "registration", found))
        truths.append(GroundTruth(row["subject"], truth, scan.voxel_to_world))
        # Without registration: the template's landmark positions taken as they are.
        predictions.append(Prediction(row["subject"], "template, unregistered", template_landmarks))
    table = evaluate(predictions, truths)
    result = {
        "benchmark": "registration",
        "mode": "manifest",
        "template": str(args.template),
        "manifest": str(manifest),
        "threads": args.threads,
        "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
        "seconds": times,
        "median_seconds": float(np.median(times)),
        "cpu_seconds": cpu_times,
        "median_cpu_seconds": float(np.median(cpu_times)),
        "errors": {method: row.overall.to_dict() for method, row in table.rows.items()},
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "simpleitk": sitk.Version_VersionString(),
    }
    out = Path(args.out)
    write_json_atomic(result, out)
    wall, cpu = result["median_seconds"], result["median_cpu_seconds"]
    print(f"median {wall:.2f} s wall ({cpu:.2f} s CPU) per scan; wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--template", help="template NIfTI (manifest mode)")
    parser.add_argument("--template-landmarks", help="the template's landmark file (manifest mode)")
    parser.add_argument("--manifest", help="manifest.csv with subject,image,landmarks columns (manifest mode)")
    parser.add_argument("--out", default="bench/results/registration.json")
    args = parser.parse_args()
    if args.manifest:
        bench_manifest(args)
        return

    template_affine = np.eye(4)
    template_affine[:3, 3] = [-96.0, -132.0, -78.0]
    scan_affine = np.eye(4)
    scan_affine[:3, 3] = [-90.0, -128.0, -80.0]
    motion = np.eye(4)
    motion[:3, :3] = rotation_matrix([1.0, 0.5, 0.3], 10.0)
    motion[:3, 3] = 8.0 * np.array([0.6, -0.48, 0.64])

    t0 = time.perf_counter()
    template = phantom_on_grid(MNI_SHAPE, template_affine, np.eye(4))
    scan = phantom_on_grid(MNI_SHAPE, scan_affine, motion)
    print(f"phantoms made in {time.perf_counter() - t0:.1f} s")
    landmarks = {f"L{i}": np.asarray(e[0]) for i, e in enumerate(ELLIPSOIDS)}
    landmarks["off-centre"] = np.array([40.0, -50.0, 30.0])
    expected = {n: affine_maps.voxel_to_world(p, motion) for n, p in landmarks.items()}  # motion as an affine

    settings = RegistrationSettings(threads=args.threads)
    times, cpu_times, errors = [], [], []
    for repeat in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        found = register_landmarks(
            template, template_affine, landmarks, scan, scan_affine, seed=repeat, settings=settings
        )
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        errors.append([float(np.linalg.norm(found[n] - expected[n])) for n in landmarks])
        print(f"run {repeat}: {times[-1]:.2f} s wall, {cpu_times[-1]:.2f} s CPU, max error {max(errors[-1]):.3f} mm")

    result = {
        "benchmark": "registration",
        "mode": "phantom",
        "shape": list(MNI_SHAPE),
        "threads": args.threads,
        "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
        "seconds": times,
        "median_seconds": float(np.median(times)),
        "cpu_seconds": cpu_times,  # all threads together: on an idle machine wall ~ cpu / threads
        "median_cpu_seconds": float(np.median(cpu_times)),
        "landmark_errors_mm": errors,
        "median_error_mm": float(np.median(errors)),
        "max_error_mm": float(np.max(errors)),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "machine": platform.platform(),
        "simpleitk": sitk.Version_VersionString(),
    }
    out = Path(args.out)
    write_json_atomic(result, out)
    wall, cpu = result["median_seconds"], result["median_cpu_seconds"]
    print(f"median {wall:.2f} s wall ({cpu:.2f} s CPU) per scan; wrote {out}")


if __name__ == "__main__":
    main()
