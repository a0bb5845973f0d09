"""``mdgru-localize serve``: the development server as a separate process, asked once over gRPC and REST.

The model is the small stand-in with the contract's signatures (:mod:`mdgru_keras.serving.testing`); the
servers themselves are tested in tests/test_serving.py.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mdgru_keras.cli import main as cli
from mdgru_keras.serving import connect
from mdgru_keras.serving.testing import TOY_LANDMARKS, free_port, save_toy_localizer

REPO = Path(__file__).resolve().parents[1]
STARTUP_S = 180  # importing TensorFlow and loading the model in a fresh process, on a busy 2-core machine


def _first_line(stream, timeout_s: float) -> str | None:
    """The first line of ``stream``, or None when none comes within ``timeout_s`` (or the stream ends)."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout_s) or None
    except queue.Empty:
        return None


def test_serve_answers_grpc_and_rest_and_stops_on_sigterm(tmp_path: Path) -> None:
    base = tmp_path / "models" / "toy"
    save_toy_localizer(base / "3")
    grpc_port, rest_port = free_port(), free_port()
    command = [sys.executable, "-m", "mdgru_keras.cli", "serve", "--model", str(base), "--model-name", "toy",
               "--grpc-port", str(grpc_port), "--rest-port", str(rest_port)]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=log,
                                   text=True)
    try:
        line = _first_line(process.stdout, STARTUP_S)
        assert line is not None, f"no ready line within {STARTUP_S} s: {log_path.read_text(errors='replace')[-3000:]}"
        assert line.strip() == (
            f"serving 'toy' version 3 from {base / '3'}: gRPC on 127.0.0.1:{grpc_port}, "
            f"REST on http://127.0.0.1:{rest_port}"
        )
        volume = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
        voxel_to_world = np.diag([2.0, 1.0, 0.5, 1.0])
        voxel_to_world[:3, 3] = [10.0, -20.0, 5.0]
        # the toy's "landmarks" are the brightest voxels, brightest first
        expected_voxel = np.array([[3, 4, 5], [3, 4, 4], [3, 4, 3]], dtype=np.float64)
        expected_world = expected_voxel * [2.0, 1.0, 0.5] + [10.0, -20.0, 5.0]
        for server in (f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{rest_port}"):
            with connect(server, "toy", timeout_s=60) as client:
                result = client.localize(volume, voxel_to_world)
            assert result["landmark_names"].tolist() == list(TOY_LANDMARKS), server
            np.testing.assert_array_equal(result["voxel"], expected_voxel)
            np.testing.assert_allclose(result["world_mm"], expected_world)
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert process.wait(timeout=30) == 0, log_path.read_text(errors="replace")[-3000:]
        assert time.monotonic() - started < 30
        assert "development server" in log_path.read_text(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()


def test_serve_help_says_it_is_a_development_server() -> None:
    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "DEVELOPMENT server" in text
    assert "official TensorFlow Serving image" in text and "serving/README.md" in text
    assert "[default: 127.0.0.1]" in text and "[default: 8500;" in text and "[default: 8501;" in text


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--host", "0.0.0.0"], "loopback addresses only"),
        (["--grpc-port", "0", "--rest-port", "0"], "nothing to serve"),
    ],
)
def test_serve_refuses_before_loading_a_model(tmp_path: Path, arguments: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["serve", "--model", str(tmp_path), *arguments])
    assert result.exit_code == 2, result.output
    assert message in result.output
