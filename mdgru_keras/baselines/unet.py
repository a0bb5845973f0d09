"""3D U-Net heatmap regression: the CNN baseline for the fine stage (see ``docs/BASELINES.md``).

The AFIDs CNN tools (afids-CNN, autoafids) localize each landmark with a standard 3D U-Net that regresses a
smooth map of the landmark (a Gaussian, or a function of the distance to it) on patches, trained with a
voxelwise regression loss, and read the landmark off the map's peak. This module does the same on exactly
the fine windows that our MD-GRU fine stage sees, so the two can be compared side by side:

* :func:`build_unet` — ``{"window": [B,W,W,W,C], "landmark_index": [B]}`` → heatmap ``[B,W,W,W]``, the same
  inputs as the fine model of ``docs/ARCHITECTURE.md``. The network has one output channel per landmark
  (K channels, as if K per-landmark U-Nets shared their trunk) and :class:`LandmarkChannel` keeps the channel
  of ``landmark_index``; so the loss only sees the landmark the window was cropped for, and one model serves
  all K landmarks like our fine model does.
* :func:`heatmap_example` — the ``tf.data`` map from the fine pipeline's ``(inputs, labels, metadata)`` to
  ``(inputs, heatmap)``, the heatmap a Gaussian of ``sigma_voxel`` at ``metadata["window_voxel"]``.
* :func:`train_unet` / :func:`fit_unet` — Adam on a (weighted) MSE for a fixed wall-clock budget.
* :class:`UNetLocalizer` — a window around each coarse estimate, heatmap, sub-voxel peak, volume voxels.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from mdgru_keras.baselines.heatmaps import gaussian_heatmap_tf, heatmap_peak
from mdgru_keras.config import Config
from mdgru_keras.errors import InputError, one_line
from mdgru_keras.geometry.windows import crop_with_padding, window_origin_around
from mdgru_keras.layers import StridedConv3DTranspose, upgrade_strided_convolutions
from mdgru_keras.preprocessing import preprocess

_PACKAGE = "mdgru_keras.baselines"


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of the U-Net baseline (the data, window size and landmarks come from :class:`Config`)."""

    base_filters: int = 8  # filters at the finest level; doubled at each coarser level (8/16/32 for 3 levels)
    levels: int = 3  # resolutions; the window size must be divisible by 2 ** (levels - 1)
    convs_per_level: int = 2  # conv-norm-ReLU blocks per level and path
    norm: str = "group"  # group | batch | none (group: batches of 1-4 windows are too small for batch norm)
    norm_groups: int = 4
    upsampling: str = "transpose"  # transpose (learned 2x2x2 transposed conv) | upsample (nearest + 1x1x1 conv)
    sigma_voxel: float = 2.0  # Gaussian width of the target heatmap
    heatmap_amplitude: float = 1.0  # target value at the landmark
    foreground_weight: float = 10.0  # weighted MSE: weight 1 + foreground_weight * target / amplitude (0: MSE)
    learning_rate: float = 1e-3  # Adam
    batch_size: int = 0  # 0: config.training.batch_size

    def __post_init__(self) -> None:
        problems = []
        if self.base_filters < 1 or self.levels < 1 or self.convs_per_level < 1:
            problems.append("base_filters, levels and convs_per_level must be >= 1")
        if self.norm not in ("group", "batch", "none"):
            problems.append("norm: one of group, batch, none")
        if self.norm == "group" and self.base_filters % self.norm_groups:
            problems.append(f"norm_groups ({self.norm_groups}) must divide base_filters ({self.base_filters})")
        if self.upsampling not in ("transpose", "upsample"):
            problems.append("upsampling: one of transpose, upsample")
        if self.sigma_voxel <= 0 or self.heatmap_amplitude <= 0 or self.foreground_weight < 0:
            problems.append("sigma_voxel and heatmap_amplitude must be > 0, foreground_weight >= 0")
        if problems:
            raise ValueError("UNetConfig: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------
# model


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LandmarkChannel(keras.layers.Layer):
    """Keep the heatmap channel of each sample's landmark.

    Inputs ``[heatmaps [B, W, W, W, K], landmark_index int [B]]``; output ``[B, W, W, W]``.
    """

    def call(self, inputs: list) -> tf.Tensor:
        heatmaps, landmark_index = inputs
        num_landmarks = keras.ops.shape(heatmaps)[-1]
        one_hot = keras.ops.one_hot(keras.ops.cast(landmark_index, "int32"), num_landmarks, dtype=heatmaps.dtype)
        return keras.ops.sum(heatmaps * one_hot[:, None, None, None, :], axis=-1)

    def compute_output_shape(self, input_shape: list) -> tuple:
        return tuple(input_shape[0][:-1])


def _conv_norm_relu(x: keras.KerasTensor, filters: int, unet: UNetConfig, name: str) -> keras.KerasTensor:
    """3x3x3 convolution, normalization, ReLU (no conv bias where a normalization follows)."""
    x = keras.layers.Conv3D(filters, 3, padding="same", use_bias=unet.norm == "none", name=f"{name}_conv")(x)
    if unet.norm == "group":
        x = keras.layers.GroupNormalization(groups=unet.norm_groups, name=f"{name}_gn")(x)
    elif unet.norm == "batch":
        x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def build_unet(config: Config, unet: UNetConfig | None = None, input_channels: int = 2) -> keras.Model:
    """The U-Net for ``config.fine.window_size`` windows and ``config.num_landmarks`` landmarks.

    Inputs ``{"window": float32 [B, W, W, W, input_channels], "landmark_index": int32 [B]}``;
    output the heatmap of that landmark, float32 ``[B, W, W, W]`` (linear, no activation).
    """
    unet = unet or UNetConfig()
    size = config.fine.window_size
    reduction = 2 ** (unet.levels - 1)
    if size % reduction:
        raise ValueError(f"fine.window_size {size} is not divisible by 2 ** (levels - 1) = {reduction}")
    window = keras.Input((size, size, size, input_channels), name="window")
    landmark_index = keras.Input((), dtype="int32", name="landmark_index")
    x = window
    skips = []
    for level in range(unet.levels):
        if level:
            x = keras.layers.MaxPooling3D(2, name=f"down{level}_pool")(x)
        for i in range(unet.convs_per_level):
            x = _conv_norm_relu(x, unet.base_filters * 2**level, unet, f"down{level}_{i}")
        skips.append(x)
    for level in reversed(range(unet.levels - 1)):
        filters = unet.base_filters * 2**level
        if unet.upsampling == "transpose":
            # Conv3DTranspose's weights and result, as matmuls: its own kernels are strided conv3d gradients
            x = StridedConv3DTranspose(filters, 2, strides=2, name=f"up{level}_transpose")(x)
        else:
            x = keras.layers.UpSampling3D(2, name=f"up{level}_upsample")(x)
            x = keras.layers.Conv3D(filters, 1, name=f"up{level}_project")(x)
        x = keras.layers.Concatenate(name=f"up{level}_skip")([skips[level], x])
        for i in range(unet.convs_per_level):
            x = _conv_norm_relu(x, filters, unet, f"up{level}_{i}")
    heatmaps = keras.layers.Conv3D(config.num_landmarks, 1, name="heatmaps")(x)
    heatmap = LandmarkChannel(name="heatmap")([heatmaps, landmark_index])
    return keras.Model({"window": window, "landmark_index": landmark_index}, heatmap, name="unet_heatmap")


@keras.saving.register_keras_serializable(package=_PACKAGE)
class WeightedHeatmapMSE(keras.losses.Loss):
    """Mean of ``(1 + foreground_weight * target / amplitude) * (prediction - target)^2`` over the window.

    With the weight 0 this is plain MSE. A positive weight counters the imbalance of a few foreground voxels
    against a window of zeros, which otherwise lets an all-zero output sit in a flat minimum for a long time.
    """

    def __init__(self, foreground_weight: float = 0.0, amplitude: float = 1.0, name: str = "weighted_heatmap_mse",
                 **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        self.foreground_weight = float(foreground_weight)
        self.amplitude = float(amplitude)

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        y_true = keras.ops.cast(y_true, y_pred.dtype)
        weight = 1.0 + (self.foreground_weight / self.amplitude) * y_true
        return keras.ops.mean(weight * keras.ops.square(y_pred - y_true), axis=(1, 2, 3))

    def get_config(self) -> dict:
        return {**super().get_config(), "foreground_weight": self.foreground_weight, "amplitude": self.amplitude}


def compile_unet(model: keras.Model, unet: UNetConfig) -> keras.Model:
    model.compile(
        optimizer=keras.optimizers.Adam(unet.learning_rate),
        loss=WeightedHeatmapMSE(unet.foreground_weight, unet.heatmap_amplitude),
    )
    return model


def load_unet(path: str | Path) -> keras.Model:
    """Load a model written by :func:`fit_unet` (``.keras``), without its optimizer state.

    Models saved with ``keras.layers.Conv3DTranspose`` upsampling get :class:`StridedConv3DTranspose` layers
    with the same weights (:func:`upgrade_strided_convolutions`). A file Keras cannot load is an
    :class:`~mdgru_keras.errors.InputError` naming it.
    """
    try:
        model = keras.saving.load_model(str(path), compile=False)
    except Exception as error:  # Keras raises many kinds for corrupt or foreign files
        raise InputError(path, f"cannot load the model ({type(error).__name__}: {one_line(str(error))})") from None
    return upgrade_strided_convolutions(model)


# ---------------------------------------------------------------------------------------------------------
# data


def heatmap_example(
    inputs: dict, labels: dict, metadata: dict, *, window_size: int, unet: UNetConfig
) -> tuple[dict, tf.Tensor]:
    """``tf.data`` map: fine-pipeline element → ``(inputs, heatmap)``, batched or not.

    ``metadata["window_voxel"][landmark_index]`` (``[3]`` or ``[B, 3]``) is the window's own landmark's
    continuous position in it (``metadata["landmark_index"]``: the landmark the window was placed for);
    the heatmap (``[W, W, W]`` or ``[B, W, W, W]``) is a Gaussian there. ``labels`` (the MD-GRU's coordinate
    classes) are not used.
    """
    del labels
    index = tf.cast(metadata["landmark_index"], tf.int32)
    # the window's own landmark: window_voxel is [K, 3] (or [B, K, 3]) for all landmarks
    window_voxel = tf.gather(metadata["window_voxel"], index, batch_dims=index.shape.rank)
    heatmap = gaussian_heatmap_tf(window_voxel, window_size, unet.sigma_voxel, unet.heatmap_amplitude)
    return {"window": inputs["window"], "landmark_index": index}, heatmap


# ---------------------------------------------------------------------------------------------------------
# training


@dataclass
class UNetTrainingSummary:
    """What a budgeted training run did; written next to the model as JSON by :func:`fit_unet`."""

    steps: int
    seconds: float
    first_step_seconds: float  # from the start of fit: graph tracing, filling buffers, the first step
    median_step_seconds: float  # of the steps after the first (the first traces the graph)
    first_loss: float  # loss of the first step
    final_loss: float  # mean loss of the last min(50, steps) steps
    parameters: int
    unet: dict
    samples_per_step: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _TimeBudget(keras.callbacks.Callback):
    """Stop training once ``budget_seconds`` of wall time have passed since training began, or after
    ``max_steps`` steps; record the steps' times and losses."""

    def __init__(self, budget_seconds: float, progress: bool, max_steps: int | None = None) -> None:
        super().__init__()
        self.budget_seconds = budget_seconds
        self.max_steps = max_steps
        self.progress = progress
        self.step_seconds: list[float] = []
        self.losses: list[float] = []
        self.epoch_mean = 0.0

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.start = self.last = time.perf_counter()
        self.bar = tqdm(total=round(self.budget_seconds), unit="s", desc="U-Net", disable=not self.progress)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        now = time.perf_counter()
        self.step_seconds.append(now - self.last)
        self.last = now
        if logs and "loss" in logs:
            # Keras logs the running mean over the epoch so far; unroll it to this step's own loss
            mean = float(logs["loss"])
            self.losses.append((batch + 1) * mean - batch * self.epoch_mean if batch else mean)
            self.epoch_mean = mean
        elapsed = now - self.start
        self.bar.update(min(round(elapsed), self.bar.total) - self.bar.n)
        if self.losses:
            self.bar.set_postfix(loss=f"{self.losses[-1]:.4g}", steps=len(self.step_seconds), refresh=False)
        if elapsed >= self.budget_seconds or (self.max_steps and len(self.step_seconds) >= self.max_steps):
            self.model.stop_training = True

    def on_train_end(self, logs: dict | None = None) -> None:
        self.seconds = time.perf_counter() - self.start
        self.bar.close()


def train_unet(
    model: keras.Model,
    dataset: tf.data.Dataset,
    budget_seconds: float,
    unet: UNetConfig,
    *,
    max_steps: int | None = None,
    progress: bool = True,
) -> UNetTrainingSummary:
    """Train ``model`` on ``(inputs, heatmap)`` batches from a repeating ``dataset`` for ``budget_seconds``
    (or ``max_steps`` steps, whichever comes first).

    The budget counts from the start of ``fit`` (graph tracing included) and is checked after every step,
    so the run ends within one step of it.
    """
    if not model.compiled:
        compile_unet(model, unet)
    budget = _TimeBudget(budget_seconds, progress, max_steps)
    steps_per_epoch = 1000  # epochs are only bookkeeping here; the budget callback ends the run
    model.fit(dataset, epochs=10**9, steps_per_epoch=steps_per_epoch, callbacks=[budget], verbose=0, shuffle=False)
    steps = len(budget.step_seconds)
    later = budget.step_seconds[1:] or budget.step_seconds
    batch_size = dataset.element_spec[1].shape[0]
    return UNetTrainingSummary(
        steps=steps,
        seconds=budget.seconds,
        first_step_seconds=budget.step_seconds[0] if steps else float("nan"),
        median_step_seconds=float(np.median(later)) if later else float("nan"),
        first_loss=budget.losses[0] if budget.losses else float("nan"),
        final_loss=float(np.mean(budget.losses[-50:])) if budget.losses else float("nan"),
        parameters=int(model.count_params()),
        unet=unet.to_dict(),
        samples_per_step=int(batch_size) if batch_size is not None else -1,
    )


def _atomic_write(out_path: Path, write: Callable[[Path], None]) -> None:
    """Write through ``write(temp_path)`` to a temp file beside ``out_path`` (same suffix), then rename."""
    temp = out_path.with_name(f".{out_path.stem}.tmp-{os.getpid()}{out_path.suffix}")
    try:
        write(temp)
        os.replace(temp, out_path)
    finally:
        if temp.exists():
            temp.unlink()


def fit_unet(
    dataset_dir: str | Path,
    config: Config,
    budget_seconds: float,
    out_path: str | Path,
    seed: int = 0,
    unet: UNetConfig | None = None,
    *,
    max_steps: int | None = None,
    progress: bool = True,
) -> UNetTrainingSummary:
    """Train the U-Net on the fine windows of ``dataset_dir``'s train split for ``budget_seconds`` of wall time.

    The windows are those of our fine stage (``make_dataset(dataset_dir, "train", "fine", config)``: same
    crops around the landmark, same preprocessing and augmentation, ``config.training.batch_size`` unless
    ``unet.batch_size`` is set). Writes the model to ``out_path`` (``.keras``) and the
    :class:`UNetTrainingSummary` to ``out_path`` with suffix ``.json``, both atomically.
    """
    from mdgru_keras.data.pipeline import make_dataset  # the pipeline imports records, NIfTI readers etc.

    unet = unet or UNetConfig()
    out_path = Path(out_path)
    if out_path.suffix != ".keras":
        raise ValueError(f"{out_path}: the U-Net is saved in Keras format; use a .keras file name")
    keras.utils.set_random_seed(seed)
    if unet.batch_size:
        config = config.replace(training=dataclasses.replace(config.training, batch_size=unet.batch_size))
    dataset = make_dataset(dataset_dir, "train", "fine", config, seed=seed, with_metadata=True)
    size = config.fine.window_size
    dataset = dataset.map(
        lambda inputs, labels, metadata: heatmap_example(inputs, labels, metadata, window_size=size, unet=unet),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).prefetch(tf.data.AUTOTUNE)
    channels = dataset.element_spec[0]["window"].shape[-1]
    model = compile_unet(build_unet(config, unet, input_channels=channels), unet)
    summary = train_unet(model, dataset, budget_seconds, unet, max_steps=max_steps, progress=progress)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_path, model.save)
    _atomic_write(
        out_path.with_suffix(".json"),
        lambda path: path.write_text(json.dumps(summary.to_dict(), indent=2) + "\n", encoding="utf-8"),
    )
    return summary


# ---------------------------------------------------------------------------------------------------------
# inference


class UNetLocalizer:
    """Refine coarse landmark estimates with the U-Net, the way our fine stage does.

    ``localize(volume, coarse_voxel)``: for each landmark ``k``, the ``W^3`` window whose centre voxel is
    nearest to ``coarse_voxel[k]`` (zero-padded outside the volume), the heatmap of landmark ``k`` on it, its
    sub-voxel peak (:func:`mdgru_keras.baselines.heatmaps.heatmap_peak`), mapped back to volume voxels.
    """

    def __init__(self, model: keras.Model, config: Config, batch_size: int = 8) -> None:
        self.model = model
        self.config = config
        self.batch_size = batch_size
        self.window_size = config.fine.window_size
        input_shape = model.input["window"].shape if isinstance(model.input, dict) else model.inputs[0].shape
        if tuple(input_shape[1:4]) != (self.window_size,) * 3:
            raise ValueError(
                f"the model takes {tuple(input_shape[1:4])} windows but config.fine.window_size is {self.window_size}"
            )
        self.input_channels = int(input_shape[-1])
        self._predict = tf.function(lambda inputs: model(inputs, training=False), reduce_retracing=True)

    @classmethod
    def load(cls, path: str | Path, config: Config, batch_size: int = 8) -> UNetLocalizer:
        return cls(load_unet(path), config, batch_size)

    def heatmaps(self, volume: np.ndarray, coarse_voxel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Window origins ``[K, 3]`` (int64, volume voxels) and heatmaps ``[K, W, W, W]`` around the estimates."""
        volume = np.asarray(volume, dtype=np.float32)
        if volume.ndim == 3:
            volume = preprocess(volume, self.config.spacing_mm, self.config.highpass_sigma_mm).numpy()
        if volume.ndim != 4 or volume.shape[-1] != self.input_channels:
            raise ValueError(
                f"volume of shape {volume.shape}: expected a scan [X, Y, Z] or its preprocessed "
                f"[X, Y, Z, {self.input_channels}] network input"
            )
        coarse_voxel = np.asarray(coarse_voxel, dtype=np.float64).reshape(-1, 3)
        num_landmarks = coarse_voxel.shape[0]
        if num_landmarks != self.config.num_landmarks:
            raise ValueError(f"{num_landmarks} coarse estimates for {self.config.num_landmarks} landmarks")
        size = (self.window_size,) * 3
        origins = np.stack([window_origin_around(c, size) for c in coarse_voxel])
        windows = np.stack([crop_with_padding(volume, o, size) for o in origins])
        landmark_index = np.arange(num_landmarks, dtype=np.int32)
        heatmaps = []
        for start in range(0, num_landmarks, self.batch_size):
            batch = slice(start, start + self.batch_size)
            inputs = {"window": tf.constant(windows[batch]), "landmark_index": tf.constant(landmark_index[batch])}
            heatmaps.append(np.asarray(self._predict(inputs)))
        return origins, np.concatenate(heatmaps)

    def localize(self, volume: np.ndarray, coarse_voxel: np.ndarray) -> np.ndarray:
        """Refined landmark positions ``[K, 3]`` (float64, continuous voxels of ``volume``).

        ``volume``: the scan ``[X, Y, Z]`` in RAS order at the model spacing (``config.spacing_mm``), which is
        preprocessed here as in training (:func:`mdgru_keras.preprocessing.preprocess`), or that network input
        ``[X, Y, Z, C]`` already; ``coarse_voxel``: ``[K, 3]`` estimates in the same voxels, landmark order.
        """
        origins, heatmaps = self.heatmaps(volume, coarse_voxel)
        return origins + heatmap_peak(heatmaps)
