"""`make model-afids`'s driver (train/model_afids.py) survives a kill: run again, it finishes the same run.

The driver runs on a small synthetic template with the tiny preset (a config file naming its one landmark);
it is killed (SIGKILL to its whole process group) once the coarse stage has written training steps, then run
again: the finished steps are skipped, the coarse run resumes from its checkpoint, and both stages end at
exactly the configured number of steps, with one SavedModel.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_demo_pipeline import write_template

REPO = Path(__file__).resolve().parents[1]


def _steps(run: Path) -> list[int]:
    path = run / "steps.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return [int(row[0]) for row in csv.reader(handle) if row and row[0].isdigit()]


@pytest.mark.slow
def test_model_afids_resumes_after_a_kill(tmp_path):
    template = write_template(tmp_path)
    config = yaml.safe_load((REPO / "mdgru_keras" / "configs" / "tiny.yaml").read_text())
    config.update(landmarks=["A"])
    config["training"].update(epochs=6, checkpoint_every_steps=2, samples_per_subject=2)
    config_path = tmp_path / "tiny-a.yaml"
    config_path.write_text(yaml.safe_dump(config))
    work = tmp_path / "work"
    command = [
        sys.executable, "-m", "train.model_afids", "--work", str(work), "--demo", str(tmp_path / "unused"),
        "--t1", str(template["t1"]), "--t2", str(template["t2"]), "--fiducials", str(template["fiducials"]),
        "--config", str(config_path), "--subjects", "8", "--coarse-epochs", "10", "--fine-epochs", "2",
        "--no-install",
        "--synth-args", "--max-rotation-deg 5 --max-translation-mm 2 --elastic-mm 1 --neck-probability 0 "
        "--max-scale 0.05 --max-elastic-large-mm 0",
    ]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    # output to a file, not a pipe: an unread pipe fills up and blocks the driver
    log_path = tmp_path / "first.log"
    with open(log_path, "wb") as log:
        first = subprocess.Popen(command, cwd=REPO, env=environment, start_new_session=True,
                                 stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while len(_steps(work / "coarse")) < 4 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    running = first.poll() is None
    if running:
        os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    output = log_path.read_text(errors="replace")[-3000:]
    assert running, "the driver ended before it could be killed:\n" + output
    assert _steps(work / "coarse"), "no coarse training step within the deadline:\n" + output
    killed_at = max(_steps(work / "coarse"))

    second = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "synthetic population: done already" in second.stdout
    assert "TFRecords: done already" in second.stdout
    per_epoch = json.loads((work / "coarse" / "run.json").read_text())["steps_per_epoch"]
    coarse_steps, fine_steps = _steps(work / "coarse"), _steps(work / "fine")
    assert max(coarse_steps) == 10 * per_epoch and max(fine_steps) == 2 * per_epoch
    assert killed_at < max(coarse_steps)
    assert (work / "export" / "afids32" / "1" / "saved_model.pb").is_file()
    # a third run has nothing left to do
    third = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and "SavedModel: done already" in third.stdout
    assert max(_steps(work / "coarse")) == 10 * per_epoch


def test_the_recipe_trains_from_the_in_memory_cache():
    """All of model-afids's heads fit the pipeline's cache of preprocessed subjects. Beyond it every sample
    decodes and high-pass filters a whole head again (about 0.3 CPU-s), which doubled the recipe's step time."""
    from mdgru_keras.data.pipeline import CACHE_MAX_SUBJECTS
    from train.model_afids import TRAIN_SUBJECTS

    assert TRAIN_SUBJECTS <= CACHE_MAX_SUBJECTS


def test_the_shipped_export_checks_its_estimates_against_the_template_shape(tmp_path):
    """The afids config's export runs with --protocol-planes and the template's AFIDs as --shape-prior, its later
    windows aligned with the prior's fit; the manifest records that file relative to the repository. A
    one-landmark config gets none of them (an affine fit needs several landmarks, the planes need AC and PC)."""
    from train.model_afids import CONFIG, EXPORT_OPTIONS, export_options, recorded_options

    fiducials = REPO / "demo" / "afids.fcsv"
    options = export_options(CONFIG, fiducials)
    assert options[: len(EXPORT_OPTIONS)] == list(EXPORT_OPTIONS)
    assert "--protocol-planes" in options
    assert options[options.index("--shape-prior") + 1] == str(fiducials)
    assert options[options.index("--aligned-windows") + 1] == "rotation"
    assert recorded_options(options)[options.index("--shape-prior") + 1] == "demo/afids.fcsv"
    assert recorded_options(["--shape-prior", "/elsewhere/a.fcsv"]) == ["--shape-prior", "/elsewhere/a.fcsv"]

    config = yaml.safe_load((REPO / "mdgru_keras" / "configs" / "tiny.yaml").read_text())
    config.update(landmarks=["A"])
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump(config))
    assert export_options(one, fiducials) == list(EXPORT_OPTIONS)
