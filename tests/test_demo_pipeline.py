"""Smoke run of `make demo` on the tiny preset: the real Makefile, CLI and files, on a small synthetic template.

The demo's AFIDs template is replaced by a 36^3 volume with one bright marker (landmark "A"), passed with the
Makefile's DEMO_T1 / DEMO_T2 / DEMO_FIDUCIALS variables; everything else (synth -> prepare -> train coarse and
fine -> export -> evaluate -> predict) is the demo's own chain. It checks that the chain runs and leaves every
product a user is told about; accuracy is the business of the learning tests and `make bench-accuracy`.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mdgru_keras.evaluation import read_json
from mdgru_keras.geometry import affine_maps
from mdgru_keras.io.landmarks import read_landmarks, write_landmarks
from mdgru_keras.io.nifti import write_volume

pytestmark = pytest.mark.slow  # runs `make demo` (training, export, evaluation) in a subprocess

REPO = Path(__file__).resolve().parents[1]
SHAPE = (36, 36, 36)
LANDMARK_VOXEL = np.array([17.3, 18.6, 16.8])
TRAIN_SUBJECTS, TEST_SUBJECTS = 6, 2


def write_template(directory: Path) -> dict[str, Path]:
    """T1w-like and T2w-like templates (a bright or dark box, a bright marker at landmark A) and A's .fcsv."""
    voxel_to_world = np.eye(4)
    voxel_to_world[:3, 3] = [-18.0, -20.0, -16.0]
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij"), axis=-1)
    marker = 1000.0 * np.exp(-0.5 * ((grid - LANDMARK_VOXEL) ** 2).sum(-1) / 1.5**2)
    body = np.zeros(SHAPE)
    body[6:30, 5:31, 6:30] = 300.0
    return {
        "t1": write_volume(directory / "tpl_T1w.nii.gz", (body + marker).astype(np.float32), voxel_to_world),
        "t2": write_volume(directory / "tpl_T2w.nii.gz", (1500.0 - body + marker).astype(np.float32), voxel_to_world),
        "fiducials": write_landmarks(
            directory / "tpl.fcsv", {"A": affine_maps.voxel_to_world(LANDMARK_VOXEL, voxel_to_world)}
        ),
    }


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    if not (REPO / ".venv" / "bin" / "mdgru-localize").exists():
        pytest.skip("the Makefile runs .venv/bin/mdgru-localize; run `make install` (or `make test`) first")
    demo = tmp_path_factory.mktemp("demo")
    template = write_template(demo)
    variables = {
        "DEMO": demo,
        "DEMO_T1": template["t1"],
        "DEMO_T2": template["t2"],
        "DEMO_FIDUCIALS": template["fiducials"],
        "DEMO_SYNTH_ARGS": "--max-rotation-deg 5 --max-translation-mm 2 --elastic-mm 1 --neck-probability 0",
        "DEMO_TRAIN_SUBJECTS": TRAIN_SUBJECTS,
        "DEMO_TEST_SUBJECTS": TEST_SUBJECTS,
        "DEMO_COARSE_EPOCHS": 3,
        "DEMO_FINE_EPOCHS": 3,
        "DEMO_PRETRAINED": "no",  # the shipped AFIDs model has no business with this synthetic template
        "CONFIG": "tiny",
        "LANDMARKS": "A",
        "TRAIN_ARGS": "--epochs 3 --quiet",
    }
    command = ["make", "--no-print-directory", "demo"] + [f"{name}={value}" for name, value in variables.items()]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"make demo failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return demo, result


def test_demo_trains_both_stages_and_exports_one_savedmodel(demo_run) -> None:
    demo, _ = demo_run
    run = demo / "run"
    for stage in ("coarse", "fine"):
        assert (run / stage / "model.keras").stat().st_size > 0
        assert (run / stage / "log.csv").read_text().count("\n") >= 2  # header and at least one epoch
        assert (run / stage / "loss.png").stat().st_size > 0
    assert len(list((run / "export" / "mdgru").glob("*/saved_model.pb"))) == 1


def test_demo_prints_and_writes_the_evaluation_of_every_test_subject(demo_run) -> None:
    demo, result = demo_run
    table = read_json(demo / "run" / "evaluation.json")
    assert list(table.landmarks) == ["A"]
    methods = set(table.rows)
    assert {"coarse", "fine n=1 (argmax)", "fine n=2 (argmax)", "fine n=2 + parabola"} <= methods
    main = table.rows["fine n=2 + parabola"]
    assert main.overall.count == TEST_SUBJECTS
    assert math.isfinite(main.overall.mean_mm)
    assert "| fine n=2 + parabola |" in result.stdout  # the Markdown table reaches the user
    figures = sorted(path.name for path in (demo / "run" / "figures").glob("*.png"))
    assert len(figures) == TEST_SUBJECTS * 2  # best and worst three of two subjects: each subject twice


def test_demo_writes_slicer_files_that_read_back_near_the_truth(demo_run) -> None:
    demo, _ = demo_run
    predictions = sorted((demo / "run" / "predictions").glob("*.fcsv"))
    assert len(predictions) == TEST_SUBJECTS
    for path in predictions:
        subject = path.name.split("_")[0].removesuffix(".fcsv")
        truth = read_landmarks(demo / "test" / "landmarks" / f"{subject}.fcsv")["A"]
        predicted = read_landmarks(path)["A"]
        # A 36 mm field of view: any prediction inside it is within its diagonal of the truth.
        assert np.linalg.norm(predicted - truth) < math.sqrt(3) * SHAPE[0]
