"""The cohort workflow (workflow/Snakefile) run by Snakemake with --cores 2 on the small synthetic BIDS dataset
of tests/test_bids_app.py, with the toy localizer: the same outputs as the BIDS App run by hand; killed mid-way
and run again, it does only what was missing and ends with the same outputs as an uninterrupted run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mdgru_keras.serving.testing import save_toy_localizer
from tests.test_bids_app import make_dataset

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"
BIN = Path(sys.executable).parent
SNAKEMAKE = BIN / "snakemake"
if not SNAKEMAKE.is_file():
    pytest.skip(f"no {SNAKEMAKE}: pip install -e '.[dev]' installs Snakemake", allow_module_level=True)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("cohort")
    bids_dir = make_dataset(directory / "bids")
    save_toy_localizer(directory / "models" / "toy" / "1")
    return bids_dir, directory / "models" / "toy"


# T1w and T2w: every job has scans to write (sub-04 has a T2w only, sub-03 a corrupt T1w)
SUFFIXES = ("T1w", "T2w")
BATCHES = {"01-02": ("sub-01", "sub-02"), "03-04": ("sub-03", "sub-04")}


def _command(bids_dir: Path, model: Path, out: Path, per_job: int, cores: int = 2) -> list[str]:
    return [str(SNAKEMAKE), "-s", str(SNAKEFILE), "--cores", str(cores), "--rerun-incomplete", "--config",
            f"bids_dir={bids_dir}", f"output_dir={out}", f"model={model}", f"participants_per_job={per_job}",
            f"mdgru_localize={BIN / 'mdgru-localize'}", f"suffix=[{','.join(SUFFIXES)}]"]


def _environment() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "TF_CPP_MIN_LOG_LEVEL": "2"}


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=_environment(), capture_output=True, text=True, timeout=600)


def _outputs(out: Path) -> dict[str, bytes]:
    """Every file the workflow leaves in OUTPUT_DIR but its logs (they hold times and paths); the QC pages by
    name only (they show when they were made)."""
    return {
        str(path.relative_to(out)): b"" if path.suffix == ".html" else path.read_bytes()
        for path in sorted(out.rglob("*"))
        if path.is_file() and path.relative_to(out).parts[0] != "logs"
    }


@pytest.fixture(scope="module")
def uninterrupted(study: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """OUTPUT_DIR of one uninterrupted run (two jobs of two participants) and its log."""
    bids_dir, model = study
    directory = tmp_path_factory.mktemp("uninterrupted")
    result = _run(_command(bids_dir, model, directory / "out", per_job=2), directory)
    # sub-03's scan is corrupt: every output is written, then the workflow fails naming it
    assert result.returncode != 0
    return directory / "out", result.stdout + result.stderr


def test_the_workflow_writes_what_the_bids_app_writes(study: tuple[Path, Path], uninterrupted: tuple[Path, str],
                                                      tmp_path: Path) -> None:
    bids_dir, model = study
    out, log = uninterrupted
    assert "1 scan(s) could not be localized" in log and "sub-03_T1w.nii.gz" in log
    jobs = sorted(path.name for path in (out / "logs" / "workflow").glob("batch-*.done"))
    assert jobs == ["batch-01-02.done", "batch-03-04.done"]

    by_hand = tmp_path / "by-hand"
    cli = str(BIN / "mdgru-localize")
    first = _run([cli, "bids", str(bids_dir), str(by_hand), "participant", "--model", str(model),
                  "--suffix", *SUFFIXES], tmp_path)  # fmt: skip
    assert first.returncode == 1, first.stderr
    group = _run([cli, "bids", str(bids_dir), str(by_hand), "group", "--suffix", *SUFFIXES], tmp_path)
    assert group.returncode == 1, group.stderr
    expected = _outputs(by_hand)
    assert {"group_afids.tsv", "group_report.html", "sub-01.html"} <= set(expected)
    assert "sub-02/ses-2/anat" in " ".join(expected)
    assert _outputs(out) == expected


def test_a_killed_run_finishes_only_what_is_missing(study: tuple[Path, Path], uninterrupted: tuple[Path, str],
                                                    tmp_path: Path) -> None:
    bids_dir, model = study
    out = tmp_path / "out"
    command = _command(bids_dir, model, out, per_job=2, cores=1)  # one job at a time: killed after the first
    markers = out / "logs" / "workflow"
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(command, cwd=tmp_path, env=_environment(), start_new_session=True, stdout=log,
                                 stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not list(markers.glob("batch-*.done")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    running = first.poll() is None
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    done = sorted(path.name.removeprefix("batch-").removesuffix(".done") for path in markers.glob("batch-*.done"))
    assert running and len(done) == 1, (tmp_path / "first.log").read_text(errors="replace")[-3000:]
    (batch,) = done  # Snakemake picks which job runs first
    assert not (out / "group_summary.json").exists()
    finished = {path: path.stat().st_mtime_ns for path in out.glob("sub-*/**/*") if path.is_file()}
    # the outputs of the finished job's participants, and none of the others' (an .fcsv and a sidecar per scan:
    # sub-01 T1w and T2w, sub-02 three T1w; sub-03 none, its scan is corrupt; sub-04 its T2w)
    assert {path.relative_to(out).parts[0] for path in finished} == set(BATCHES[batch]) - {"sub-03"}
    assert len(finished) == {"01-02": 10, "03-04": 2}[batch]

    # Snakemake's own lock outlives a SIGKILL: it is lifted by hand, as docs/COHORTS.md says
    assert "--unlock" in _run(command, tmp_path).stderr
    assert _run([*command, "--unlock"], tmp_path).returncode == 0
    again = _run(command, tmp_path)
    assert again.returncode != 0 and "1 scan(s) could not be localized" in again.stdout + again.stderr
    assert {path: path.stat().st_mtime_ns for path in finished} == finished  # the first job's were not redone
    first_log = (markers / f"batch-{batch}.log").read_text()
    # the kill may come after the job's marker but before Snakemake recorded the job as finished: then the
    # job runs again and finds its scans complete
    scans = len(finished) // 2
    assert re.search(rf"Wrote ({scans} of \d+ scans|0 of \d+ scans .*\({scans} already complete)", first_log), first_log
    assert _outputs(out) == _outputs(uninterrupted[0])
