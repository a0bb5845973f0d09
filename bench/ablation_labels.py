"""Ablation: what lets the fine MD-GRU network learn in a few hundred CPU steps (labels, DropConnect, model).

Run: ``python -m bench.ablation_labels --data demo/dataset`` (``make bench-ablation``; about 7 min on 2
cores). Writes ``bench/results/ablation_labels.json``; the summary is in ``docs/TRAINING.md``.

Fine-stage training windows (the ``cpu`` preset's 32^3 crops around PMJ, from the training pipeline with its
augmentation) are drawn once and kept in memory, so every variant sees the same samples and the comparison
measures the optimization alone. Each variant trains ``--steps`` Adam steps (learning rate 1e-3, batches of
``--batch``) from the same seed and reports the mean localization error (argmax, in voxels) on held-out
windows of the validation subjects every 100 steps. Variants:

* ``mdgru one-hot``: the paper's loss (one-hot cross-entropy), DropConnect 0;
* ``mdgru soft``: Gaussian soft labels (sigma 1 voxel), DropConnect 0;
* ``mdgru soft dc0.5``: soft labels with the paper's DropConnect 0.5;
* ``cnn soft``: a plain 3-layer strided CNN with the same heads, as a check that the task itself is learnable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "ablation_labels.json"
VARIANTS = {  # name: (model, label sigma in voxels, DropConnect)
    "mdgru one-hot": ("mdgru", 0.0, 0.0),
    "mdgru soft": ("mdgru", 1.0, 0.0),
    "mdgru soft dc0.5": ("mdgru", 1.0, 0.5),
    "cnn soft": ("cnn", 1.0, 0.0),
}


def draw_windows(data: Path, split: str, count: int, config) -> tuple[np.ndarray, np.ndarray]:
    from mdgru_keras.data.pipeline import make_dataset

    dataset = make_dataset(data, split, "fine", config, seed=0, repeat=True, batch=False)
    windows, labels = [], []
    for inputs, label in dataset.take(count):
        windows.append(inputs["window"].numpy())
        labels.append([int(np.ravel(label[axis])[0]) for axis in "xyz"])
    return np.stack(windows), np.asarray(labels)


def build(kind: str, config, classes: int):
    import keras
    import tensorflow as tf

    from mdgru_keras import networks
    from mdgru_keras.layers import StridedConv3D

    if kind == "mdgru":
        model = networks.build_fine_model(config)
        return model, lambda x, training: model(
            {"window": x, "landmark_index": tf.zeros([tf.shape(x)[0]], tf.int32)}, training=training
        )
    size = config.fine.window_size
    inputs = keras.Input((size, size, size, 2))
    x = inputs
    for channels in config.fine.network.fc_channels:
        # Conv3D with its gradients as matmuls (TensorFlow's strided conv3d gradients are slow on AVX2 CPUs)
        x = keras.layers.ReLU()(StridedConv3D(channels, 3, strides=2, padding="same")(x))
    hidden = keras.layers.LeakyReLU(0.01)(keras.layers.Dense(3 * classes)(keras.layers.Flatten()(x)))
    model = keras.Model(inputs, {axis: keras.layers.Dense(classes)(hidden) for axis in "xyz"})
    return model, lambda x, training: model(x, training=training)


def run_variant(name: str, train, validation, config, steps: int, batch: int) -> dict:
    import keras
    import tensorflow as tf

    from mdgru_keras import networks

    kind, sigma, dropconnect = VARIANTS[name]
    network = dataclasses.replace(config.fine.network, dropconnect=dropconnect)
    config = config.replace(fine=dataclasses.replace(config.fine, network=network))
    classes = networks.stage_classes(config, "fine")[0]
    keras.utils.set_random_seed(0)
    model, forward = build(kind, config, classes)
    optimizer = keras.optimizers.Adam(1e-3)
    loss = networks.AxisCrossEntropy(sigma * config.superresolution)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            logits = forward(x, True)
            value = tf.reduce_mean(tf.add_n([loss(y[:, i], logits[axis]) for i, axis in enumerate("xyz")]))
        gradients = tape.gradient(value, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return value

    def validation_error_voxel() -> float:
        windows, labels = validation
        errors = []
        for start in range(0, len(windows), 50):
            logits = forward(tf.constant(windows[start : start + 50]), False)
            predicted = np.stack([np.argmax(logits[axis].numpy(), -1) for axis in "xyz"], -1)
            errors.append(np.linalg.norm((predicted - labels[start : start + 50]) / config.superresolution, axis=-1))
        return float(np.mean(np.concatenate(errors)))

    rng = np.random.default_rng(0)
    curve, losses, start = [], [], time.perf_counter()
    for index in range(1, steps + 1):
        chosen = rng.integers(0, len(train[0]), batch)
        losses.append(float(step(tf.constant(train[0][chosen]), tf.constant(train[1][chosen]))))
        if index % 100 == 0:
            curve.append({"step": index, "train_loss": float(np.mean(losses[-100:])),
                          "val_error_voxel": validation_error_voxel(),
                          "seconds": time.perf_counter() - start})
            print(f"{name}: {curve[-1]}", flush=True)
    return {"model": kind, "label_sigma_voxel": sigma, "dropconnect": dropconnect, "curve": curve}


def main() -> None:
    from mdgru_keras.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a prepared dataset with PMJ (e.g. demo/dataset)")
    parser.add_argument("--config", default="cpu")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--train-windows", type=int, default=1500)
    parser.add_argument("--val-windows", type=int, default=200)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    config = load_config(args.config)
    train = draw_windows(args.data, "train", args.train_windows, config)
    validation = draw_windows(args.data, "val", args.val_windows, config)
    chance = float(np.mean(np.linalg.norm((validation[1] - validation[1].mean(0)) / config.superresolution, axis=-1)))
    results = {
        "config": args.config, "steps": args.steps, "batch": args.batch, "train_windows": args.train_windows,
        "val_windows": args.val_windows, "constant_guess_error_voxel": chance,
        "variants": {name: run_variant(name, train, validation, config, args.steps, args.batch)
                     for name in args.variants},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
