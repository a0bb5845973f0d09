"""A tiny SavedModel with the serving contract's signatures, for testing servers and clients.

The real export (the two-stage MD-GRU localizer) takes minutes to build and seconds per call; the servers and
clients in :mod:`mdgru_keras.serving` are generic over any SavedModel, so their tests run against this stand-in instead.
It has exactly the signatures and tensor names of docs/ARCHITECTURE.md ("The exported SavedModel"):

* ``serving_default(volume: float32 [X,Y,Z], voxel_to_world: float64 [4,4])`` ->
  ``landmark_names`` string [K], ``world_mm``, ``voxel``, ``coarse_world_mm``, ``coarse_voxel`` float64 [K,3],
  ``confidence`` float32 [K], ``flip_disagreement_mm`` float64 [K];
* ``localize_int16``: the same with an int16 ``volume``;
* ``coarse``: the same inputs; ``landmark_names``, ``coarse_world_mm``, ``coarse_voxel``, ``confidence``.

"Landmark" ``k`` is the ``k``-th brightest voxel; its coarse estimate is the centre of its 4^3 block (as if
seen at stride 4); its "flip disagreement" is the distance between the two in mm. Like the real model it
validates its inputs with ``tf.debugging`` asserts (a NaN volume, a singular affine and a volume with fewer
than K voxels raise ``InvalidArgumentError``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import tensorflow as tf

from mdgru_keras.geometry import affine_maps

TOY_LANDMARKS: tuple[str, ...] = ("AC", "PC", "infracollicular_sulcus")
COARSE_STRIDE = 4


class ToyLocalizer(tf.Module):
    """Brightest-voxel "localizer" with the contract's three signatures."""

    def __init__(self, landmark_names: Sequence[str] = TOY_LANDMARKS) -> None:
        super().__init__(name="toy_localizer")
        self.landmark_names = tf.constant(list(landmark_names), dtype=tf.string)
        self.num_landmarks = len(landmark_names)

    def _validate(self, volume: tf.Tensor, voxel_to_world: tf.Tensor) -> list[tf.Operation]:
        linear = voxel_to_world[:3, :3]
        return [
            tf.debugging.assert_all_finite(volume, "volume contains NaN or Inf values"),
            tf.debugging.assert_all_finite(voxel_to_world, "voxel_to_world contains NaN or Inf values"),
            tf.debugging.assert_greater(
                tf.abs(tf.linalg.det(linear)),
                tf.constant(1e-9, tf.float64),
                message="voxel_to_world is singular (its 3x3 linear part has determinant 0)",
            ),
            tf.debugging.assert_greater_equal(
                tf.size(volume),
                self.num_landmarks,
                message=f"volume has fewer voxels than the {self.num_landmarks} landmarks",
            ),
        ]

    def _localize(self, volume: tf.Tensor, voxel_to_world: tf.Tensor) -> dict[str, tf.Tensor]:
        """``volume`` float32 [X,Y,Z], ``voxel_to_world`` float64 [4,4] -> the full contract's outputs."""
        with tf.control_dependencies(self._validate(volume, voxel_to_world)):
            values, flat_index = tf.math.top_k(tf.reshape(volume, [-1]), k=self.num_landmarks)
        voxel = tf.cast(tf.transpose(tf.unravel_index(flat_index, tf.shape(volume, out_type=tf.int32))), tf.float64)
        coarse_voxel = tf.floor(voxel / COARSE_STRIDE) * COARSE_STRIDE + (COARSE_STRIDE - 1) / 2
        world_mm = affine_maps.voxel_to_world_tf(voxel, voxel_to_world)
        coarse_world_mm = affine_maps.voxel_to_world_tf(coarse_voxel, voxel_to_world)
        return {
            "landmark_names": tf.identity(self.landmark_names),
            "world_mm": world_mm,
            "voxel": voxel,
            "coarse_world_mm": coarse_world_mm,
            "coarse_voxel": coarse_voxel,
            "confidence": tf.sigmoid(values),
            "flip_disagreement_mm": tf.norm(world_mm - coarse_world_mm, axis=-1),
        }

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None, None], tf.float32, name="volume"),
            tf.TensorSpec([4, 4], tf.float64, name="voxel_to_world"),
        ]
    )
    def serving_default(self, volume: tf.Tensor, voxel_to_world: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._localize(volume, voxel_to_world)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None, None], tf.int16, name="volume"),
            tf.TensorSpec([4, 4], tf.float64, name="voxel_to_world"),
        ]
    )
    def localize_int16(self, volume: tf.Tensor, voxel_to_world: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._localize(tf.cast(volume, tf.float32), voxel_to_world)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None, None], tf.float32, name="volume"),
            tf.TensorSpec([4, 4], tf.float64, name="voxel_to_world"),
        ]
    )
    def coarse(self, volume: tf.Tensor, voxel_to_world: tf.Tensor) -> dict[str, tf.Tensor]:
        outputs = self._localize(volume, voxel_to_world)
        return {name: outputs[name] for name in ("landmark_names", "coarse_world_mm", "coarse_voxel", "confidence")}


def save_toy_localizer(export_dir: str | Path, landmark_names: Sequence[str] = TOY_LANDMARKS) -> Path:
    """Write the toy localizer as a SavedModel to ``export_dir`` (e.g. ``BASE/mdgru/1``); returns the path."""
    module = ToyLocalizer(landmark_names)
    signatures = {
        "serving_default": module.serving_default.get_concrete_function(),
        "localize_int16": module.localize_int16.get_concrete_function(),
        "coarse": module.coarse.get_concrete_function(),
    }
    export_dir = Path(export_dir)
    tf.saved_model.save(module, str(export_dir), signatures=signatures)
    return export_dir


# ---------------------------------------------------------------------------------------------------------
# tiny training runs, for tests of the real export


def save_training_run(
    run_dir: str | Path,
    stage: str,
    config: object,
    seed: int = 0,
    dataset: dict | None = None,
) -> Path:
    """A training run directory as ``mdgru-localize train`` leaves it, with random weights.

    ``config.json``, ``run.json`` (``stage``) and ``model.keras`` (the ``stage`` model of ``config`` built with
    ``seed``); with ``dataset``, also ``dataset.json``. Returns ``run_dir``.
    """
    import json

    import keras

    from mdgru_keras.networks import build_model

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(seed)
    build_model(config, stage).save(run_dir / "model.keras")
    (run_dir / "config.json").write_text(config.to_json() + "\n", encoding="utf-8")
    (run_dir / "run.json").write_text(json.dumps({"stage": stage, "dataset": ""}) + "\n", encoding="utf-8")
    if dataset is not None:
        (run_dir / "dataset.json").write_text(json.dumps(dataset) + "\n", encoding="utf-8")
    return run_dir


# ---------------------------------------------------------------------------------------------------------
# a real tensorflow_model_server, when installed


def free_port() -> int:
    """A loopback port nobody listens on (right now)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def model_server(
    model_base: str | Path, model_name: str, log_path: str | Path, binary: str = "tensorflow_model_server"
) -> Iterator[tuple[str, str]]:
    """Run ``tensorflow_model_server`` on ``model_base`` (``BASE/NAME``); yields ``(grpc_address, rest_url)``
    on 127.0.0.1 once the model is AVAILABLE. Raises ``RuntimeError`` (with the log's tail) if it is not within
    120 s. The server has no bind-address flag; only 127.0.0.1 is ever used here.
    """
    import subprocess
    import time

    import requests

    grpc_port, rest_port = free_port(), free_port()
    log_path = Path(log_path)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--port={grpc_port}",
                f"--rest_api_port={rest_port}",
                f"--model_name={model_name}",
                f"--model_base_path={Path(model_base).resolve()}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    rest_url = f"http://127.0.0.1:{rest_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{binary} exited with {process.returncode}: {log_path.read_text()[-2000:]}")
            try:
                status = requests.get(f"{rest_url}/v1/models/{model_name}", timeout=2).json()
                if status["model_version_status"][0]["state"] == "AVAILABLE":
                    break
            except (requests.ConnectionError, KeyError, IndexError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{binary}: model not AVAILABLE after 120 s: {log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        yield f"127.0.0.1:{grpc_port}", rest_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
