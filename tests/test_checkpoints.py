"""Checkpoints: atomic, validated, pruned; a run killed mid-epoch resumes exactly; a damaged newest checkpoint
falls back to the previous one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from training_helpers import cli_command, cli_env, run_cli, write_config, write_population

from mdgru_keras.training.callbacks import read_csv
from mdgru_keras.training.checkpoints import CheckpointStore

# ---------------------------------------------------------------------------------------------------------
# the store, on a small object graph


def _store(directory: Path, keep: int = 2) -> tuple[CheckpointStore, tf.Variable]:
    variable = tf.Variable(np.zeros(3, np.float32))
    return CheckpointStore(directory, tf.train.Checkpoint(v=variable), keep=keep), variable


def test_save_restore_and_prune_keeps_last_k_and_best(tmp_path):
    store, variable = _store(tmp_path, keep=2)
    errors = {1: 5.0, 2: 1.0, 3: 4.0, 4: None, 5: 3.0}
    for step, error in errors.items():
        variable.assign(np.full(3, step, np.float32))
        store.save(step, epoch=step / 2, validation_error_mm=error)
    assert [info.step for info in store.all()] == [2, 4, 5]  # last two, and step 2: the best
    assert store.best() == (2, 1.0)
    best = store.best_info()
    store.restore(best)
    np.testing.assert_array_equal(variable.numpy(), [2, 2, 2])
    latest = store.latest_valid()
    assert latest.step == 5 and latest.epoch == 2.5
    store.restore(latest)
    np.testing.assert_array_equal(variable.numpy(), [5, 5, 5])


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete_index", "bad_manifest", "no_manifest"])
def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, damage):
    store, variable = _store(tmp_path, keep=3)
    for step in (1, 2):
        variable.assign(np.full(3, step, np.float32))
        store.save(step, epoch=float(step))
    newest = tmp_path / "ckpt-000000002"
    data = next(newest.glob("ckpt.data-*"))
    if damage == "flip_byte":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[:-3])
    elif damage == "delete_index":
        (newest / "ckpt.index").unlink()
    elif damage == "bad_manifest":
        (newest / "manifest.json").write_text("{not json", encoding="utf-8")
    else:
        (newest / "manifest.json").unlink()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        info = store.latest_valid()
    assert info.step == 1
    store.restore(info)
    np.testing.assert_array_equal(variable.numpy(), [1, 1, 1])


def test_interrupted_save_leaves_nothing_that_is_picked_up(tmp_path):
    store, variable = _store(tmp_path)
    store.save(1, epoch=1.0)
    # What a save killed before its rename leaves: a hidden temporary directory with partial files.
    partial = tmp_path / ".tmp-ckpt-000000002-deadbeef"
    partial.mkdir()
    (partial / "ckpt.index").write_bytes(b"\x00" * 10)
    assert [info.step for info in store.all()] == [1]
    assert store.latest_valid().step == 1
    store.save(3, epoch=3.0)  # the next save cleans the leftovers up
    assert not partial.exists()


# ---------------------------------------------------------------------------------------------------------
# kill -9 mid-epoch, resume, compare with an uninterrupted run (real tiny training through the CLI)


@pytest.fixture(scope="module")
def population(tmp_path_factory) -> Path:
    return write_population(tmp_path_factory.mktemp("population"), train=8, val=2)


@pytest.mark.parametrize("start_index", [3, 11])  # within the first pass over the 8 subjects, and after it
def test_data_position_restarts_the_same_sample_sequence(population, start_index):
    from mdgru_keras.config import load_preset
    from mdgru_keras.data.pipeline import make_dataset

    config = load_preset("tiny")

    def samples(start: int, count: int) -> list:
        dataset = make_dataset(population, "train", "fine", config, seed=5, deterministic=True, batch=False,
                               with_metadata=True, start_index=start)
        return list(dataset.take(count).as_numpy_iterator())

    from_start = samples(0, start_index + 3)[start_index:]
    restarted = samples(start_index, 3)
    for (inputs_a, labels_a, meta_a), (inputs_b, labels_b, meta_b) in zip(from_start, restarted, strict=True):
        assert meta_a["subject"] == meta_b["subject"]
        np.testing.assert_array_equal(inputs_a["window"], inputs_b["window"])
        assert meta_a["landmark_index"] == meta_b["landmark_index"]
        for axis in (*"xyz", "mask"):
            np.testing.assert_array_equal(labels_a[axis], labels_b[axis])
        np.testing.assert_array_equal(meta_a["window_voxel"], meta_b["window_voxel"])


def _weights(run_dir: Path) -> list[np.ndarray]:
    from mdgru_keras.networks import load_model

    return [np.asarray(w) for w in load_model(str(run_dir / "model.keras")).get_weights()]


def _train_args(config: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--stage", "coarse", "--config", str(config), "--data", str(data), "--out", str(out),
            "--quiet", *extra]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_model_and_damaged_checkpoint_falls_back(tmp_path, population):
    # 8 subjects x 4 samples / batch 4 = 8 steps per epoch, 2 epochs; checkpoints every 3 steps and per epoch.
    config = write_config(tmp_path / "tiny.yaml", samples_per_subject=4, batch_size=4, epochs=2,
                          checkpoint_every_steps=3)
    reference = tmp_path / "reference"
    result = run_cli(*_train_args(config, population, reference))
    assert result.returncode == 0, result.stderr[-3000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen(cli_command(*_train_args(config, population, killed)), env=cli_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    steps_csv = killed / "steps.csv"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if steps_csv.exists() and len(read_csv(steps_csv)) >= 11:  # in the second epoch, after step 9's checkpoint
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed mid-epoch"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = len(read_csv(steps_csv))
    assert 11 <= done < 16 and not (killed / "model.keras").exists(), f"not killed mid-epoch ({done} steps)"

    result = run_cli(*_train_args(config, population, killed, "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from_step"] in (9, 12) and summary["step"] == 16
    # Same batches, same DropConnect masks, same optimizer state: the same losses at every step...
    ref_steps, resumed_steps = read_csv(reference / "steps.csv"), read_csv(steps_csv)
    assert [row["step"] for row in resumed_steps] == list(range(1, 17))
    # the resume rewrote the logs up to its checkpoint: steps stay integers there, as in an unbroken run
    for log_name, column in (("steps.csv", 0), ("log.csv", 1)):
        lines = (killed / log_name).read_text().splitlines()[1:]
        assert all(line.split(",")[column].isdigit() for line in lines), lines[:3]
    np.testing.assert_allclose([r["loss"] for r in resumed_steps], [r["loss"] for r in ref_steps], rtol=1e-6)
    # ...and the same model and validation.
    for resumed_weight, reference_weight in zip(_weights(killed), _weights(reference), strict=True):
        np.testing.assert_allclose(resumed_weight, reference_weight, rtol=1e-5, atol=1e-6)
    ref_log, resumed_log = read_csv(reference / "log.csv"), read_csv(killed / "log.csv")
    assert [r["val_error_mm_mean"] for r in resumed_log] == pytest.approx([r["val_error_mm_mean"] for r in ref_log])

    # Damage the newest checkpoint (the final one, step 16): --resume must fall back to step 15 (a step
    # checkpoint) and retrain the last step, arriving at the same model again.
    checkpoints = killed / "checkpoints"
    newest = checkpoints / "ckpt-000000016"
    data = next(newest.glob("ckpt.data-*"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    result = run_cli(*_train_args(config, population, killed, "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from_step"] == 15 and summary["step"] == 16
    assert "skipping a damaged checkpoint" in result.stderr
    assert list(checkpoints.glob(".damaged-ckpt-000000016-*")), "the damaged checkpoint is set aside"
    for resumed_weight, reference_weight in zip(_weights(killed), _weights(reference), strict=True):
        np.testing.assert_allclose(resumed_weight, reference_weight, rtol=1e-5, atol=1e-6)
