"""Training end to end through the CLI on a small synthetic population: both stages of the ``tiny`` preset
learn (the validation error in mm falls), the run directory holds what it promises, a time budget stops a run
that --resume continues, and bad input stops with one line before any work."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from training_helpers import write_config, write_population

from mdgru_keras.cli import main
from mdgru_keras.config import load_config
from mdgru_keras.training.callbacks import read_csv


@pytest.fixture(scope="module")
def population(tmp_path_factory) -> Path:
    return write_population(tmp_path_factory.mktemp("population"), train=16, val=12)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    # The tiny preset's network and optimizer; batch 4 and 4 samples per subject and epoch: 16 steps per epoch.
    return write_config(tmp_path_factory.mktemp("config") / "tiny.yaml", samples_per_subject=4, batch_size=4)


EPOCHS = {"coarse": 16, "fine": 8}


def _train(*args: str) -> object:
    # --fast: no op determinism in the test process (it is global); the subprocess tests check exactness.
    return CliRunner().invoke(main, ["train", *args, "--fast"], catch_exceptions=False)


@pytest.fixture(scope="module")
def runs(population, config, tmp_path_factory) -> dict[str, tuple[Path, object]]:
    out = tmp_path_factory.mktemp("runs")
    results = {}
    for stage, epochs in EPOCHS.items():
        run_dir = out / stage
        result = _train("--stage", stage, "--config", str(config), "--data", str(population), "--out", str(run_dir),
                        "--epochs", str(epochs))
        assert result.exit_code == 0, result.output[-3000:]
        results[stage] = (run_dir, result)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["coarse", "fine"])
def test_both_stages_learn_and_the_run_directory_is_complete(runs, config, population, stage):
    run_dir, result = runs[stage]
    log = read_csv(run_dir / "log.csv")
    epochs = EPOCHS[stage]
    assert [row["epoch"] for row in log] == list(range(1, epochs + 1))
    first, last = log[0], log[-1]
    # The validation error (decoded, in mm; medians over the 12 subjects, averaged over the last 3 epochs)
    # falls by 40 % from the first epoch, and so do both losses. (One run: coarse 9.5 -> 4.5 mm, fine 5.0 -> 1.6.)
    late = np.mean([row["val_error_mm_median"] for row in log[-3:]])
    assert late < 0.6 * first["val_error_mm_median"], [round(row["val_error_mm_median"], 2) for row in log]
    assert last["val_loss"] < 0.85 * first["val_loss"] and last["train_loss"] < first["train_loss"]
    assert all(row["val_error_mm_median"] <= row["val_error_mm_max"] for row in log)

    # What the command promises: one line per epoch, a last line naming what it wrote, and the files.
    lines = result.output.strip().splitlines()
    assert sum(line.startswith("epoch ") for line in lines) == epochs
    assert lines[-1].startswith(f"wrote {run_dir / 'model.keras'} and {run_dir / 'loss.png'}")
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    steps = read_csv(run_dir / "steps.csv")
    assert [row["step"] for row in steps] == list(range(1, 16 * epochs + 1))
    resolved = load_config(run_dir / "config.json")
    assert resolved.training.epochs == epochs and resolved == load_config(config).replace(
        training=resolved.training
    )
    assert json.loads((run_dir / "run.json").read_text())["stage"] == stage
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by"] == "epochs" and summary["step"] == 16 * epochs
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("ckpt-*"))
    best_step = json.loads((run_dir / "checkpoints" / "best.json").read_text())["step"]
    assert len(kept) <= 4 and f"ckpt-{best_step:09d}" in kept and kept[-1] == f"ckpt-{16 * epochs:09d}"

    # The saved stage model is the trained one: it reproduces the last validation loss.
    from mdgru_keras.networks import load_model
    from mdgru_keras.training.stages import per_example_loss, stage_setup

    model = load_model(str(run_dir / "model.keras"))
    setup = stage_setup(stage, resolved, population)
    losses = [per_example_loss(labels, model(inputs, training=False)).numpy()
              for inputs, labels, _ in setup.validation_dataset()]
    assert float(np.mean(np.concatenate(losses))) == pytest.approx(last["val_loss"], rel=1e-4)


@pytest.mark.slow
def test_time_budget_stops_the_run_and_resume_continues(population, config, tmp_path):
    run_dir = tmp_path / "budget"
    common = ["--stage", "fine", "--config", str(config), "--landmarks", "all", "--data", str(population),
              "--out", str(run_dir), "--epochs", "1"]
    result = _train(*common, "--max-seconds", "0.001")
    assert result.exit_code == 0, result.output[-3000:]
    assert "time budget" in result.output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by"] == "time" and 1 <= summary["step"] < 16
    assert (run_dir / "model.keras").exists() and (run_dir / "loss.png").exists()
    stopped_at = summary["step"]

    result = _train(*common, "--resume")
    assert result.exit_code == 0, result.output[-3000:]
    assert f"resuming {run_dir} from step {stopped_at}" in result.output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by"] == "epochs" and summary["step"] == 16
    assert [row["step"] for row in read_csv(run_dir / "steps.csv")] == list(range(1, 17))


# ---------------------------------------------------------------------------------------------------------
# one-line errors before any work


@pytest.mark.slow
def test_resume_with_another_config_is_refused(runs, config, population, tmp_path):
    run_dir = runs["coarse"][0]
    before = (run_dir / "log.csv").read_text()
    data = yaml.safe_load(config.read_text())
    data["training"]["learning_rate"] = 0.01
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(data))
    result = _train("--stage", "coarse", "--config", str(other), "--data", str(population), "--out", str(run_dir),
                    "--resume")
    assert result.exit_code == 1
    message = result.output.strip().splitlines()[-1]
    assert message.startswith(f"Error: {run_dir / 'config.json'}: cannot resume with another config")
    assert "training.learning_rate" in message
    assert (run_dir / "log.csv").read_text() == before

    result = _train("--stage", "fine", "--config", str(config), "--data", str(population), "--out", str(run_dir),
                    "--resume")
    assert result.exit_code == 1 and "is a coarse run" in result.output

    result = _train("--stage", "coarse", "--config", str(config), "--data", str(population), "--out", str(run_dir))
    assert result.exit_code == 1 and "add --resume" in result.output


def test_landmarks_missing_from_the_dataset_are_refused(population, config, tmp_path):
    run_dir = tmp_path / "run"
    # --landmarks with a name the dataset lacks: a usage error (exit status 2), as in prepare and predict
    result = _train("--stage", "coarse", "--config", str(config), "--landmarks", "A,B", "--data", str(population),
                    "--out", str(run_dir))
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        f"Error: Invalid value for '--landmarks': unknown landmark B; the dataset {population} knows 1: A"
    )
    assert not run_dir.exists()
    # the same names from the config file: the config does not fit the data (exit status 1, the file named)
    data = yaml.safe_load(config.read_text())
    data["landmarks"] = ["A", "B"]
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(data))
    result = _train("--stage", "coarse", "--config", str(other), "--data", str(population), "--out", str(run_dir))
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: {population / 'dataset.json'}: has no landmark(s) B of config 'tiny' (the dataset has A)"
    )
    assert not run_dir.exists()


def test_window_larger_than_the_padded_volume_is_refused(population, tmp_path):
    config = write_config(tmp_path / "w.yaml")
    data = yaml.safe_load(config.read_text())
    data["fine"]["window_size"] = 64
    config.write_text(yaml.safe_dump(data))
    result = _train("--stage", "fine", "--config", str(config), "--data", str(population), "--out",
                    str(tmp_path / "run"))
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(config) in lines[0]
    assert "fine.window_size (64) is larger than coarse.padded_size (32)" in lines[0]


# ---------------------------------------------------------------------------------------------------------
# learning-rate schedule


def test_cosine_schedule_runs_from_the_rate_down_to_its_final_fraction():
    from mdgru_keras.training.trainer import scheduled_learning_rate

    training = load_config("cpu").training
    cosine = dataclasses.replace(training, lr_schedule="cosine", learning_rate=0.002, final_lr_fraction=0.1)
    rates = [scheduled_learning_rate(cosine, p) for p in np.linspace(0, 1, 11)]
    assert rates[0] == pytest.approx(0.002) and rates[5] == pytest.approx(0.0011) and rates[-1] == pytest.approx(2e-4)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert scheduled_learning_rate(cosine, 1.7) == pytest.approx(2e-4)  # past the end: stays at the floor
    constant = dataclasses.replace(training, lr_schedule="constant")
    assert scheduled_learning_rate(constant, 0.9) == constant.learning_rate


@pytest.mark.slow
def test_cosine_schedule_reaches_the_floor_at_the_last_epoch(population, tmp_path):
    config = write_config(tmp_path / "cosine.yaml", samples_per_subject=4, lr_schedule="cosine",
                          learning_rate=0.004, final_lr_fraction=0.25)
    run_dir = tmp_path / "run"
    result = _train("--stage", "fine", "--config", str(config), "--data", str(population), "--out", str(run_dir),
                    "--epochs", "3")
    assert result.exit_code == 0, result.output[-3000:]
    rates = [row["learning_rate"] for row in read_csv(run_dir / "log.csv")]
    # logged after each epoch's last step: set for progress (16 e - 1) / 48 of the run
    expected = [0.004 * (0.25 + 0.75 * 0.5 * (1 + np.cos(np.pi * (16 * e - 1) / 48))) for e in (1, 2, 3)]
    assert rates == pytest.approx(expected, rel=1e-5)
