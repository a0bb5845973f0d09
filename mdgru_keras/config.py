"""Presets and their validation.

A config is a YAML file (see ``mdgru_keras/configs/``) with the sections below; unknown or ill-typed keys are refused
with a message naming the file and the key. Load with :func:`load_config`, a preset by name with
:func:`load_preset` (``paper``, ``cpu``, ``tiny``).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# The presets are package data (installed with the package; ``configs/`` at the top of the repository links here).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A config file or dictionary is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class NetworkConfig:
    """The localization network (same shape for both stages, sizes may differ)."""

    mdgru_units: tuple[int, ...] = (32, 64, 128)
    fc_channels: tuple[int, ...] = (48, 96, 192)
    mdgru_stride: int = 2
    input_filter: int = 3  # input-convolution filter size of the C-GRUs
    state_filter: int = 3  # state-convolution filter size of the C-GRUs
    dropconnect: float = 0.5
    combine: str = "sum"  # how the 2d C-GRU outputs of an MD-GRU are combined: sum or mean
    head_hidden_factor: int = 4  # first dense layer has (Cx + Cy + Cz) * factor units
    # > 0: the first dense layer has exactly this many units instead (keeps many-landmark models small: each
    # landmark owns a [H, Cx + Cy + Cz] output layer)
    head_hidden_units: int = 0
    # how the coordinate classes are read from the trunk: "dense" (the paper: flatten -> dense layers) or
    # "marginal" (per-landmark score maps on the first level's grid, marginalized per axis: translation-
    # equivariant, so a structure learnt at one place of the window is found at every other; see NETWORKS.md)
    head: str = "dense"


@dataclass(frozen=True)
class CoarseConfig:
    padded_size: int = 256  # the volume is padded (or centrally cropped) to this many voxels per axis
    input_stride: int = 4  # stride of the first convolution; its filter is 2 * stride + 1
    input_channels: int = 16
    offset_range_voxel: int = 100  # training crops: uniform random offset of the region's centre
    # where the region is centred: "volume" (the volume's centre, the paper) or "mass" (the head's intensity
    # centroid: follows heads placed off-centre in their field of view, e.g. scans that reach the neck)
    centre: str = "volume"
    network: NetworkConfig = field(default_factory=NetworkConfig)


@dataclass(frozen=True)
class FineConfig:
    window_size: int = 64
    network: NetworkConfig = field(default_factory=NetworkConfig)


@dataclass(frozen=True)
class AugmentationConfig:
    subvoxel_shift: bool = True  # fine crops at random sub-voxel positions (by trilinear interpolation)
    intensity_scale: float = 0.1  # multiply by 1 + U(-a, a)
    intensity_shift: float = 0.1  # add U(-a, a) standard deviations
    gamma: float = 0.0  # gamma = exp(U(-a, a)); 0 switches it off
    noise_std: float = 0.0  # Gaussian noise, in standard deviations of the volume
    bias_field: float = 0.0  # amplitude of a smooth multiplicative field; 0 switches it off
    rotation_deg: float = 0.0  # random rotation up to this angle about each axis
    scaling: float = 0.0  # random isotropic scaling 1 + U(-a, a)


@dataclass(frozen=True)
class TrainingConfig:
    optimizer: str = "adadelta"
    learning_rate: float = 0.001
    batch_size: int = 1
    epochs: int = 50
    # Gaussian soft labels of this standard deviation over the coordinate classes, in voxels of the stage's grid
    # (fine: volume voxels, coarse: voxels after its strided input convolution); 0 is the paper's one-hot
    # cross-entropy (see mdgru_keras.networks.AxisCrossEntropy for why).
    label_sigma_grid_voxel: float = 0.0
    # constant, or cosine decay to learning_rate * final_lr_fraction at the end of the run: the last epoch or,
    # with a time budget (max_train_seconds / --max-seconds), the end of the budget, whichever comes first
    lr_schedule: str = "constant"
    final_lr_fraction: float = 0.05
    samples_per_subject: int = 1  # one epoch = this many random samples from each training subject
    checkpoint_every_steps: int = 100
    keep_checkpoints: int = 3
    seed: int = 0
    distribution: str = "default"  # default | mirrored | multi_worker
    mixed_precision: bool = False
    max_train_seconds: float = 0.0  # stop after this wall time (0: no limit)


@dataclass(frozen=True)
class Config:
    name: str = "paper"
    landmarks: tuple[str, ...] = ("PMJ",)
    spacing_mm: float = 1.0
    highpass_sigma_mm: float = 3.0  # high-pass channel: volume minus Gaussian(volume, sigma)
    superresolution: int = 4
    parabola: bool = True
    coarse: CoarseConfig = field(default_factory=CoarseConfig)
    fine: FineConfig = field(default_factory=FineConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def __post_init__(self) -> None:
        _check_consistency(self)

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def replace(self, **changes: typing.Any) -> Config:
        return dataclasses.replace(self, **changes)

    @property
    def num_landmarks(self) -> int:
        return len(self.landmarks)


def _to_plain(value: typing.Any) -> typing.Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def landmark_list_problem(names: typing.Sequence[str]) -> str | None:
    """What is wrong with a list of landmark names (a config's ``landmarks``, a ``--landmarks`` option), or None."""
    if not names:
        return "at least one landmark name is needed"
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return f"{name} is given twice (names must be unique)"
        seen.add(name)
    return None


def _check_consistency(config: Config) -> None:
    problems = []
    coarse, fine = config.coarse, config.fine
    if problem := landmark_list_problem(config.landmarks):
        problems.append(f"landmarks: {problem}")
    if config.superresolution < 1:
        problems.append("superresolution: must be >= 1")
    if config.spacing_mm <= 0:
        problems.append("spacing_mm: must be > 0")
    for stage, net, size in (
        ("coarse", coarse.network, coarse.padded_size // max(coarse.input_stride, 1)),
        ("fine", fine.network, fine.window_size),
    ):
        if len(net.mdgru_units) != len(net.fc_channels):
            problems.append(f"{stage}.network: mdgru_units and fc_channels must have the same length")
        reduction = net.mdgru_stride ** len(net.mdgru_units)
        if size % reduction:
            problems.append(f"{stage}: network input of {size} voxels is not divisible by {reduction}")
        if not 0.0 <= net.dropconnect < 1.0:
            problems.append(f"{stage}.network.dropconnect: must be in [0, 1)")
        if net.head not in ("dense", "marginal"):
            problems.append(f"{stage}.network: head must be 'dense' or 'marginal', got {net.head!r}")
        if net.head_hidden_factor < 1 or net.head_hidden_units < 0:
            problems.append(f"{stage}.network: head_hidden_factor must be >= 1 and head_hidden_units >= 0")
        if net.combine not in ("sum", "mean"):
            problems.append(f"{stage}.network.combine: must be 'sum' or 'mean'")
    if coarse.centre not in ("volume", "mass"):
        problems.append(f"coarse.centre: 'volume' or 'mass', got {coarse.centre!r}")
    if coarse.input_stride < 1 or coarse.padded_size % coarse.input_stride:
        problems.append("coarse.padded_size must be a multiple of coarse.input_stride")
    if fine.window_size > coarse.padded_size:
        problems.append(
            f"fine.window_size ({fine.window_size}) is larger than coarse.padded_size ({coarse.padded_size})"
        )
    if config.training.optimizer not in ("adadelta", "adam", "sgd", "rmsprop"):
        problems.append("training.optimizer: one of adadelta, adam, sgd, rmsprop")
    if config.training.lr_schedule not in ("constant", "cosine"):
        problems.append("training.lr_schedule: constant or cosine")
    if not 0 <= config.training.final_lr_fraction <= 1:
        problems.append("training.final_lr_fraction: must be in [0, 1]")
    if config.training.label_sigma_grid_voxel < 0:
        problems.append("training.label_sigma_grid_voxel: must be >= 0 (0: one-hot labels)")
    if config.training.distribution not in ("default", "mirrored", "multi_worker"):
        problems.append("training.distribution: one of default, mirrored, multi_worker")
    if problems:
        raise ConfigError("; ".join(problems))


def _build(cls: type, data: typing.Any, where: str) -> typing.Any:
    """Build dataclass ``cls`` from ``data``, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _coerce(hint: typing.Any, value: typing.Any, where: str) -> typing.Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{where}: unsupported type")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint}")


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    """Validate and build a :class:`Config`; errors name ``source`` and the offending key."""
    try:
        return _build(Config, data, "")
    except ConfigError as error:
        raise ConfigError(f"{source}: {str(error).lstrip('.: ')}") from None


def load_config(path_or_preset: str | Path) -> Config:
    """Load a YAML/JSON config file, or a preset name (``paper``, ``cpu``, ``tiny``, ``afids``)."""
    path = Path(path_or_preset)
    if not path.exists() and (CONFIG_DIR / f"{path_or_preset}.yaml").exists():
        path = CONFIG_DIR / f"{path_or_preset}.yaml"
    if not path.exists():
        presets = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"{path_or_preset}: no such config file or preset (presets: {presets})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    return config_from_dict(data or {}, str(path))


def load_preset(name: str) -> Config:
    return load_config(CONFIG_DIR / f"{name}.yaml")


def with_landmarks(config: Config, landmarks: typing.Sequence[str]) -> Config:
    """The same config for another list of landmarks."""
    return config.replace(landmarks=tuple(landmarks))
