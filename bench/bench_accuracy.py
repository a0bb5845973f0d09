"""Benchmark: localization accuracy on held-out synthetic subjects, next to the two baselines.

Run: ``python -m bench.bench_accuracy`` (``make bench-accuracy``); about 75 minutes on 2 CPU cores
with the defaults. Every step is the user's own command (``mdgru-localize ...``), run as a subprocess and
timed:

1. ``demo-data`` (the AFIDs template, T1w and T2w, with 32 expert-placed fiducials), unless already there;
2. ``synth``: ``--train-subjects`` training/validation subjects (seed 11) and ``--test-subjects`` test
   subjects (seed 12: deformations, poses and fields of view never seen in training), T1w and T2w mixed;
3. ``prepare`` (10 % of the training subjects for validation);
4. per experiment, ``train`` coarse and fine for a wall-clock budget each, ``export``, and ``evaluate`` on
   the test subjects: ``pmj`` (the PMJ alone, with the registration and U-Net baselines; the U-Net gets the
   fine stage's budget, ``train-unet``) and ``afids32`` (all 32 AFIDs in one multi-landmark model, with the
   registration baseline).

Writes ``bench/results/bench_accuracy.json`` (everything: commands, timings, the evaluation tables) and the
section between ``<!-- bench-accuracy:begin -->`` and ``<!-- bench-accuracy:end -->`` of
``docs/RESULTS.md``. A finished step is not repeated when the script runs again with the same ``--out``
(delete the folder to start over), so an interrupted benchmark resumes at the step it was in.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_JSON = ROOT / "bench" / "results" / "bench_accuracy.json"
RESULTS_MD = ROOT / "docs" / "RESULTS.md"
BEGIN, END = "<!-- bench-accuracy:begin -->", "<!-- bench-accuracy:end -->"
T1 = "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"
T2 = "tpl-MNI152NLin2009cAsym_res-01_T2w.nii.gz"
FIDUCIALS = "afids.fcsv"
GOALS_MM = {"pmj": 1.0, "afids32": 1.5}


def cli() -> list[str]:
    """``mdgru-localize`` of this interpreter's environment."""
    return [str(Path(sys.executable).parent / "mdgru-localize")]


class Steps:
    """Runs commands once each (a marker file records success), timing them and keeping the command lines."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.done_dir = out / ".done"
        self.done_dir.mkdir(parents=True, exist_ok=True)
        self.log: list[dict] = []
        self.timings_path = out / "timings.json"
        self.timings = json.loads(self.timings_path.read_text()) if self.timings_path.exists() else {}

    def run(self, name: str, command: list[str]) -> float:
        line = " ".join(shlex.quote(str(part)) for part in command)
        self.log.append({"step": name, "command": line})
        marker = self.done_dir / name
        if marker.exists():
            print(f"[bench-accuracy] {name}: done earlier ({self.timings.get(name, float('nan')):.0f} s)", flush=True)
            return self.timings.get(name, float("nan"))
        print(f"[bench-accuracy] {name}: {line}", flush=True)
        start = time.perf_counter()
        subprocess.run([str(part) for part in command], check=True, cwd=ROOT)
        seconds = time.perf_counter() - start
        self.timings[name] = seconds
        self.timings_path.write_text(json.dumps(self.timings, indent=2))
        marker.touch()
        return seconds


def gpus() -> str:
    """The NVIDIA GPUs ``nvidia-smi -L`` lists (``none`` without a driver or GPU)."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "none"
    return "; ".join(line.strip() for line in listing.splitlines() if line.strip()) or "none"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu,
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_at_end": [round(x, 2) for x in load] if load else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": gpus(),
    }


def training_summary(run_dir: Path) -> dict:
    """Steps, epochs, seconds and final validation error of one stage's run (from its log.csv)."""
    from mdgru_keras.training.callbacks import read_csv

    rows = read_csv(run_dir / "log.csv")
    last = rows[-1] if rows else {}
    return {
        "steps": int(last.get("step", 0)),
        "epochs": last.get("epoch", 0.0),
        "seconds": last.get("elapsed_s", 0.0),
        "final_val_error_mm_mean": last.get("val_error_mm_mean", float("nan")),
    }


def run_experiment(steps: Steps, args, name: str, landmarks: str, dataset: Path, test_manifest: Path,
                   demo: Path, unet: bool) -> dict:
    run = args.out / name
    for stage, seconds in (("coarse", args.coarse_seconds), ("fine", args.fine_seconds)):
        steps.run(f"{name}-train-{stage}", cli() + [
            "train", "--stage", stage, "--config", args.config, "--landmarks", landmarks, "--data", dataset,
            "--out", run / stage, "--max-seconds", seconds, "--epochs", 100000, "--quiet",
        ])
    steps.run(f"{name}-export", cli() + [
        "export", "--coarse", run / "coarse", "--fine", run / "fine", "--out", run / "export", "--name", "mdgru",
    ])
    evaluate = cli() + [
        "evaluate", "--model", run / "export" / "mdgru", "--manifest", test_manifest, "--json",
        run / "evaluation.json", "--figures", run / "figures",
        "--baseline", "registration", "--template", demo / T1, "--template-landmarks", demo / FIDUCIALS,
    ]
    if unet:  # the U-Net learns the preset's landmarks: PMJ in the cpu and paper presets
        steps.run(f"{name}-train-unet", cli() + [
            "train-unet", "--config", args.config, "--data", dataset, "--out", run / "unet.keras",
            "--budget-seconds", args.fine_seconds, "--quiet",
        ])
        evaluate += ["--baseline", "unet", "--unet-model", run / "unet.keras"]
    steps.run(f"{name}-evaluate", evaluate)
    evaluation = json.loads((run / "evaluation.json").read_text())
    return {
        "landmarks": landmarks,
        "training": {stage: training_summary(run / stage) for stage in ("coarse", "fine")},
        "evaluation": evaluation,
    }


def markdown(result: dict) -> str:
    """The RESULTS.md section: setup, one table per experiment, goals, timings, commands."""
    out = [BEGIN, "", "## `make bench-accuracy`", ""]
    settings = result["settings"]
    out += [
        f"Run on {result['date']} on {result['machine']['cpu']} ({result['machine']['cores_available']} cores, "
        f"GPU: {result['machine']['gpu']}; load average at the end {result['machine']['load_average_at_end']}). "
        f"Preset `{settings['config']}`; {settings['train_subjects']} synthetic training subjects (seed 11, 10 % of "
        f"them for validation) and {settings['test_subjects']} held-out test subjects (seed 12: deformations, "
        f"poses and fields of view never seen in training), T1w and T2w mixed, all from the AFIDs MNI template. "
        f"Training budget per stage: coarse {settings['coarse_seconds']:.0f} s, fine "
        f"{settings['fine_seconds']:.0f} s; the U-Net baseline gets the fine stage's budget. Whole benchmark: "
        f"{result['total_seconds'] / 60:.1f} min.",
        "",
    ]
    for name, experiment in result["experiments"].items():
        evaluation = experiment["evaluation"]
        out += [f"### {name}: landmarks {experiment['landmarks']}", ""]
        out += ["| method | subjects x landmarks | median mm | mean ± std mm | max mm | median voxel |",
                "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for method in evaluation["methods"]:
            row = evaluation["rows"][method]["overall"]
            out.append(
                f"| {method} | {row['count']} | {row['median_mm']:.2f} | {row['mean_mm']:.2f} ± {row['std_mm']:.2f} "
                f"| {row['max_mm']:.2f} | {row['median_voxel']:.2f} |"
            )
        main = evaluation["rows"][evaluation["model_method"]]["overall"]["mean_mm"]
        goal = GOALS_MM.get(name)
        baselines = {m: evaluation["rows"][m]["overall"]["mean_mm"] for m in ("registration", "unet")
                     if m in evaluation["rows"]}
        verdict = f"mean {main:.2f} mm with `{evaluation['model_method']}`"
        if goal is not None:
            verdict += f" against the goal of ≤ {goal} mm: **{'met' if main <= goal else 'not met'}**"
        if baselines:
            verdict += "; " + ", ".join(
                f"{'below' if main < value else 'not below'} {method} ({value:.2f} mm)"
                for method, value in baselines.items()
            )
        training = experiment["training"]
        seconds = evaluation.get("median_seconds_per_scan", {})
        out += [
            "",
            f"Goal: {verdict}.",
            "",
            "Training: " + "; ".join(
                f"{stage} {t['steps']} steps ({t['epochs']:.0f} epochs) in {t['seconds']:.0f} s, last validation "
                f"error {t['final_val_error_mm_mean']:.1f} mm" for stage, t in training.items()
            ) + ". Median seconds per scan in `evaluate`: " + ", ".join(
                f"{method} {value:.2f} s" for method, value in seconds.items()
            ) + ".",
            "",
        ]
    out += ["Reproduce with `make bench-accuracy` (`python -m bench.bench_accuracy`), which ran these commands in "
            "order (`demo/` is the demo-data folder; seconds per step in `bench/results/bench_accuracy.json`):", "",
            "```"]
    demo_dir = settings.get("demo")
    for step in result["commands"]:
        line = step["command"].replace(str(ROOT) + "/", "")
        out.append(line.replace(demo_dir.rstrip("/") + "/", "demo/") if demo_dir else line)
    out += ["```", "", END]
    return "\n".join(out) + "\n"


def write_section(section: str) -> None:
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Results\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section.rstrip("\n") + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS_MD.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-accuracy")
    parser.add_argument("--demo", type=Path, default=ROOT / "demo", help="demo-data folder (made if missing)")
    parser.add_argument("--config", default="cpu")
    parser.add_argument("--train-subjects", type=int, default=64)
    parser.add_argument("--test-subjects", type=int, default=12)
    parser.add_argument("--coarse-seconds", type=float, default=840)
    parser.add_argument("--fine-seconds", type=float, default=660)
    parser.add_argument("--experiments", nargs="+", default=["pmj", "afids32"], choices=["pmj", "afids32"])
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/RESULTS.md")
    parser.add_argument("--render-only", action="store_true",
                        help="only rewrite the docs/RESULTS.md section from bench/results/bench_accuracy.json")
    parser.add_argument("--demo-dir-was", help="with --render-only: the demo folder of that run, if not recorded")
    args = parser.parse_args()
    if args.render_only:
        result = json.loads(RESULTS_JSON.read_text())
        if args.demo_dir_was:
            result["settings"].setdefault("demo", args.demo_dir_was)
        write_section(markdown(result))
        print(f"[bench-accuracy] rewrote the section of {RESULTS_MD.relative_to(ROOT)}")
        return
    args.out = args.out.resolve()
    demo = args.demo.resolve()
    steps = Steps(args.out)
    if not (demo / FIDUCIALS).exists():
        steps.run("demo-data", cli() + ["demo-data", "--out", demo])
    for split, count, seed in (("train", args.train_subjects, 11), ("test", args.test_subjects, 12)):
        steps.run(f"synth-{split}", cli() + [
            "synth", "--image", demo / T1, "--image2", demo / T2, "--landmarks", demo / FIDUCIALS, "--n", count,
            "--seed", seed, "--workers", 2, "--out", args.out / split,
        ])
    dataset = args.out / "dataset"
    steps.run("prepare", cli() + [
        "prepare", args.out / "train" / "manifest.csv", "--out", dataset, "--val-fraction", 0.1,
        "--test-fraction", 0, "--overwrite",
    ])
    experiments = {}
    for name in args.experiments:
        landmarks = "PMJ" if name == "pmj" else "all"
        experiments[name] = run_experiment(steps, args, name, landmarks, dataset, args.out / "test" / "manifest.csv",
                                           demo, unet=name == "pmj")
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "settings": {"config": args.config, "demo": str(demo), "train_subjects": args.train_subjects,
                     "test_subjects": args.test_subjects, "coarse_seconds": args.coarse_seconds,
                     "fine_seconds": args.fine_seconds},
        "total_seconds": sum(steps.timings.values()),  # all steps, also of earlier interrupted runs
        "step_seconds": steps.timings,
        "commands": steps.log,
        "experiments": experiments,
    }
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(result, indent=2) + "\n")
    section = markdown(result)
    print(section)
    if not args.no_docs:
        write_section(section)
        print(f"[bench-accuracy] wrote {RESULTS_JSON.relative_to(ROOT)} and {RESULTS_MD.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
