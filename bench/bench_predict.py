"""Benchmark: end-to-end ``predict`` latency per scan, model loaded once, locally and through gRPC.

Run: ``python -m bench.bench_predict [--presets cpu paper] [--scans 5] [--shape 176 208 176]``
(``make bench-predict``). Writes ``bench/results/bench_predict.json``.

For each preset a model with random weights (timing does not depend on the weights) is exported with
:func:`mdgru_keras.export.export_localizer`. One NIfTI scan (int16, 1 mm, an oblique affine so the graph really
resamples) is then localized ``--scans`` times through exactly the code of ``mdgru-localize predict``
(:func:`mdgru_keras.prediction.predict_scan`: read the file, send it, get world_mm and voxels back):

* ``local``: the SavedModel loaded once in this process (``predict --model``);
* ``grpc``: the in-process TF-Serving-API gRPC server (``mdgru-localize serve``) in a separate process on
  127.0.0.1, the client here (``predict --server``); the int16 scan travels as int16.

The first call of each (graph optimization) is reported separately as ``first_call_seconds``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "bench_predict.json"


def make_scan(path: Path, shape: tuple[int, int, int]) -> Path:
    """A smooth random int16 volume with a 7-degree oblique, slightly anisotropic affine."""
    import nibabel as nib
    from scipy import ndimage

    from mdgru_keras.geometry import affine_maps

    rng = np.random.default_rng(0)
    volume = ndimage.zoom(rng.normal(size=tuple(max(4, n // 8) for n in shape)), 8, order=1)[tuple(map(slice, shape))]
    volume = np.round((volume - volume.min()) / np.ptp(volume) * 1000).astype(np.int16)
    angle = np.deg2rad(7.0)
    affine = np.eye(4)
    affine[:3, :3] = affine_maps.rotation_matrix([0.0, 0.0, angle]) @ np.diag([1.0, 1.0, 1.1])
    affine[:3, 3] = -np.asarray(shape) / 2
    nib.save(nib.Nifti1Image(volume, affine), str(path))
    return path


def export_random(preset: str, base_dir: Path) -> tuple[Path, float]:
    import keras

    from mdgru_keras.config import load_preset
    from mdgru_keras.export import export_localizer
    from mdgru_keras.localizer import TwoStageLocalizer
    from mdgru_keras.networks import build_coarse_model, build_fine_model

    config = load_preset(preset)
    keras.utils.set_random_seed(0)
    started = time.perf_counter()
    localizer = TwoStageLocalizer(build_coarse_model(config), build_fine_model(config), config)
    version_dir = export_localizer(localizer, base_dir, preset, model_info={"benchmark": "random weights"})
    seconds = time.perf_counter() - started
    del localizer
    keras.backend.clear_session()
    return version_dir.parent, seconds


def time_calls(client, scan: Path, scans: int) -> dict:
    from mdgru_keras.prediction import predict_scan

    started = time.perf_counter()
    predict_scan(client, scan)
    first = time.perf_counter() - started
    seconds = []
    for _ in range(scans):
        started = time.perf_counter()
        prediction = predict_scan(client, scan)
        seconds.append(time.perf_counter() - started)
    assert np.all(np.isfinite(prediction.world_mm))
    return {
        "first_call_seconds": round(first, 3),
        "scans": scans,
        "median_seconds_per_scan": round(statistics.median(seconds), 3),
        "min_seconds_per_scan": round(min(seconds), 3),
        "max_seconds_per_scan": round(max(seconds), 3),
        "seconds": [round(s, 3) for s in seconds],
    }


def free_port() -> int:
    from mdgru_keras.serving.testing import free_port as port

    return port()


def bench_grpc(model_dir: Path, name: str, scan: Path, scans: int) -> dict:
    from mdgru_keras.serving import connect

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "-m", "mdgru_keras.cli", "serve", "--model", str(model_dir), "--model-name", name,
               "--rest-port", "0"]
    server = subprocess.Popen([*command, "--grpc-port", str(port)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        started = time.perf_counter()
        line = server.stdout.readline()  # "serving ... gRPC on 127.0.0.1:PORT" once loaded
        if not line.startswith("serving"):
            raise RuntimeError(f"gRPC server did not start: {line!r}")
        load = time.perf_counter() - started
        with connect(f"127.0.0.1:{port}", name, timeout_s=3600) as client:
            result = time_calls(client, scan, scans)
        return {"server_load_seconds": round(load, 3), **result}
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["cpu", "paper"])
    parser.add_argument("--scans", type=int, default=5, help="timed scans per preset and transport (after one warm-up)")
    parser.add_argument("--paper-scans", type=int, default=3, help="timed scans for the paper preset")
    parser.add_argument("--shape", type=int, nargs=3, default=[176, 208, 176], help="scan shape (voxels)")
    parser.add_argument(
        "--transports", nargs="+", default=["local", "grpc"], choices=["local", "grpc"], help="in this order"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import tensorflow as tf

    from mdgru_keras.serving.servable import LocalLocalizationClient

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_predict-") as tmp:
        scan = make_scan(Path(tmp) / "scan.nii.gz", tuple(args.shape))
        for preset in args.presets:
            scans = args.paper_scans if preset == "paper" else args.scans
            model_dir, export_seconds = export_random(preset, Path(tmp) / "export")
            run = {"preset": preset, "export_seconds": round(export_seconds, 1)}
            for transport in args.transports:  # in the order given
                if transport == "local":
                    started = time.perf_counter()
                    client = LocalLocalizationClient(model_dir, preset)
                    load = time.perf_counter() - started
                    run["local"] = {"load_seconds": round(load, 3), **time_calls(client, scan, scans)}
                    del client  # free its memory before the server process loads the model
                else:
                    run["grpc"] = bench_grpc(model_dir, preset, scan, scans)
            print(json.dumps(run), flush=True)
            runs.append(run)
    result = {
        "benchmark": "predict",
        "command": "python -m bench.bench_predict " + " ".join(sys.argv[1:]),
        "scan": {"shape": list(args.shape), "dtype": "int16", "spacing_mm": [1.0, 1.0, 1.1], "oblique_deg": 7.0},
        "weights": "random (timing only)",
        "runs": runs,
        "cpu_count": os.cpu_count(),
        "tensorflow": tf.__version__,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "machine": platform.machine(),
        "python": platform.python_version(),
        "note": "shared machine: up to 8 workers on 2 cores during the run; numbers are noisy",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
