"""Benchmark: throughput of the cohort workflow (workflow/Snakefile) against one long-running ``predict``.

Run: ``python -m bench.bench_cohort`` (``make bench-cohort``; ``--participants``, ``--small-group``,
``--repeats``; ``--render-only`` redoes the derived numbers and the Markdown from the JSON's times). About 13 min
on 2 cores with the defaults.

Data: a BIDS dataset of ``--participants`` T1w scans, 1 mm heads made by ``mdgru-localize synth`` from the demo
template (``mdgru-localize demo-data``; made once and kept in ``--work``, gzipped as BIDS datasets usually are).
Model: the one shipped with the package (the default of ``predict`` and ``bids``). Every run below is a user
command in a fresh output folder, on the same scans, and each round runs each of them once (rounds interleave
the methods, so that a change of load hits all of them):

* ``predict-all``: one ``mdgru-localize predict`` over all N scans (``--format fcsv``, a file per scan, and
  ``--report``, a QC page per scan: the work the BIDS App does);
* ``predict-one``: ``predict`` of one scan (a different one each round): a process per scan, extrapolated;
* ``workflow-gG``: ``snakemake -s workflow/Snakefile --cores 2`` with ``participants_per_job`` G, once with G = N
  (one job) and once with ``--small-group`` (several jobs, one after another: each job takes both cores).
  ``mdgru_localize`` is a wrapper that times each job's ``mdgru-localize bids`` call, so that a workflow's wall
  time splits into its jobs, its group level and Snakemake's own time.

* ``library``: ``predict``'s code path (:func:`mdgru_keras.prediction.predict_scan`) in this process, the model
  loaded once before the rounds: each scan's time, i.e. the per-scan time t of a long-running ``predict``.

Derived (medians over the rounds):

* t: the mean over the N scans of ``library``; (predict-all - predict-one) / (N - 1) as a check; a ``predict``
  process's start-up L = predict-one - t;
* t_job: the mean time between two scans' outputs inside a workflow job (each scan's sidecar is written when
  the scan is done), which also splits a job into start-up (to its first scan's outputs, less t_job), scans
  and exit;
* per-job start-up as the issue defines it: (workflow wall - N t) / jobs, for each group size; S, the cost of
  one more job: a job's wall less its scans (N t_job), median over every job; fixed, what a workflow pays once
  whatever its jobs: Snakemake's own time plus the group level. As a check, both from the two workflows' walls
  alone: S = (W_small - W_N) / (jobs_small - 1), fixed = W_N - S - N t_job;
* projected throughput ratios (L + M t) / (fixed + ceil(M / G) S + M t_job) for cohorts of M scans in jobs of
  G, and the smallest G that reaches the goal (the workflow's throughput >= 85 % of one ``predict``'s).

Every time comes with the CPU-seconds of the same processes (``getrusage`` of the children, user + system) and
with the run's 2048^2 float32 matmul GFLOP/s (before and after). Writes ``bench/results/bench_cohort.json`` and
the section between the markers in ``docs/BENCH_COHORT.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.bench_pretrained import _cpu_name, matmul_gflops
from bench.doc_sections import with_section

ROOT = Path(__file__).resolve().parent.parent
RESULTS_JSON = ROOT / "bench" / "results" / "bench_cohort.json"
DOC = ROOT / "docs" / "BENCH_COHORT.md"
BEGIN, END = "<!-- bench-cohort:begin -->", "<!-- bench-cohort:end -->"
SNAKEFILE = ROOT / "workflow" / "Snakefile"
T1 = "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"
FIDUCIALS = "afids.fcsv"
GOAL = 0.85  # the workflow's throughput over one long-running predict's
SYNTH_SEED = 301
# 1 mm heads: the synthetic population's shapes, contrasts, poses and fields of view, no coarser voxels
SYNTH_OPTIONS = ["--lowres-probability", "0", "--anisotropic-probability", "0", "--gzip"]
BIN = Path(sys.executable).parent
CLI = BIN / "mdgru-localize"
SNAKEMAKE = BIN / "snakemake"
WRAPPER = '''#!{python}
"""mdgru-localize, timed: appends one JSON line per call to {times}."""
import itertools, json, resource, subprocess, sys, time
started = time.time()
status = subprocess.call([{cli!r}, *sys.argv[1:]])
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
level = next((word for word in sys.argv[1:] if word in ("participant", "group")), "")
after = sys.argv[sys.argv.index("--participant-label") + 1:] if "--participant-label" in sys.argv else []
labels = list(itertools.takewhile(lambda word: not word.startswith("--"), after))
with open({times!r}, "a") as file:
    file.write(json.dumps({{"level": level, "started": started, "wall_s": time.time() - started,
                           "cpu_s": usage.ru_utime + usage.ru_stime, "status": status,
                           "participants": len(labels)}}) + "\\n")
sys.exit(status)
'''


def environment() -> dict[str, str]:
    """This checkout's code first (also for the workflow's jobs), TensorFlow's start-up messages off."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "TF_CPP_MIN_LOG_LEVEL": "2"}  # fmt: skip


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], cwd: Path, log: Path) -> dict:
    """Run ``command`` (output to ``log``); its wall time and the CPU-seconds of it and its children."""
    print("$", " ".join(command), flush=True)
    cwd.mkdir(parents=True, exist_ok=True)
    cpu0, started = children_cpu_s(), time.time()
    with open(log, "wb") as output:
        status = subprocess.run(command, cwd=cwd, env=environment(), stdout=output, stderr=subprocess.STDOUT).returncode
    wall, cpu = time.time() - started, children_cpu_s() - cpu0
    if status != 0:
        raise RuntimeError(
            f"{command[0]} ended with status {status}; its output: {log}\n" + log.read_text(errors="replace")[-3000:]
        )
    print(f"  {wall:.1f} s wall, {cpu:.1f} CPU-s", flush=True)
    return {"wall_s": wall, "cpu_s": cpu, "started": started}


def make_dataset(demo: Path, work: Path, participants: int) -> tuple[Path, list[Path]]:
    """A BIDS dataset of ``participants`` synthetic 1 mm T1w heads (made once, kept in ``work``); its scans."""
    bids_dir = work / f"bids-n{participants}-seed{SYNTH_SEED}"
    labels = [f"{index:02d}" for index in range(1, participants + 1)]
    scans = [bids_dir / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz" for label in labels]
    if (bids_dir / "dataset_description.json").is_file() and all(scan.is_file() for scan in scans):
        return bids_dir, scans
    if not (demo / FIDUCIALS).is_file():
        subprocess.run([str(CLI), "demo-data", "--out", str(demo)], check=True, env=environment())
    synth = work / f"synth-n{participants}-seed{SYNTH_SEED}"
    if not (synth / "manifest.csv").is_file():
        subprocess.run([str(CLI), "synth", "--image", str(demo / T1), "--landmarks", str(demo / FIDUCIALS), "--n",
                        str(participants), "--seed", str(SYNTH_SEED), "--workers", "2", "--out", str(synth),
                        *SYNTH_OPTIONS], check=True, env=environment())  # fmt: skip
    with open(synth / "manifest.csv", newline="") as file:
        images = [synth / row["image"] for row in csv.DictReader(file)]
    shutil.rmtree(bids_dir, ignore_errors=True)
    bids_dir.mkdir(parents=True)
    for image, scan in zip(images, scans, strict=True):
        scan.parent.mkdir(parents=True)
        shutil.copyfile(image, scan)
    (bids_dir / "participants.tsv").write_text("participant_id\n" + "".join(f"sub-{label}\n" for label in labels))
    description = {"Name": f"bench-cohort: {participants} synthetic heads (mdgru-localize synth --seed "
                           f"{SYNTH_SEED})", "BIDSVersion": "1.10.0", "DatasetType": "raw"}  # fmt: skip
    (bids_dir / "dataset_description.json").write_text(json.dumps(description, indent=1) + "\n")
    return bids_dir, scans


def run_predict(scans: list[Path], folder: Path) -> dict:
    shutil.rmtree(folder, ignore_errors=True)
    out = folder / "out"
    out.mkdir(parents=True)
    return timed(
        # --report: a QC page per scan, as `bids` writes one per participant, so that both do the same work
        [str(CLI), "predict", *map(str, scans), "--format", "fcsv", "--out", str(out), "--report",
         str(folder / "report")], folder, folder / "predict.log",
    )  # fmt: skip


def run_workflow(bids_dir: Path, folder: Path, per_job: int) -> dict:
    """The workflow in a fresh folder (its .snakemake/ there too); wall and CPU, and each job's from the wrapper."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    times = folder / "jobs.jsonl"
    wrapper = folder / "mdgru-localize-timed"
    wrapper.write_text(WRAPPER.format(python=sys.executable, cli=str(CLI), times=str(times)))
    wrapper.chmod(0o755)
    result = timed([str(SNAKEMAKE), "-s", str(SNAKEFILE), "--cores", "2", "--config", f"bids_dir={bids_dir}",
                    f"output_dir={folder / 'out'}", f"participants_per_job={per_job}", f"mdgru_localize={wrapper}"],
                   folder, folder / "snakemake.log")  # fmt: skip
    calls = [json.loads(line) for line in times.read_text().splitlines()]
    # each scan's sidecar is written (atomically) as soon as the scan is done: its mtime is when the scan ended
    finished = sorted(path.stat().st_mtime for path in (folder / "out").glob("sub-*/**/*_desc-mdgru_afids.json"))
    jobs = []
    for call in (call for call in calls if call["level"] == "participant"):
        ended = call["started"] + call["wall_s"]
        done = [moment for moment in finished if call["started"] <= moment <= ended]
        jobs.append({
            "wall_s": call["wall_s"], "cpu_s": call["cpu_s"], "participants": call["participants"],
            "to_first_scan_s": done[0] - call["started"], "scan_gaps_s": [b - a for a, b in zip(done, done[1:])],
            "after_last_scan_s": ended - done[-1],
        })  # fmt: skip
    result.update(
        jobs=jobs,
        group_s=sum(call["wall_s"] for call in calls if call["level"] == "group"),
        snakemake_s=result["wall_s"] - sum(call["wall_s"] for call in calls),
        first_job_after_s=min(call["started"] for call in calls) - result["started"],
    )
    return result


def open_model():
    """The shipped model loaded in this process, warmed up by one scan (not counted)."""
    from mdgru_keras.pretrained import DEFAULT_MODEL, pretrained_model_dir
    from mdgru_keras.serving.servable import LocalLocalizationClient

    return LocalLocalizationClient(pretrained_model_dir(DEFAULT_MODEL))


def library_per_scan(client, scans: list[Path]) -> dict:
    """``predict``'s code path in this process, the model loaded once: each scan's wall and CPU time (the
    per-scan time t of a long-running ``predict``, measured in every round next to the other methods)."""
    from mdgru_keras.prediction import predict_scan

    print("predict's code path in this process, model loaded once", flush=True)
    wall, cpu = [], []
    for scan in scans:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        predict_scan(client, scan)
        wall.append(time.perf_counter() - wall0)
        cpu.append(time.process_time() - cpu0)
    print(f"  {statistics.mean(wall):.2f} s wall, {statistics.mean(cpu):.2f} CPU-s per scan", flush=True)
    return {"wall_s": wall, "cpu_s": cpu}


def median(values: list[float]) -> float:
    return statistics.median(values)


def summarize(raw: dict, participants: int, small_group: int) -> dict:
    """Throughputs, start-up costs and the group size that reaches the goal, from the medians of the rounds."""
    n = participants
    all_s = median([run["wall_s"] for run in raw["predict_all"]])
    one_s = median([run["wall_s"] for run in raw["predict_one"]])
    # t: per round the mean over the scans (as throughput is), then the median over the rounds
    per_scan_s = median([statistics.mean(run["wall_s"]) for run in raw["library"]])
    # t inside the workflow's jobs: the mean time between two scans' outputs in a job, median over the runs
    job_per_scan_s = median([
        statistics.mean(gaps) for runs in raw["workflow"].values() for run in runs
        if (gaps := [gap for job in run["jobs"] for gap in job["scan_gaps_s"]])
    ])  # fmt: skip
    summary = {
        "per_scan_s": per_scan_s,
        "per_scan_cpu_s": median([statistics.mean(run["cpu_s"]) for run in raw["library"]]),
        "per_scan_s_two_point": (all_s - one_s) / (n - 1),  # a check: (predict of N - predict of 1) / (N - 1)
        "job_per_scan_s": job_per_scan_s,
        "process_startup_s": one_s - per_scan_s,
        "methods": {},
    }
    methods = summary["methods"]
    for name, runs, scans in (("predict-all", raw["predict_all"], n), ("predict-one", raw["predict_one"], 1)):
        wall = median([run["wall_s"] for run in runs])
        methods[name] = {"processes": 1 if name == "predict-all" else n, "wall_s": wall,
                         "cpu_s": median([run["cpu_s"] for run in runs]), "scans": scans,
                         "scans_per_min": 60 * scans / wall, "runs": len(runs)}  # fmt: skip
    methods["predict-one"]["wall_s_all"] = n * one_s  # extrapolated to the N scans
    methods["predict-one"]["throughput_vs_predict_all"] = all_s / (n * one_s)
    jobs_of = {}
    for key, runs in raw["workflow"].items():
        group = int(key)
        jobs_of[group] = math.ceil(n / group)
        wall = median([run["wall_s"] for run in runs])
        jobs = [job for run in runs for job in run["jobs"]]
        methods[f"workflow-g{group}"] = {
            "processes": jobs_of[group] + 1, "participants_per_job": group, "jobs": jobs_of[group], "wall_s": wall,
            "cpu_s": median([run["cpu_s"] for run in runs]), "scans": n, "scans_per_min": 60 * n / wall,
            "runs": len(runs), "throughput_vs_predict_all": all_s / wall,
            "throughput_vs_predict_all_by_round": [
                before["wall_s"] / run["wall_s"] for before, run in zip(raw["predict_all"], runs)
            ],
            # the issue's definition: every cost but the scans' own work, per job
            "job_startup_s": (wall - n * per_scan_s) / jobs_of[group],
            "job_wall_s": median([job["wall_s"] for job in jobs]),
            "job_startup_measured_s": median([job["wall_s"] - job["participants"] * job_per_scan_s for job in jobs]),
            "job_to_first_scan_s": median([job["to_first_scan_s"] for job in jobs]),
            "job_after_last_scan_s": median([job["after_last_scan_s"] for job in jobs]),
            "group_level_s": median([run["group_s"] for run in runs]),
            "snakemake_s": median([run["snakemake_s"] for run in runs]),
            "first_job_after_s": median([run["first_job_after_s"] for run in runs]),
        }  # fmt: skip
    big, small = methods[f"workflow-g{n}"], methods[f"workflow-g{small_group}"]
    # S and fixed as measured inside the runs: a job's wall less its scans; Snakemake's own time and the group level
    workflow_jobs = [job for runs in raw["workflow"].values() for run in runs for job in run["jobs"]]
    workflow_runs = [run for runs in raw["workflow"].values() for run in runs]
    job_startup = median([job["wall_s"] - job["participants"] * job_per_scan_s for job in workflow_jobs])
    fixed = median([run["snakemake_s"] + run["group_s"] for run in workflow_runs])
    # the same from the two workflows' walls alone: the slope between the group sizes, and what is left
    slope = (small["wall_s"] - big["wall_s"]) / (jobs_of[small_group] - 1)
    summary.update(
        job_startup_measured_s=job_startup, workflow_fixed_s=fixed, job_startup_slope_s=slope,
        workflow_fixed_from_slope_s=big["wall_s"] - slope - n * job_per_scan_s, goal=GOAL,
    )  # fmt: skip
    summary["projection"] = project(summary["process_startup_s"], per_scan_s, job_startup, fixed, job_per_scan_s, n)
    # a long cohort, jobs one after another: per scan t_job + S / G against predict's t
    room = per_scan_s / GOAL - job_per_scan_s
    summary["group_reaching_goal_long_cohort"] = math.ceil(job_startup / room) if room > 0 else None
    return summary


PROJECTED_COHORTS = (50, 100, 500, 1000)
PROJECTED_GROUPS = (10, 25, 50, 100, 200)


def project(
    process_startup_s: float, per_scan_s: float, job_startup_s: float, fixed_s: float, job_per_scan_s: float, n: int
) -> dict:
    """Throughput of the workflow over one ``predict``'s for cohorts of M scans and groups of G, from the measured
    costs: one ``predict``: L + M t; the workflow: fixed + ceil(M / G) S + M t_job (jobs one after another); and
    per cohort the smallest G that reaches :data:`GOAL` (None: not even one job does)."""

    def ratio(cohort: int, group: int) -> float:
        workflow = fixed_s + math.ceil(cohort / group) * job_startup_s + cohort * job_per_scan_s
        return (process_startup_s + cohort * per_scan_s) / workflow

    projection = {}
    for cohort in (n, *PROJECTED_COHORTS):
        reaching = [group for group in range(1, cohort + 1) if ratio(cohort, group) >= GOAL]
        projection[str(cohort)] = {
            "by_group": {str(group): ratio(cohort, group) for group in PROJECTED_GROUPS},
            "one_job": ratio(cohort, cohort),
            "smallest_group_reaching_goal": min(reaching) if reaching else None,
        }
    return projection


def markdown(result: dict) -> str:
    s, m = result["summary"], result["summary"]["methods"]
    n = result["participants"]
    lines = [
        f"Run on {result['date']} on {result['machine']['processor']} ({result['machine']['cores']} cores; 2048² "
        f"float32 matmul {result['matmul_gflops']:.0f} GFLOP/s in the same run, {result['matmul_gflops_end']:.0f} "
        f"at its end; load average {result['load_average_start'][0]:.1f} before, "
        f"{result['load_average_end'][0]:.1f} after). `make bench-cohort`: {n} participants (one 1 mm T1w head "
        f"each, {result['scan_shapes']}), the shipped model, medians of {result['repeats']} rounds; the whole "
        f"bench took {result['bench_minutes']:.0f} min.",
        "",
        "| method | processes | wall s | CPU-s | scans/min | throughput / one `predict` | start-up per process "
        "or job s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    row = m["predict-all"]
    lines.append(
        f"| one `predict` over all {n} scans | 1 | {row['wall_s']:.1f} | {row['cpu_s']:.1f} | "
        f"{row['scans_per_min']:.1f} | 1 | {s['process_startup_s']:.1f} |"
    )
    row = m["predict-one"]
    lines.append(
        f"| `predict` once per scan (1 scan per round, × {n}) | {n} | {row['wall_s_all']:.1f} "
        f"({row['wall_s']:.1f} each) | {n * row['cpu_s']:.1f} ({row['cpu_s']:.1f} each) | "
        f"{row['scans_per_min']:.1f} | {row['throughput_vs_predict_all']:.2f} | "
        f"{s['process_startup_s']:.1f} |"
    )
    for name, row in m.items():
        if not name.startswith("workflow"):
            continue
        lines.append(
            f"| workflow, {row['participants_per_job']} per job ({row['jobs']} job{'s' if row['jobs'] > 1 else ''} "
            f"+ group level) | {row['processes']} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} | "
            f"{row['scans_per_min']:.1f} | **{row['throughput_vs_predict_all']:.2f}** | {row['job_startup_s']:.1f} |"
        )
    rows = [row for name, row in m.items() if name.startswith("workflow")]
    lines += [
        "",
        f"Per scan, `predict`'s code path with the model loaded once (in the bench's process, mean of the {n} "
        f"scans): **t = {s['per_scan_s']:.2f} s** wall ({s['per_scan_cpu_s']:.2f} CPU-s; (one `predict` of {n} − "
        f"of 1) / {n - 1} gives {s['per_scan_s_two_point']:.2f} s). A `predict` process's start-up (Python, "
        f"TensorFlow, loading the model, the first call's graph optimization, exit): **L = "
        f"{s['process_startup_s']:.1f} s**. The workflow's last column is the issue's per-job start-up, "
        "(workflow wall − N t) / jobs: every cost but the scans' own work, put on the jobs.",
        "",
        "Each round's own ratio (its `predict` over all scans / its workflow): "
        + "; ".join(
            f"{row['participants_per_job']} per job: "
            + ", ".join(f"{ratio:.2f}" for ratio in row["throughput_vs_predict_all_by_round"])
            for row in rows
        )
        + ".",
        "",
        f"Where a workflow's time goes (medians; a scan is done when its outputs are written; per scan in a job: "
        f"**t_job = {s['job_per_scan_s']:.2f} s**):",
        "",
        "| participants per job | a job's wall s | its start-up s (wall − its scans × t_job) | job start to its "
        "first scan's outputs s | last outputs to job exit s | group level s | Snakemake's own s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['participants_per_job']} | {row['job_wall_s']:.1f} | {row['job_startup_measured_s']:.1f} | "
            f"{row['job_to_first_scan_s']:.1f} | {row['job_after_last_scan_s']:.1f} | {row['group_level_s']:.1f} | "
            f"{row['snakemake_s']:.1f} |"
        )
    goal = f"{s['goal']:.2f}"
    lines += [
        "",
        f"So a job costs **S = {s['job_startup_measured_s']:.1f} s** besides its scans (median over every job; the "
        f"slope between the two workflows' walls, (W_{result['small_group']} − W_{n}) / (jobs − 1), gives "
        f"{s['job_startup_slope_s']:.1f} s), and a workflow pays **{s['workflow_fixed_s']:.1f} s** once whatever its "
        f"jobs (Snakemake's own time and the group level; from the slope: {s['workflow_fixed_from_slope_s']:.1f} s). "
        f"Projected from these and L, t: throughput of the workflow / one `predict` for M scans in jobs of G "
        f"participants, (L + M t) / (fixed + ⌈M / G⌉ S + M t_job), and the smallest G that reaches the goal "
        f"(≥ {goal}); the first row is this run's N:",
        "",
        "| M scans | "
        + " | ".join(f"G = {group}" for group in PROJECTED_GROUPS)
        + f" | one job | smallest G ≥ {goal} |",
        "| ---: |" + " ---: |" * (len(PROJECTED_GROUPS) + 2),
    ]
    for cohort, row in s["projection"].items():
        reaching = row["smallest_group_reaching_goal"]
        cells = [f"{row['by_group'][str(group)]:.3f}" if group <= int(cohort) else "" for group in PROJECTED_GROUPS]
        lines.append(f"| {cohort} | " + " | ".join(cells) + f" | {row['one_job']:.3f} | {reaching or 'none'} |")
    lines += [
        "",
        f"For a very long cohort the ratio tends to t / (t_job + S / G): the goal needs G ≥ "
        f"{s['group_reaching_goal_long_cohort'] or '∞ (t_job > t / ' + goal + ')'}.",
    ]
    return "\n".join(lines)


def write_doc(result: dict) -> None:
    text = DOC.read_text() if DOC.is_file() else f"# Cohort throughput (`make bench-cohort`)\n\n{BEGIN}\n{END}\n"
    DOC.write_text(with_section(text, BEGIN, END, markdown(result)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=ROOT / "demo", help="the demo data (made when missing)")
    parser.add_argument(
        "--work",
        type=Path,
        default=ROOT / "runs" / "bench-cohort",
        help="the dataset (kept) and every run's output folder (made afresh)",
    )
    parser.add_argument("--participants", type=int, default=12, help="N, one T1w scan each")
    parser.add_argument(
        "--small-group",
        type=int,
        default=None,
        help="participants per job of the many-jobs workflow run (default: N / 3)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each runs every method once")
    parser.add_argument(
        "--render-only", action="store_true", help="redo the derived numbers and the Markdown from the JSON's times"
    )
    args = parser.parse_args(argv)
    if args.render_only:
        result = json.loads(RESULTS_JSON.read_text())
        result["summary"] = summarize(result["raw"], result["participants"], result["small_group"])
        RESULTS_JSON.write_text(json.dumps(result, indent=1) + "\n")
    else:
        n = args.participants
        small_group = args.small_group or max(1, n // 3)
        if n < 2 or not 1 <= small_group < n:
            parser.error(f"need --participants >= 2 and 1 <= --small-group < N; got N={n}, --small-group={small_group}")
        began = time.time()
        load_start = list(os.getloadavg())
        demo, work = args.demo.resolve(), args.work.resolve()
        bids_dir, scans = make_dataset(demo, work, n)
        gflops = matmul_gflops()
        from mdgru_keras.prediction import predict_scan

        client = open_model()
        predict_scan(client, scans[-1])  # warm-up, not counted
        raw = {"library": [], "predict_all": [], "predict_one": [], "workflow": {str(n): [], str(small_group): []}}
        for round_index in range(args.repeats):
            print(f"round {round_index + 1} of {args.repeats}", flush=True)
            runs = work / "runs"
            raw["predict_all"].append(run_predict(scans, runs / "predict-all"))
            for group in (n, small_group):
                raw["workflow"][str(group)].append(run_workflow(bids_dir, runs / f"workflow-g{group}", group))
            scan = scans[round_index * n // args.repeats]
            raw["predict_one"].append({**run_predict([scan], runs / "predict-one"), "scan": scan.name})
            raw["library"].append(library_per_scan(client, scans))
        client.close()
        import nibabel as nib

        shapes = sorted({"x".join(map(str, nib.load(scan).shape)) for scan in scans})
        result = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": {"processor": _cpu_name(), "cores": os.cpu_count()},
            "matmul_gflops": gflops,
            "matmul_gflops_end": matmul_gflops(),
            "load_average_start": load_start,
            "load_average_end": list(os.getloadavg()),
            "participants": n,
            "small_group": small_group,
            "repeats": args.repeats,
            "scan_shapes": f"{len(shapes)} field-of-view shapes from {shapes[0]} to {shapes[-1]}"
            if len(shapes) > 1
            else shapes[0],
            "synth": {"seed": SYNTH_SEED, "options": SYNTH_OPTIONS},
            "summary": summarize(raw, n, small_group),
            "raw": raw,
        }
        result["bench_minutes"] = (time.time() - began) / 60
        RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_JSON.write_text(json.dumps(result, indent=1) + "\n")
    write_doc(result)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
