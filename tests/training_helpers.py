"""Helpers of the training tests: a small synthetic population written through ``prepare_dataset``, a way to
run the CLI in a subprocess (optionally with several logical CPU devices), and the convolution ops of a graph."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def write_raw_population(
    directory: Path,
    *,
    train: int = 16,
    val: int = 4,
    shape: tuple[int, int, int] = (24, 26, 22),
    spacing_mm: float = 1.0,
    landmark: str = "A",
    seed: int = 0,
) -> Path:
    """NIfTI scans with one bright blob (the landmark ``landmark``) at a random place on a structured
    background, their ``.fcsv`` landmark files and a manifest (``subject,image,landmarks,split``) in
    ``directory``. Returns the manifest. The blob is the only thing that marks the landmark, so a network can
    learn to find it."""
    from mdgru_keras.io.landmarks import write_landmarks
    from mdgru_keras.io.nifti import write_volume

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 2.5]
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1).astype(np.float64)
    lines = ["subject,image,landmarks,split"]
    subjects = [("train", i) for i in range(train)] + [("val", i) for i in range(val)]
    for split, index in subjects:
        name = f"{split}{index:02d}"
        margin = 5
        landmark_voxel = np.array([rng.uniform(margin, n - 1 - margin) for n in shape])
        background = 200.0 + 30.0 * np.sin(grid[..., 0] / 3.0 + rng.uniform(0, 6)) * np.cos(grid[..., 1] / 4.0)
        blob = 800.0 * np.exp(-0.5 * ((grid - landmark_voxel) ** 2).sum(-1) / 1.5**2)
        volume = background + blob + rng.normal(0.0, 10.0, size=shape)
        write_volume(directory / f"{name}.nii.gz", volume.astype(np.float32), affine, dtype="int16")
        world_mm = landmark_voxel @ affine[:3, :3].T + affine[:3, 3]
        write_landmarks(directory / f"{name}.fcsv", {landmark: world_mm})
        lines.append(f"{name},{name}.nii.gz,{name}.fcsv,{split}")
    manifest = directory / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def write_population(
    directory: Path,
    *,
    train: int = 16,
    val: int = 4,
    shape: tuple[int, int, int] = (24, 26, 22),
    spacing_mm: float = 1.0,
    landmark: str = "A",
    seed: int = 0,
    shard_size: int = 4,
) -> Path:
    """:func:`write_raw_population` in ``directory/raw``, then ``prepare_dataset`` into ``directory/dataset``.
    Returns the dataset directory. ``shard_size`` subjects per TFRecord file (one train shard and several take
    different checkpoint paths).
    """
    from mdgru_keras.data.records import prepare_dataset

    manifest = write_raw_population(directory / "raw", train=train, val=val, shape=shape, spacing_mm=spacing_mm,
                                    landmark=landmark, seed=seed)
    out = directory / "dataset"
    prepare_dataset(manifest, out, spacing_mm=spacing_mm, val_fraction=0.0, test_fraction=0.0,
                    shard_size=shard_size)
    return out


def write_config(path: Path, preset: str = "tiny", **training) -> Path:
    """A YAML config: ``preset`` with ``training`` keys replaced (and dropconnect given as ``dropconnect``)."""
    import yaml

    from mdgru_keras.config import load_preset

    data = load_preset(preset).to_dict()
    dropconnect = training.pop("dropconnect", None)
    if dropconnect is not None:
        data["coarse"]["network"]["dropconnect"] = dropconnect
        data["fine"]["network"]["dropconnect"] = dropconnect
    # The tests count steps per epoch with batches of 4, whatever the preset's own batch size is tuned to.
    training.setdefault("batch_size", 4)
    data["training"].update(training)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


# Runs the CLI with N logical CPU devices (set before TensorFlow initializes), for the mirrored path.
_LOGICAL_CPUS = """
import sys
import tensorflow as tf
count = int(sys.argv.pop(1))
if count > 1:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
from mdgru_keras.cli import main
main(prog_name="mdgru-localize")
"""


def cli_command(*args: str, logical_cpus: int = 1) -> list[str]:
    """The argv of ``mdgru-localize ARGS`` in a fresh Python (with ``logical_cpus`` logical CPU devices)."""
    return [sys.executable, "-c", _LOGICAL_CPUS, str(logical_cpus), *args]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra)
    return env


def run_cli(*args: str, logical_cpus: int = 1, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli_command(*args, logical_cpus=logical_cpus),
        env=cli_env(**env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def convolution_ops(concrete, kind: str) -> set[tuple[str, int]]:
    """``(op type, largest stride)`` of the ops whose type contains ``kind`` (``"Conv3D"``, ``"Conv2D"``) in a
    concrete function's graph and in every function of its library (loop bodies etc.)."""
    found = {(op.type, max(op.get_attr("strides"))) for op in concrete.graph.get_operations() if kind in op.type}
    for function in concrete.graph.as_graph_def().library.function:
        found |= {(node.op, max(node.attr["strides"].list.i)) for node in function.node_def if kind in node.op}
    return found
