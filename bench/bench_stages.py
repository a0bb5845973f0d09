"""``make bench-stages``: which stage limits the two-stage model? Each stage's own error, on the same heads.

For the coarse and fine runs of ``make model-afids`` (``--work``), on the test heads of ``make bench-pretrained``
(``unseen`` and ``heldout-family``) and on training heads (how well the model fits what it was trained on):

* ``coarse``: the coarse stage's estimate;
* ``fine at truth``: the fine stage with its windows centred on the true positions, the fine network's own error
  (what a perfect coarse stage would leave);
* ``fine at truth + 6 mm``: centred 6 mm away in a random direction (seeded), about the coarse stage's error;
* ``fine at coarse``: one plain fine pass at the coarse estimates (the paper's two-stage result, without the
  shipped model's mirror-and-re-centre ensemble).

No flips and no second pass: the plain stages, so that the numbers say which network to improve. Error:
Euclidean distance in mm to the true position (scans resampled to the models' 1 mm grid, as ``predict`` does).
Writes ``bench/results/bench_stages.json`` and the table in ``docs/MODEL_CARD.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bench.bench_pretrained import ROOT, _cpu_name, condition_manifests
from bench.doc_sections import with_section

if TYPE_CHECKING:
    from mdgru_keras.localizer import TwoStageLocalizer

RESULTS_JSON = ROOT / "bench" / "results" / "bench_stages.json"
MODEL_CARD = ROOT / "docs" / "MODEL_CARD.md"
BEGIN, END = "<!-- bench-stages:begin -->", "<!-- bench-stages:end -->"
CONDITIONS = ("unseen", "heldout-family")
OFFSET_MM = 6.0
ESTIMATES = ("coarse", "fine at truth", f"fine at truth + {OFFSET_MM:g} mm", "fine at coarse")


def training_manifest(work: Path, count: int, out: Path) -> Path:
    """A manifest of the first ``count`` training subjects of the run's dataset (sorted by name)."""
    dataset = json.loads((work / "dataset" / "dataset.json").read_text())
    chosen = set(sorted(dataset["splits"]["train"]["subjects"])[:count])
    population = work / "population"
    with open(population / "manifest.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["subject"] in chosen]
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["subject", "image", "landmarks", "split"])
        writer.writeheader()
        for row in rows:
            writer.writerow({"subject": row["subject"], "image": str(population / row["image"]),
                             "landmarks": str(population / row["landmarks"]), "split": "train"})
    return manifest


def load_localizer(work: Path) -> TwoStageLocalizer:
    """The plain two-stage localizer (no mirror, one pass) of the coarse and fine runs in ``work``."""
    from mdgru_keras.export import combine_configs, load_run
    from mdgru_keras.localizer import TwoStageLocalizer

    coarse_run, fine_run = load_run(work / "coarse", "coarse"), load_run(work / "fine", "fine")
    return TwoStageLocalizer(coarse_run.model, fine_run.model, combine_configs(coarse_run.config, fine_run.config))


def stage_errors(localizer: TwoStageLocalizer, manifest: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Errors ``[scans, K]`` in mm of each of :data:`ESTIMATES` on the heads of ``manifest``."""
    import tensorflow as tf

    from mdgru_keras.io.landmarks import read_landmarks
    from mdgru_keras.io.nifti import read_volume

    config = localizer.config
    names = list(config.landmarks)
    rng = np.random.default_rng(seed)
    errors: dict[str, list[np.ndarray]] = {name: [] for name in ESTIMATES}
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        volume = read_volume(manifest.parent / row["image"], config.spacing_mm)
        truth_world = read_landmarks(manifest.parent / row["landmarks"])
        world_to_voxel = np.linalg.inv(volume.voxel_to_world)
        truth = np.stack([truth_world[n] for n in names]) @ world_to_voxel[:3, :3].T + world_to_voxel[:3, 3]
        data = tf.constant(volume.data)
        direction = rng.normal(size=truth.shape)
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        coarse = localizer.coarse(data)["coarse_voxel"].numpy()
        estimates = {
            "coarse": coarse,
            "fine at truth": localizer.fine(data, tf.constant(truth, tf.float32))["voxel"].numpy(),
            ESTIMATES[2]: localizer.fine(
                data, tf.constant(truth + OFFSET_MM / config.spacing_mm * direction, tf.float32))["voxel"].numpy(),
            "fine at coarse": localizer.fine(data, tf.constant(coarse))["voxel"].numpy(),
        }
        for name, voxel in estimates.items():
            errors[name].append(np.linalg.norm(voxel - truth, axis=1) * config.spacing_mm)
        print(row["subject"], {name: round(float(e[-1].mean()), 2) for name, e in errors.items()}, flush=True)
    return {name: np.stack(values) for name, values in errors.items()}


def summary(errors: dict[str, np.ndarray], names: list[str]) -> dict:
    return {
        name: {
            "mean_mm": float(e.mean()),
            "median_mm": float(np.median(e)),
            "p90_mm": float(np.percentile(e, 90)),
            "per_landmark_mean_mm": dict(zip(names, (float(v) for v in e.mean(axis=0)))),
        }
        for name, e in errors.items()
    }


def run_description(run_dir: Path, stage: str) -> dict:
    """What identifies a training run without its machine's paths: its steps and its stage's network."""
    summary = json.loads((run_dir / "summary.json").read_text())
    network = json.loads((run_dir / "config.json").read_text())[stage]["network"]
    return {"steps": int(summary["step"]), "mdgru_units": network["mdgru_units"],
            "fc_channels": network["fc_channels"]}


def _describe(run: dict | str) -> str:
    if isinstance(run, str):  # results written before runs were described by their steps and network
        return f"`{run}`"
    return f"{run['steps']} steps, MD-GRU units {run['mdgru_units']}"


def markdown(result: dict) -> str:
    lines = [
        f"Run on {result['date']} (`make bench-stages`), coarse run: {_describe(result['runs']['coarse'])}, fine "
        f"run: {_describe(result['runs']['fine'])}; plain stages (no mirror, one pass). Error mm: mean / median / "
        "90th percentile.",
        "",
        "| heads | scans | " + " | ".join(ESTIMATES) + " |",
        "| --- | ---: |" + " ---: |" * len(ESTIMATES),
    ]
    for condition, values in result["conditions"].items():
        cells = [f"{values[e]['mean_mm']:.2f} / {values[e]['median_mm']:.2f} / {values[e]['p90_mm']:.1f}"
                 for e in ESTIMATES]
        lines.append(f"| {condition} | {values['scans']} | " + " | ".join(cells) + " |")
    conditions = list(result["conditions"])
    lines += [
        "",
        "The fine network's own error per landmark (windows centred on the truth; mean mm):",
        "",
        "| landmark | " + " | ".join(conditions) + " |",
        "| --- |" + " ---: |" * len(conditions),
    ]
    first = result["conditions"][conditions[0]]["fine at truth"]["per_landmark_mean_mm"]
    for name in first:
        cells = [f"{result['conditions'][c]['fine at truth']['per_landmark_mean_mm'][name]:.2f}" for c in conditions]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_model_card(result: dict) -> None:
    MODEL_CARD.write_text(with_section(MODEL_CARD.read_text(), BEGIN, END, markdown(result)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "model-afids",
                        help="make model-afids's working folder (coarse/, fine/, dataset/, population/)")
    parser.add_argument("--demo", type=Path, default=ROOT / "demo")
    parser.add_argument("--subjects-dir", type=Path, default=ROOT / "runs" / "bench-pretrained",
                        help="the test heads of make bench-pretrained (made here when missing)")
    parser.add_argument("--subjects", type=int, default=8, help="test heads per condition, when they are made")
    parser.add_argument("--train-subjects", type=int, default=8, help="training heads to measure the fit on")
    parser.add_argument("--json", type=Path, default=RESULTS_JSON, help="where the results go")
    parser.add_argument("--no-model-card", action="store_true", help="leave docs/MODEL_CARD.md alone")
    parser.add_argument("--render-only", action="store_true", help="rewrite the Markdown from the JSON")
    args = parser.parse_args(argv)
    if args.render_only:
        result = json.loads(args.json.read_text())
    else:
        work = args.work.resolve()
        manifests = condition_manifests(args.demo.resolve(), args.subjects_dir.resolve(), args.subjects)
        chosen = {name: manifests[name] for name in CONDITIONS}
        chosen["training"] = training_manifest(work, args.train_subjects, work / "bench-stages")
        localizer = load_localizer(work)
        names = list(localizer.config.landmarks)
        conditions = {}
        for condition, manifest in chosen.items():
            errors = stage_errors(localizer, manifest)
            conditions[condition] = {"scans": int(errors["coarse"].shape[0]), **summary(errors, names)}
        result = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": {"processor": _cpu_name(), "cores": os.cpu_count()},
            "runs": {stage: run_description(work / stage, stage) for stage in ("coarse", "fine")},
            "offset_mm": OFFSET_MM,
            "conditions": conditions,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if not args.no_model_card:
        write_model_card(result)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
