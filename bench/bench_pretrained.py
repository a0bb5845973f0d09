"""Benchmark: the shipped 32-AFIDs model on heads it never saw, next to atlas registration, and its speed.

Run: ``python -m bench.bench_pretrained`` (``make bench-pretrained``). Every accuracy step is a user command
(``mdgru-localize synth`` / ``evaluate --baseline registration``). Test conditions, none of them in training
(the model trained on seed 101, ``docs/MODEL_CARD.md``):

* ``unseen``: new subjects from the training ranges (seed 201, ``--family all``);
* ``heldout-family``: only the upper part of every split range (seed 202, ``--family heldout``: larger and
  smaller heads, stronger contrast changes, thicker slices, more noise);
* ``beyond``: ranges wider than any training subject (seed 203): head sizes up to +-15 %, slices up to 6 mm,
  noise up to 10 %, contrast and gamma 1.5 x wider, a random non-monotone contrast in 30 % of the subjects;
* ``template``: the AFIDs template itself, T1w and T2w, rotated, shifted and resampled to 1.2 mm (no synthetic
  deformation or appearance change at all);
* ``hot-voxels``: the ``unseen`` heads with 0.1 % of their voxels (seeded, at random) set to 30 times the head's
  brightest value: spikes, a broken coil element (the scan's intensity outliers are clipped before the model
  sees it: ``mdgru_keras.preprocessing.clip_outliers_tf``).

How real scans differ from all training heads (T1w only, seeds 204-207, every other range as in training):

* ``defaced``: the face removed as defacing tools do before scans are shared (``synth --deface``);
* ``small-heads``: heads 13 % smaller than the template (factors 0.84-0.90 per axis; the training heads are
  0.90-1.10): most adult heads are smaller than the MNI152 average;
* ``pitched``: tilted by 20-30 degrees about the left-right axis (training: up to 15);
* ``research-t1w``: a research cohort's 1 mm T1w scans: defaced, heads 0.86-0.98 of the template, tilted by up to
  25 degrees, noise up to 3 %, tissue order kept (no random non-monotone contrast: that is ``beyond``'s).

The synthetic heads' labels follow the AFIDs protocol (``synth --protocol-planes``): the lateral ventricles'
four landmarks lie in the coronal planes of AC and PC, where raters put them, not where an elastic deformation
moves the template's points.

Deformable registration: ``--ants CONDITION`` (repeatable) also registers the template to that condition's
heads with ANTsPy, affine then SyN (``evaluate --baseline ants``, row ``ants-syn``; 78-100 s per head on 2
cores, ``pip install 'mdgru-keras[ants]'``). Its rows do not depend on the model, so they are kept in
``OUT/CONDITION-ants.json`` and shown with every later model's run until the heads are made again.

Speed: ``predict``'s code path on a 1 mm whole head, the model loaded once, median of repeats, with the same
run's 2048^2 float32 matmul GFLOP/s and the process CPU time.

Quality flags: how well each of ``predict``'s flags (``unstable``, ``low_confidence``, ``coarse_fine_disagree``)
picks out large errors on the unseen and heldout-family heads, per threshold: the calibration of their defaults.
The model's per-landmark values are kept in ``OUT/quality_estimates.npz``; ``--quality-only`` redoes just these
tables (and runs the model only when that file is missing).

Writes ``bench/results/bench_pretrained.json`` and the section between the markers in ``docs/MODEL_CARD.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench.doc_sections import with_section

ROOT = Path(__file__).resolve().parent.parent
RESULTS_JSON = ROOT / "bench" / "results" / "bench_pretrained.json"
MODEL_CARD = ROOT / "docs" / "MODEL_CARD.md"
BEGIN, END = "<!-- bench-pretrained:begin -->", "<!-- bench-pretrained:end -->"
T1 = "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"
T2 = "tpl-MNI152NLin2009cAsym_res-01_T2w.nii.gz"
FIDUCIALS = "afids.fcsv"
BEYOND = [
    "--max-scale", "0.15", "--family", "heldout", "--slice-thickness-mm", "3", "6", "--anisotropic-probability",
    "0.4", "--noise", "0.1", "--max-contrast-log-slope", "0.6", "--max-log-gamma", "0.45",
    "--strong-contrast-probability", "0.3", "--max-elastic-large-mm", "6",
]
# How real T1w scans differ from every training head, one at a time and together (T1w only; every other range as
# in training): defaced, smaller heads than the template, tilted more than 15 degrees, and a research-like cohort.
T1W_ONLY = ["--image2-probability", "0"]
CONDITIONS = {
    "unseen": ("201", ["--family", "all"]),
    "heldout-family": ("202", ["--family", "heldout"]),
    "beyond": ("203", BEYOND),
    "defaced": ("204", [*T1W_ONLY, "--deface"]),
    "small-heads": ("205", [*T1W_ONLY, "--scale-centre", "0.87", "--max-scale", "0.03"]),
    "pitched": ("206", [*T1W_ONLY, "--pitch-deg", "20", "30"]),
    "research-t1w": ("207", [*T1W_ONLY, "--deface", "--scale-centre", "0.92", "--max-scale", "0.06", "--pitch-deg",
                             "0", "25", "--lowres-probability", "0", "--anisotropic-probability", "0", "--noise",
                             "0.03", "--strong-contrast-probability", "0"]),
}

MADE_HERE = ("template", "hot-voxels")  # conditions made by this module, not by synth


def cli() -> list[str]:
    return [str(Path(sys.executable).parent / "mdgru-localize")]


def run(command: list[str]) -> float:
    print("$", " ".join(command), flush=True)
    started = time.monotonic()
    subprocess.run(command, check=True)
    return time.monotonic() - started


def matmul_gflops(repeats: int = 5) -> float:
    import tensorflow as tf

    a = tf.random.normal([2048, 2048])
    product = tf.function(lambda: tf.matmul(a, a))
    product().numpy()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        product().numpy()
        times.append(time.perf_counter() - started)
    return 2 * 2048**3 / statistics.median(times) / 1e9


def template_condition(demo: Path, out: Path) -> Path:
    """Manifest of the T1w and T2w templates moved as in tests/test_pretrained.py (1.2 mm voxels)."""
    from mdgru_keras.data.synth import moved_copy
    from mdgru_keras.io.landmarks import read_landmarks, write_landmarks

    truth = read_landmarks(demo / FIDUCIALS)
    names = list(truth)
    out.mkdir(parents=True, exist_ok=True)
    rows = ["subject,image,landmarks,split"]
    for label, name in (("T1w", T1), ("T2w", T2)):
        moved = moved_copy(demo / name, np.stack([truth[n] for n in names]), out / f"moved_{label}.nii.gz")
        write_landmarks(out / f"moved_{label}.fcsv", dict(zip(names, moved)))
        rows.append(f"moved_{label},moved_{label}.nii.gz,moved_{label}.fcsv,test")
    (out / "manifest.csv").write_text("\n".join(rows) + "\n")
    return out / "manifest.csv"


HOT_VOXEL_FRACTION, HOT_VOXEL_FACTOR = 1e-3, 30.0


def hot_voxel_condition(source: Path, out: Path) -> Path:
    """Manifest of copies of the heads of ``source`` (a condition's folder) with hot voxels
    (:data:`HOT_VOXEL_FRACTION` of them at :data:`HOT_VOXEL_FACTOR` times the head's maximum; seeded per head),
    made again when ``source``'s manifest is newer."""
    import csv

    import nibabel as nib

    manifest = out / "manifest.csv"
    if manifest.is_file() and manifest.stat().st_mtime >= (source / "manifest.csv").stat().st_mtime:
        return manifest
    shutil.rmtree(out, ignore_errors=True)
    (out / "images").mkdir(parents=True)
    (out / "landmarks").mkdir()
    rows = list(csv.DictReader((source / "manifest.csv").open()))
    for index, row in enumerate(rows):
        image = nib.load(source / row["image"])
        volume = np.asarray(image.dataobj, np.float32)
        hot = np.random.default_rng(index).random(volume.shape) < HOT_VOXEL_FRACTION
        volume[hot] = HOT_VOXEL_FACTOR * volume.max()
        nib.save(nib.Nifti1Image(volume, image.affine), out / row["image"])
        shutil.copyfile(source / row["landmarks"], out / row["landmarks"])
    lines = ["subject,image,landmarks,split"] + [f"{r['subject']},{r['image']},{r['landmarks']}," for r in rows]
    manifest.write_text("\n".join(lines) + "\n")  # last: a half-made folder is made again
    return manifest


def _labels_follow_the_protocol(folder: Path) -> bool:
    """Whether the synthetic heads in ``folder`` were made with ``synth --protocol-planes``."""
    description = folder / "synth.json"
    return description.is_file() and bool(json.loads(description.read_text())["options"].get("protocol_planes"))


def condition_manifests(demo: Path, out: Path, subjects: int) -> dict[str, Path]:
    """The test heads of every condition (:data:`CONDITIONS` and :data:`MADE_HERE`) under ``out``, made when
    missing: ``{condition: manifest.csv}``.

    Their labels follow the AFIDs protocol (``synth --protocol-planes``: the lateral ventricles' landmarks in the
    coronal planes of AC and PC, as raters place them and as the template's raters did). Heads made before,
    with those four moved with the tissue, are made again (same seeds: the same images), and their cached
    evaluations and quality estimates (``OUT/quality_estimates.npz``) removed.
    """
    if not (demo / FIDUCIALS).is_file():
        run([*cli(), "demo-data", "--out", str(demo)])
    manifests = {}
    for name, (seed, options) in CONDITIONS.items():
        folder = out / name
        if (folder / "manifest.csv").is_file() and not _labels_follow_the_protocol(folder):
            shutil.rmtree(folder)
            for cached in (out / f"{name}.json", ants_report(out, name), out / "quality_estimates.npz"):
                cached.unlink(missing_ok=True)
        if not (folder / "manifest.csv").is_file():
            run([*cli(), "synth", "--image", str(demo / T1), "--image2", str(demo / T2), "--landmarks",
                 str(demo / FIDUCIALS), "--n", str(subjects), "--seed", seed, "--workers", "2",
                 "--protocol-planes", "--out", str(folder), *options])
        manifests[name] = folder / "manifest.csv"
    manifests["template"] = template_condition(demo, out / "template")
    manifests["hot-voxels"] = hot_voxel_condition(out / "unseen", out / "hot-voxels")
    return manifests


ANTS_ROW = "ants-syn"  # evaluate's row (and seconds key) of --baseline ants with its default transform, SyN


def ants_report(out: Path, name: str) -> Path:
    """Where the affine + SyN evaluation of condition ``name``'s heads is kept (model-independent)."""
    return out / f"{name}-ants.json"


def with_ants_rows(condition: dict, out: Path, name: str, manifest: Path, model_dir: Path, demo: Path,
                   run_now: bool) -> tuple[dict, float | None]:
    """``condition`` (an ``evaluate --json`` report) with the :data:`ANTS_ROW` row and its seconds per scan from
    :func:`ants_report`, made first when ``run_now`` and missing (``evaluate --baseline ants``; its model rows
    are not used). Unchanged when there is no such report. Returns the report and the seconds the run took."""
    report, seconds = ants_report(out, name), None
    if run_now and not report.is_file():
        seconds = run([
            *cli(), "evaluate", "--model", str(model_dir), "--manifest", str(manifest), "--json", str(report),
            "--baseline", "ants", "--template", str(demo / T1), "--template-landmarks", str(demo / FIDUCIALS)])
    if not report.is_file():
        return condition, seconds
    ants = json.loads(report.read_text())
    merged = dict(condition, rows={**condition["rows"], ANTS_ROW: ants["rows"][ANTS_ROW]})
    merged["median_seconds_per_scan"] = {
        **condition["median_seconds_per_scan"], ANTS_ROW: ants["median_seconds_per_scan"][ANTS_ROW]}
    return merged, seconds


def model_fingerprint(model_dir: Path) -> str:
    """The SHA-256 of each file of the model in ``model_dir``, one ``sha256  path`` line each."""
    from mdgru_keras.pretrained import sha256_file

    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    return "\n".join(f"{sha256_file(p)}  {p.relative_to(model_dir)}" for p in files) + "\n"


def made_with(out: Path, model_dir: Path) -> bool:
    """Whether the cached evaluations under ``out`` were made with the model in ``model_dir``
    (``out/model.sha256``, written by :func:`forget_other_models`)."""
    stamp = out / "model.sha256"
    return stamp.is_file() and stamp.read_text() == model_fingerprint(model_dir)


def forget_other_models(out: Path, estimates: Path, model_dir: Path) -> None:
    """Remove the cached evaluations under ``out`` (and the quality estimates) unless they were made with the
    model in ``model_dir``; then record that model's fingerprint in ``out/model.sha256``."""
    if made_with(out, model_dir):
        return
    for cached in [*(out / f"{name}.json" for name in (*CONDITIONS, *MADE_HERE)), estimates]:
        cached.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.sha256").write_text(model_fingerprint(model_dir))


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def speed(model_dir: Path, scan: Path, repeats: int) -> dict:
    from mdgru_keras.prediction import predict_scan
    from mdgru_keras.serving.servable import LocalLocalizationClient

    started = time.perf_counter()
    client = LocalLocalizationClient(model_dir)
    predict_scan(client, scan)  # the first call traces nothing (a SavedModel) but warms caches
    load_s = time.perf_counter() - started
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        predict_scan(client, scan)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return {
        "load_and_first_s": load_s,
        "wall_s_median": statistics.median(wall),
        "cpu_s_median": statistics.median(cpu),
        "wall_s": wall,
        "cpu_s": cpu,
    }


LARGE_ERROR_MM = 5.0
QUALITY_CONDITIONS = ("unseen", "heldout-family")
# The thresholds tabulated for each of predict's quality flags: (value, flagged when above or below, thresholds).
QUALITY_FLAGS = {
    "unstable": ("flip_disagreement_mm", "above", (2.0, 3.0, 4.0, 6.0, 8.0, 10.0)),
    "low_confidence": ("confidence", "below", (0.0001, 0.00015, 0.0002, 0.0003, 0.001, 0.01)),
    "coarse_fine_disagree": ("coarse_shift_mm", "above", (10.0, 12.0, 14.0, 15.0, 16.0, 18.0, 20.0)),
}


def quality_estimates(model_dir: Path, manifests: dict[str, Path]) -> dict[str, np.ndarray]:
    """Run the model on the heads of :data:`QUALITY_CONDITIONS` (``predict``'s code path); per landmark
    estimate: the error (mm), and the values predict's quality flags look at."""
    import csv

    from mdgru_keras.io.landmarks import read_landmarks
    from mdgru_keras.prediction import predict_scan
    from mdgru_keras.serving.servable import LocalLocalizationClient

    client = LocalLocalizationClient(model_dir)
    columns: dict[str, list] = {"error_mm": [], "flip_disagreement_mm": [], "confidence": [], "coarse_shift_mm": []}
    for name in QUALITY_CONDITIONS:
        folder = manifests[name].parent
        with open(manifests[name], newline="") as handle:
            for row in csv.DictReader(handle):
                prediction = predict_scan(client, folder / row["image"])
                truth = read_landmarks(folder / row["landmarks"])
                expected = np.stack([truth[n] for n in prediction.landmark_names])
                columns["error_mm"].append(np.linalg.norm(prediction.world_mm - expected, axis=-1))
                columns["flip_disagreement_mm"].append(prediction.flip_disagreement_mm)
                columns["confidence"].append(prediction.confidence.astype(np.float64))
                columns["coarse_shift_mm"].append(prediction.coarse_shift_mm())
    return {key: np.concatenate(values) for key, values in columns.items()}


def quality_flags(estimates: dict[str, np.ndarray]) -> dict:
    """How well each of predict's quality flags picks out large errors, per threshold, on the synthetic
    conditions (from :func:`quality_estimates`): the calibration of the ``unstable``, ``low_confidence`` and
    ``coarse_fine_disagree`` statuses. Per threshold: the fraction flagged, the mean error of the flagged and of
    the other estimates, and the fraction of the errors over :data:`LARGE_ERROR_MM` that are flagged."""
    error = estimates["error_mm"]
    large = error > LARGE_ERROR_MM
    flags = {}
    for flag, (value_name, side, thresholds) in QUALITY_FLAGS.items():
        value = estimates[value_name]
        table = []
        for threshold in thresholds:
            flagged = ~(value <= threshold) if side == "above" else ~(value >= threshold)  # NaN is flagged
            table.append({
                "threshold": threshold,
                "flagged_fraction": float(flagged.mean()),
                "flagged_mean_error_mm": float(error[flagged].mean()) if flagged.any() else None,
                "unflagged_mean_error_mm": float(error[~flagged].mean()) if (~flagged).any() else None,
                "large_errors_flagged_fraction": float(flagged[large].mean()) if large.any() else None,
            })
        flags[flag] = {
            "value": value_name,
            "flagged_when": side,
            "correlation": float(np.corrcoef(error, value)[0, 1]),
            "thresholds": table,
        }
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "conditions": list(QUALITY_CONDITIONS),
        "landmarks": int(error.size),
        "large_error_mm": LARGE_ERROR_MM,
        "large_error_fraction": float(large.mean()),
        "flags": flags,
    }


def cached_quality_estimates(model_dir: Path, manifests: dict[str, Path], cache: Path) -> dict[str, np.ndarray]:
    """:func:`quality_estimates`, kept in ``cache`` (.npz): the model runs once, the tables can be redone."""
    if not cache.is_file():
        estimates = quality_estimates(model_dir, manifests)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **estimates)
    with np.load(cache) as data:
        return {key: data[key] for key in data.files}


def _mean_mm(row: dict | None, landmark: str | None = None) -> float:
    """A row's mean error (mm) over every landmark, or over one; NaN when the row or landmark is missing."""
    if row is None:
        return float("nan")
    cell = row["overall"] if landmark is None else row["per_landmark"].get(landmark)
    return cell["mean_mm"] if cell else float("nan")


def markdown(result: dict) -> str:
    conditions = list(result["conditions"])
    with_syn = any(ANTS_ROW in result["conditions"][name]["rows"] for name in conditions)
    baselines = [("registration", "registration")] + ([(ANTS_ROW, "SyN")] if with_syn else [])
    lines = [
        f"Run on {result['date']} on {result['machine']['processor']} ({result['machine']['cores']} cores; 2048² "
        f"float32 matmul {result['speed']['matmul_gflops']:.0f} GFLOP/s in the same run). `make bench-pretrained`."
        + (" Registration: the template rigid + affine (SimpleITK); SyN: affine then SyN (ANTsPy's preset, "
           "`--baseline ants`), seconds per head on the machine that ran it (its rows are kept from run to run: "
           "module docstring)." if with_syn else ""),
        "",
        "| condition | subjects | model mean ± std mm | model median | model max | "
        + " | ".join(f"{label} mean mm | {label} median" for _, label in baselines)
        + (" | SyN s per head" if with_syn else "") + " |",
        "| --- | ---: | ---: | ---: | ---: |" + " ---: | ---: |" * len(baselines) + (" ---: |" if with_syn else ""),
    ]
    for name, table in result["conditions"].items():
        rows = table["rows"]
        model = rows[table["model_method"]]["overall"]
        cells = []
        for key, _ in baselines:
            overall = rows.get(key, {}).get("overall")
            cells.append(f"{overall['mean_mm']:.2f} | {overall['median_mm']:.2f}" if overall else "- | -")
        if with_syn:
            syn_s = table["median_seconds_per_scan"].get(ANTS_ROW)
            cells.append(f"{syn_s:.0f}" if syn_s is not None else "-")
        lines.append(
            f"| {name} | {rows[table['model_method']]['subjects']} | {model['mean_mm']:.2f} ± {model['std_mm']:.2f} | "
            f"{model['median_mm']:.2f} | {model['max_mm']:.2f} | " + " | ".join(cells) + " |"
        )
    landmarks = result["conditions"][conditions[0]]["landmarks"]
    lines.append("")
    for name in conditions:
        rows = result["conditions"][name]["rows"]
        model = rows[result["conditions"][name]["model_method"]]
        counts = []
        for key, label in baselines:
            if key in rows:
                better = sum(_mean_mm(model, n) < _mean_mm(rows[key], n) for n in landmarks)
                counts.append(f"{label} on {better} of {len(landmarks)}")
        lines.append(f"- {name}: the model's mean error is below " + ", ".join(counts) + " landmarks.")
    labels = " / ".join(["model", *(label for _, label in baselines)])
    lines += ["", f"Per landmark (mean mm over the subjects of each condition; {labels}):", ""]
    lines.append("| landmark | " + " | ".join(conditions) + " |")
    lines.append("| --- |" + " ---: |" * len(conditions))
    for landmark in landmarks:
        cells = []
        for name in conditions:
            table = result["conditions"][name]
            rows = table["rows"]
            values = [_mean_mm(rows[table["model_method"]], landmark)]
            values += [_mean_mm(rows.get(key), landmark) for key, _ in baselines]
            cells.append(" / ".join("-" if v != v else f"{v:.2f}" for v in values))
        lines.append(f"| {landmark} | " + " | ".join(cells) + " |")
    s = result["speed"]
    lines += [
        "",
        f"Speed, one 1 mm whole head ({s['scan_shape']}), model loaded once, median of {len(s['wall_s'])}: "
        f"**{s['wall_s_median']:.2f} s** wall, {s['cpu_s_median']:.2f} CPU-s "
        f"({s['wall_s_median'] * s['matmul_gflops']:.0f} matmul-GFLOP-equivalents: wall time × that GFLOP/s, "
        f"to compare machines); loading the model and the first scan: {s['load_and_first_s']:.1f} s.",
    ]
    flags = result.get("quality_flags")
    if flags:
        lines += ["", *quality_markdown(flags)]
    return "\n".join(lines)


QUALITY_TITLES = {
    "unstable": "`unstable` (`flip_disagreement_mm` above a threshold)",
    "low_confidence": "`low_confidence` (`confidence` below a threshold)",
    "coarse_fine_disagree": "`coarse_fine_disagree` (`coarse_shift_mm`, the distance of the fine estimate from the "
    "coarse one, above a threshold)",
}


def quality_markdown(flags: dict) -> list[str]:
    """A table per quality flag (rows: thresholds)."""

    def cell(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
        return "-" if value is None else f"{scale * value:.{digits}f}"

    large = f"{flags['large_error_mm']:g}"
    lines = [
        f"Quality flags{' (tables of ' + flags['date'] + ')' if 'date' in flags else ''}, on the {flags['landmarks']} "
        f"landmark estimates of the {' and '.join(flags['conditions'])} subjects; "
        f"{100 * flags['large_error_fraction']:.1f} % of them are over {large} mm off:",
    ]
    for name, flag in flags["flags"].items():
        unit = " mm" if flag["value"].endswith("_mm") else ""
        lines += [
            "",
            f"{QUALITY_TITLES.get(name, name)}; correlation of `{flag['value']}` and error {flag['correlation']:.2f}:",
            "",
            f"| threshold{unit} | flagged | mean error flagged mm | mean error not flagged mm | "
            f"errors > {large} mm flagged |",
            "| ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in flag["thresholds"]:
            lines.append(
                f"| {row['threshold']:g} | {cell(row['flagged_fraction'], 100, 1)} % | "
                f"{cell(row['flagged_mean_error_mm'])} | {cell(row['unflagged_mean_error_mm'])} | "
                f"{cell(row['large_errors_flagged_fraction'], 100, 1)} % |"
            )
    return lines


def write_model_card(result: dict) -> None:
    MODEL_CARD.write_text(with_section(MODEL_CARD.read_text(), BEGIN, END, markdown(result)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=ROOT / "demo")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-pretrained")
    parser.add_argument("--subjects", type=int, default=8, help="test subjects per synthetic condition")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ants", action="append", default=[], choices=[*CONDITIONS, *MADE_HERE],
                        metavar="CONDITION",
                        help="also register the template affine + SyN (ANTsPy) to this condition's heads "
                             "(repeatable; 78-100 s per head here); kept in OUT/CONDITION-ants.json for later runs")
    parser.add_argument("--render-only", action="store_true", help="rewrite the Markdown from the JSON")
    parser.add_argument("--quality-only", action="store_true",
                        help="redo only the quality-flag tables (the JSON's quality_flags and the Markdown) from the "
                             "unseen and heldout-family heads in --out; the model runs unless --estimates exists")
    parser.add_argument("--estimates", type=Path, default=None,
                        help="cache of the per-landmark values behind the quality flags (.npz; default: "
                             "OUT/quality_estimates.npz)")
    args = parser.parse_args(argv)
    estimates_path = args.estimates or args.out / "quality_estimates.npz"
    if args.ants:  # before anything runs: a missing optional dependency is one line
        from mdgru_keras.baselines.ants_registration import import_ants

        try:
            import_ants()
        except ImportError as error:
            raise SystemExit(f"bench-pretrained --ants: {error}") from None
    if args.render_only:
        result = json.loads(RESULTS_JSON.read_text())
    elif args.quality_only:
        from mdgru_keras.pretrained import pretrained_model_dir

        manifests = {name: args.out.resolve() / name / "manifest.csv" for name in QUALITY_CONDITIONS}
        if not made_with(args.out, pretrained_model_dir()):
            # the JSON's other tables (and a cached estimates file) belong to the model that made them
            raise SystemExit(f"bench-pretrained --quality-only: {args.out} was made with another model than the "
                             "installed one; run make bench-pretrained")
        result = json.loads(RESULTS_JSON.read_text())
        estimates = cached_quality_estimates(pretrained_model_dir(), manifests, estimates_path)
        result["quality_flags"] = quality_flags(estimates)
        RESULTS_JSON.write_text(json.dumps(result, indent=1) + "\n")
    else:
        from mdgru_keras.pretrained import pretrained_model_dir

        model_dir = pretrained_model_dir()
        demo, out = args.demo.resolve(), args.out.resolve()
        manifests = condition_manifests(demo, out, args.subjects)
        forget_other_models(out, estimates_path, model_dir)
        conditions, seconds = {}, {}
        for name, manifest in manifests.items():
            report = out / f"{name}.json"
            if not report.is_file():
                seconds[name] = run([
                    *cli(), "evaluate", "--model", str(model_dir), "--manifest", str(manifest), "--json",
                    str(report), "--baseline", "registration", "--template", str(demo / T1),
                    "--template-landmarks", str(demo / FIDUCIALS)])
            conditions[name], ants_seconds = with_ants_rows(
                json.loads(report.read_text()), out, name, manifest, model_dir, demo, run_now=name in args.ants)
            if ants_seconds is not None:
                seconds[f"{name} {ANTS_ROW}"] = ants_seconds
        import nibabel as nib

        scan = out / "template" / "speed_T1w.nii.gz"
        image = nib.load(demo / T1)
        nib.save(image, scan)
        flags = quality_flags(cached_quality_estimates(model_dir, manifests, estimates_path))
        timing = speed(model_dir, scan, args.repeats)
        timing.update(matmul_gflops=matmul_gflops(), scan_shape="x".join(str(n) for n in image.shape))
        result = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": {"processor": _cpu_name(), "cores": os.cpu_count()},
            "load_average_end": list(os.getloadavg()),
            "conditions": {
                name: {key: c[key] for key in ("landmarks", "rows", "model_method", "median_seconds_per_scan")}
                for name, c in conditions.items()
            },
            "evaluate_seconds": seconds,
            "speed": timing,
            "quality_flags": flags,
        }
        RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_JSON.write_text(json.dumps(result, indent=1) + "\n")
    write_model_card(result)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
