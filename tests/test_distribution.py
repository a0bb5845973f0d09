"""Distribution with TensorFlow's own engine: MirroredStrategy over two logical CPU devices and
MultiWorkerMirroredStrategy over two worker processes on 127.0.0.1 give the same losses on the first steps as
one device, for the same global batch and seed (real tiny training through the CLI)."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
from training_helpers import cli_command, cli_env, run_cli, write_config, write_population

from mdgru_keras.training.callbacks import read_csv

pytestmark = pytest.mark.slow  # trains under two strategies, one of them over two worker processes

STEPS = 4  # 8 subjects / global batch 4 = 2 steps per epoch, 2 epochs


@pytest.fixture(scope="module")
def population(tmp_path_factory) -> Path:
    # One shard: the pipeline's single-file path (the checkpoint test covers several shards).
    return write_population(tmp_path_factory.mktemp("population"), train=8, val=2, shard_size=8)


def _config(directory: Path, distribution: str) -> Path:
    # tiny's network as it is (DropConnect included: the masks come from mirrored seed states, the same on
    # every replica and the same as on one device), global batch 4, 2 epochs.
    return write_config(directory / f"{distribution}.yaml", distribution=distribution, epochs=2, batch_size=4)


def _args(config: Path, data: Path, out: Path) -> list[str]:
    return ["train", "--stage", "coarse", "--config", str(config), "--data", str(data), "--out", str(out), "--quiet"]


def _losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in read_csv(run_dir / "steps.csv")]


@pytest.fixture(scope="module")
def single_device(population, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("single")
    out = directory / "run"
    result = run_cli(*_args(_config(directory, "default"), population, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_mirrored_over_two_devices_matches_one_device(population, single_device, tmp_path):
    out = tmp_path / "run"
    result = run_cli(*_args(_config(tmp_path, "mirrored"), population, out), logical_cpus=2)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((out / "run.json").read_text())
    assert info["replicas"] == 2 and info["workers"] == 1
    reference = _losses(single_device)
    assert len(reference) == STEPS
    np.testing.assert_allclose(_losses(out), reference, rtol=2e-5)
    first = read_csv(single_device / "log.csv")[-1]["val_error_mm_mean"]
    assert read_csv(out / "log.csv")[-1]["val_error_mm_mean"] == pytest.approx(first, rel=1e-3)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def test_multi_worker_over_two_processes_matches_one_device(population, single_device, tmp_path):
    out = tmp_path / "run"
    config = _config(tmp_path, "multi_worker")
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        processes.append(subprocess.Popen(cli_command(*_args(config, population, out)),
                                          env=cli_env(TF_CONFIG=json.dumps(tf_config)),
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []  # (stdout, stderr) of each process
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=300))
    finally:
        for process in processes:  # bounded: a hung cluster must not hang the test suite
            if process.poll() is None:
                process.kill()
                process.wait()
    logs = "".join(f"--- worker {index}:\n{out[-1500:]}{err[-1500:]}" for index, (out, err) in enumerate(outputs))
    assert [process.returncode for process in processes] == [0, 0], logs
    # the commands' last lines on stdout: TensorFlow may log a gRPC error on stderr while the cluster shuts down
    # (seen once: worker 1 logged "failed to connect" to the chief, which had finished first)
    assert "wrote" in outputs[0][0].splitlines()[-1] and "worker finished" in outputs[1][0].splitlines()[-1], logs
    info = json.loads((out / "run.json").read_text())
    assert info["replicas"] == 2 and info["workers"] == 2
    np.testing.assert_allclose(_losses(out), _losses(single_device), rtol=2e-5)
    assert not list(out.glob(".worker-*")), "worker 1's private checkpoint copies are cleaned up"
