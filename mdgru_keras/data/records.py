"""The dataset on disk: TFRecord schema, compact volume storage, atomic shard writer and ``prepare``.

Layout (``docs/ARCHITECTURE.md``, "Dataset on disk"): ``DIR/dataset.json`` and
``DIR/{split}-{i:05d}-of-{n:05d}.tfrecord``, one ``tf.train.Example`` per subject.

Volume storage (``volume_dtype``, ``volume_scale``, ``volume_offset``; ``float32 = stored * scale + offset``),
chosen per volume by :func:`encode_volume`:

1. ``int16``, scale 1, offset 0 -- when every value is an integer in ``[-32768, 32767]``: lossless. This is the
   common case for scans kept at their acquired grid (CT in HU, most MR).
2. ``int16`` quantized linearly over ``[min, max]`` -- when the largest rounding error (half a step,
   ``(max - min) / 131070``) is at most ``QUANTIZATION_TOLERANCE`` (1e-3) times the volume's robust standard
   deviation (of the values clipped to their 0.1 and 99.9 percentiles, so that a few extreme voxels count).
   Resampled scans land here: their error is typically 1e-4 standard deviations, far below scanner noise, and
   the network only ever sees z-normalized values.
3. ``float16`` of ``(value - mean) / scale`` with ``scale`` the standard deviation -- otherwise, i.e. when a
   few extreme voxels stretch the range so much that 65536 levels are too coarse for the bulk of the data.
   Relative error at most 2^-11 of each z-value; the scale is raised if needed so no value overflows float16.

All three take 2 bytes per voxel (a 193x229x193 scan: 17 MB per example).
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from mdgru_keras.errors import InputError
from mdgru_keras.geometry import affine_maps
from mdgru_keras.io.atomic import atomic_path, write_text_atomic
from mdgru_keras.version import package_version

SPLITS = ("train", "val", "test")
DATASET_JSON = "dataset.json"
QUANTIZATION_TOLERANCE = 1e-3  # max int16 rounding error, in standard deviations of the volume
_INT16_MIN, _INT16_MAX = -32768, 32767
_FLOAT16_LIMIT = 60000.0  # stay clear of float16's maximum 65504


# ---------------------------------------------------------------------------------------------------------
# volume encoding


@dataclass(frozen=True)
class EncodedVolume:
    """A volume as stored: raw little-endian bytes plus the affine map back to float32."""

    data: bytes
    dtype: str  # "int16" or "float16"
    scale: float
    offset: float
    shape: tuple[int, int, int]

    def decode(self) -> np.ndarray:
        """The float32 volume ``[x, y, z]``."""
        stored = np.frombuffer(self.data, dtype=np.dtype(self.dtype).newbyteorder("<")).reshape(self.shape)
        return (stored.astype(np.float32) * np.float32(self.scale) + np.float32(self.offset)).astype(np.float32)


def _robust_std(values: np.ndarray) -> float:
    """Standard deviation of the values clipped to their 0.1 and 99.9 percentiles: the spread of the bulk of
    the data, which a few extreme voxels do not inflate. Falls back to the plain standard deviation if 0."""
    low, high = np.percentile(values, [0.1, 99.9])
    robust = float(np.clip(values, low, high).std())
    return robust if robust > 0 else float(values.std())


def encode_volume(volume: np.ndarray, tolerance: float = QUANTIZATION_TOLERANCE) -> EncodedVolume:
    """Store ``volume[x, y, z]`` in 2 bytes per voxel, losslessly where possible (see the module docstring)."""
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {volume.shape}")
    shape = tuple(int(s) for s in volume.shape)
    values = volume.astype(np.float64, copy=False)
    if not np.all(np.isfinite(values)):
        raise ValueError("volume contains NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low >= _INT16_MIN and high <= _INT16_MAX and np.array_equal(values, np.round(values)):
        return EncodedVolume(values.astype("<i2").tobytes(order="C"), "int16", 1.0, 0.0, shape)
    std = _robust_std(values)
    step = (high - low) / (_INT16_MAX - _INT16_MIN)
    if step == 0.0:  # constant volume
        return EncodedVolume(np.zeros(shape, "<i2").tobytes(order="C"), "int16", 1.0, low, shape)
    if 0.5 * step <= tolerance * std:
        # value = stored * step + offset, stored in [-32768, 32767] covering [low, high]
        # scale and offset are stored as float32: quantize with exactly those values
        step, offset = float(np.float32(step)), float(np.float32(low - _INT16_MIN * step))
        stored = np.clip(np.round((values - offset) / step), _INT16_MIN, _INT16_MAX).astype("<i2")
        return EncodedVolume(stored.tobytes(order="C"), "int16", step, offset, shape)
    mean = float(np.float32(values.mean()))
    scale = float(np.float32(max(std, float(np.abs(values - mean).max()) / _FLOAT16_LIMIT, 1e-30)))
    stored = ((values - mean) / scale).astype("<f2")
    return EncodedVolume(stored.tobytes(order="C"), "float16", scale, mean, shape)


# ---------------------------------------------------------------------------------------------------------
# tf.train.Example schema


@dataclass(frozen=True)
class Subject:
    """One subject in memory, ready to be written: the resampled volume and its landmarks in voxels."""

    subject: str
    volume: np.ndarray  # [x, y, z], RAS voxel order
    voxel_to_world: np.ndarray  # 4x4, RAS mm
    landmarks_voxel: np.ndarray  # [K, 3] continuous voxel coordinates in `volume`
    landmark_names: tuple[str, ...]
    spacing_mm: tuple[float, float, float] | None = field(default=None)  # default: from the affine


def _bytes(values: Iterable[bytes]) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _floats(values: Iterable[float]) -> tf.train.Feature:
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def _ints(values: Iterable[int]) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def make_example(subject: Subject, encoded: EncodedVolume | None = None) -> tf.train.Example:
    """The ``tf.train.Example`` of one subject (schema in ``docs/ARCHITECTURE.md``)."""
    encoded = encoded or encode_volume(subject.volume)
    landmarks_voxel = np.asarray(subject.landmarks_voxel, dtype=np.float64).reshape(-1, 3)
    if landmarks_voxel.shape[0] != len(subject.landmark_names):
        raise ValueError(f"{subject.subject}: {landmarks_voxel.shape[0]} landmarks but "
                         f"{len(subject.landmark_names)} names")
    spacing = subject.spacing_mm or tuple(affine_maps.voxel_spacing_mm(subject.voxel_to_world))
    feature = {
        "subject": _bytes([subject.subject.encode("utf-8")]),
        "volume": _bytes([encoded.data]),
        "volume_dtype": _bytes([encoded.dtype.encode("ascii")]),
        "volume_scale": _floats([encoded.scale]),
        "volume_offset": _floats([encoded.offset]),
        "shape": _ints(encoded.shape),
        "spacing_mm": _floats(spacing),
        "voxel_to_world": _floats(np.asarray(subject.voxel_to_world, dtype=np.float64).reshape(16)),
        "landmark_names": _bytes(name.encode("utf-8") for name in subject.landmark_names),
        "landmarks_voxel": _floats(landmarks_voxel.reshape(-1)),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature))


_FEATURES = {
    "subject": tf.io.FixedLenFeature([], tf.string),
    "volume": tf.io.FixedLenFeature([], tf.string),
    "volume_dtype": tf.io.FixedLenFeature([], tf.string),
    "volume_scale": tf.io.FixedLenFeature([], tf.float32),
    "volume_offset": tf.io.FixedLenFeature([], tf.float32),
    "shape": tf.io.FixedLenFeature([3], tf.int64),
    "spacing_mm": tf.io.FixedLenFeature([3], tf.float32),
    "voxel_to_world": tf.io.FixedLenFeature([16], tf.float32),
    "landmark_names": tf.io.VarLenFeature(tf.string),
    "landmarks_voxel": tf.io.VarLenFeature(tf.float32),
}


def decode_volume_tf(data: tf.Tensor, dtype: tf.Tensor, scale: tf.Tensor, offset: tf.Tensor,
                     shape: tf.Tensor) -> tf.Tensor:
    """float32 ``[x, y, z]`` from the stored bytes (TensorFlow form of :meth:`EncodedVolume.decode`)."""

    def as_int16() -> tf.Tensor:
        return tf.cast(tf.io.decode_raw(data, tf.int16, little_endian=True), tf.float32)

    def as_float16() -> tf.Tensor:
        return tf.cast(tf.io.decode_raw(data, tf.float16, little_endian=True), tf.float32)

    flat = tf.cond(tf.equal(dtype, "int16"), as_int16, as_float16)
    volume = flat * scale + offset
    return tf.reshape(volume, tf.cast(shape, tf.int32))


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parse one serialized example into tensors.

    Returns ``subject`` string ``[]``, ``volume`` float32 ``[x, y, z]`` (decoded), ``shape`` int32 ``[3]``,
    ``spacing_mm`` float32 ``[3]``, ``voxel_to_world`` float32 ``[4, 4]``, ``landmark_names`` string ``[K]``,
    ``landmarks_voxel`` float32 ``[K, 3]``.
    """
    parsed = tf.io.parse_single_example(serialized, _FEATURES)
    shape = tf.cast(parsed["shape"], tf.int32)
    volume = decode_volume_tf(parsed["volume"], parsed["volume_dtype"], parsed["volume_scale"],
                              parsed["volume_offset"], shape)
    return {
        "subject": parsed["subject"],
        "volume": tf.ensure_shape(volume, [None, None, None]),
        "shape": shape,
        "spacing_mm": parsed["spacing_mm"],
        "voxel_to_world": tf.reshape(parsed["voxel_to_world"], [4, 4]),
        "landmark_names": tf.sparse.to_dense(parsed["landmark_names"]),
        "landmarks_voxel": tf.reshape(tf.sparse.to_dense(parsed["landmarks_voxel"]), [-1, 3]),
    }


# ---------------------------------------------------------------------------------------------------------
# writing


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def shard_count(num_examples: int, shard_size: int) -> int:
    return max(1, -(-num_examples // shard_size)) if num_examples else 0


def write_shard(path: str | Path, serialized_examples: Iterable[bytes]) -> Path:
    """Write one TFRecord file atomically (a temp file in the same directory, then ``os.replace``)."""
    with atomic_path(path) as temporary, tf.io.TFRecordWriter(str(temporary)) as writer:
        for serialized in serialized_examples:
            writer.write(serialized)
    return Path(path)


def write_json_atomic(path: str | Path, data: dict) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_dataset(
    out_dir: str | Path,
    splits: dict[str, Sequence[str]],
    load_subject: Callable[[str], Subject],
    landmark_names: Sequence[str],
    spacing_mm: float,
    shard_size: int = 8,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Write shards and ``dataset.json`` into the existing directory ``out_dir``.

    ``splits`` maps split name to subject ids (in writing order); ``load_subject(subject_id)`` returns a
    :class:`Subject` with landmarks in ``landmark_names`` order. Shards are written atomically one by one and
    ``dataset.json`` last, so a directory with a ``dataset.json`` is complete. ``progress(subject_id)`` is
    called after each subject. Returns the ``dataset.json`` content.
    """
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    out_dir = Path(out_dir)
    description: dict = {
        "landmarks": list(landmark_names),
        "spacing_mm": spacing_mm,
        "splits": {},
        "counts": {},
        "created_by": f"mdgru-keras {package_version()}",
    }
    for split, subjects in splits.items():
        subjects = list(subjects)
        count = shard_count(len(subjects), shard_size)
        shards = []
        for index in range(count):
            chunk = subjects[index * shard_size : (index + 1) * shard_size]

            def serialized(chunk: list[str] = chunk) -> Iterable[bytes]:
                for subject_id in chunk:
                    subject = load_subject(subject_id)
                    if tuple(subject.landmark_names) != tuple(landmark_names):
                        raise ValueError(f"{subject_id}: landmarks {subject.landmark_names} != {landmark_names}")
                    yield make_example(subject).SerializeToString()
                    if progress is not None:
                        progress(subject_id)

            name = shard_name(split, index, count)
            write_shard(out_dir / name, serialized())
            shards.append(name)
        description["splits"][split] = {"subjects": subjects, "shards": shards}
        description["counts"][split] = len(subjects)
    write_json_atomic(out_dir / DATASET_JSON, description)
    return description


def read_description(dataset_dir: str | Path) -> dict:
    """``dataset.json`` of a prepared dataset, with a one-line :class:`InputError` if absent or malformed."""
    path = Path(dataset_dir) / DATASET_JSON
    if not path.is_file():
        raise InputError(path, "no dataset.json here; create the dataset with `mdgru-localize prepare`")
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
        _ = description["landmarks"], description["splits"]
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(path, f"not a dataset description ({error.__class__.__name__}: {error})") from None
    return description


# ---------------------------------------------------------------------------------------------------------
# prepare: manifest -> dataset


@dataclass(frozen=True)
class ManifestRow:
    subject: str
    image: Path
    landmarks: Path
    split: str | None
    line: int


def read_manifest(manifest_csv: str | Path, check_files: bool = True) -> list[ManifestRow]:
    """Rows of a manifest CSV with header ``subject,image,landmarks[,split]``; paths relative to the manifest.

    ``check_files=False`` leaves missing image and landmark files to the caller (``evaluate`` reports them per
    subject and goes on with the others)."""
    manifest_csv = Path(manifest_csv)
    if not manifest_csv.is_file():
        raise InputError(manifest_csv, "no such manifest file")
    try:
        text = manifest_csv.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(manifest_csv, f"cannot read the manifest ({error})") from None
    reader = csv.DictReader(line for line in text.splitlines() if line.strip() and not line.startswith("#"))
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    missing = [c for c in ("subject", "image", "landmarks") if c not in header]
    if missing:
        raise InputError(manifest_csv, f"missing column(s) {', '.join(missing)}; the header must be "
                                       f"subject,image,landmarks[,split] (found: {','.join(header) or 'nothing'})")
    rows: list[ManifestRow] = []
    seen: dict[str, int] = {}
    base = manifest_csv.resolve().parent
    for line, record in enumerate(reader, start=2):
        subject = (record.get("subject") or "").strip()
        image = (record.get("image") or "").strip()
        landmarks = (record.get("landmarks") or "").strip()
        split = (record.get("split") or "").strip() or None
        if not subject or not image or not landmarks:
            raise InputError(manifest_csv, f"line {line}: subject, image and landmarks must all be given")
        if subject in seen:
            raise InputError(manifest_csv, f"line {line}: subject {subject!r} already listed on line {seen[subject]}")
        if split is not None and split not in SPLITS:
            raise InputError(manifest_csv, f"line {line}: split {split!r} is not one of {', '.join(SPLITS)}")
        seen[subject] = line
        image_path, landmark_path = base / image, base / landmarks
        for path in (image_path, landmark_path) if check_files else ():
            if not path.is_file():
                raise InputError(path, f"no such file (manifest {manifest_csv.name}, line {line})")
        rows.append(ManifestRow(subject, image_path, landmark_path, split, line))
    if not rows:
        raise InputError(manifest_csv, "the manifest lists no subjects")
    return rows


def assign_splits(rows: Sequence[ManifestRow], val_fraction: float, test_fraction: float,
                  seed: int) -> dict[str, list[str]]:
    """Split subjects: a split given in the manifest is kept; the others are shuffled with ``seed`` and
    ``round(fraction * count)`` of them go to test and val, the rest to train. Each subject is in one split."""
    if not (0.0 <= val_fraction <= 1.0 and 0.0 <= test_fraction <= 1.0 and val_fraction + test_fraction <= 1.0):
        raise ValueError("val_fraction and test_fraction must be in [0, 1] with a sum <= 1")
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    free = []
    for row in rows:
        (splits[row.split] if row.split else free).append(row.subject)
    free = sorted(free)
    random.Random(seed).shuffle(free)
    n_test = round(test_fraction * len(free))
    n_val = min(round(val_fraction * len(free)), len(free) - n_test)
    splits["test"] += free[:n_test]
    splits["val"] += free[n_test : n_test + n_val]
    splits["train"] += free[n_test + n_val :]
    return {name: subjects for name, subjects in splits.items() if subjects}


def _first_subject_landmarks(rows: Sequence[ManifestRow], splits: dict[str, list[str]]) -> tuple[Path, tuple[str, ...]]:
    from mdgru_keras.io.landmarks import read_landmarks

    first = next(iter(next(iter(splits.values()))))
    path = next(row.landmarks for row in rows if row.subject == first)
    return path, tuple(read_landmarks(path))


def first_subject_landmarks(
    manifest_csv: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> tuple[Path, tuple[str, ...]]:
    """The landmark file of the subject that :func:`prepare_dataset` (with the same split arguments) reads first,
    and its landmark names in file order: what ``landmarks=None`` (``prepare --landmarks all``) takes."""
    rows = read_manifest(manifest_csv)
    return _first_subject_landmarks(rows, assign_splits(rows, val_fraction, test_fraction, seed))


def load_subject_from_files(row: ManifestRow, landmark_names: Sequence[str] | None,
                            spacing_mm: float) -> Subject:
    """Read one manifest row with :mod:`mdgru_keras.io`, check its landmarks and convert them to voxels.

    ``landmark_names=None`` keeps all landmarks of the file, in file order.
    """
    from mdgru_keras.io.landmarks import check_landmarks_inside, read_landmarks, require_landmarks
    from mdgru_keras.io.nifti import read_volume

    landmarks_world_mm = read_landmarks(row.landmarks)
    names = tuple(landmarks_world_mm) if landmark_names is None else tuple(landmark_names)
    landmarks_world_mm = require_landmarks(landmarks_world_mm, names, row.landmarks)
    volume = read_volume(row.image, spacing_mm=spacing_mm)
    check_landmarks_inside(volume, landmarks_world_mm, row.landmarks)
    world_mm = np.stack([landmarks_world_mm[name] for name in names])
    voxel = affine_maps.world_to_voxel(world_mm, volume.voxel_to_world)
    return Subject(row.subject, volume.data, volume.voxel_to_world, voxel, names,
                   tuple(float(s) for s in volume.spacing_mm))


def prepare_dataset(
    manifest_csv: str | Path,
    out_dir: str | Path,
    landmarks: Sequence[str] | None = None,
    spacing_mm: float = 1.0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    shard_size: int = 8,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Manifest CSV -> ``out_dir`` with TFRecord shards and ``dataset.json``; returns the description.

    Everything is written into a temporary sibling directory that is renamed to ``out_dir`` only when complete,
    so a failure (bad file: :class:`InputError` naming it) leaves nothing behind. ``landmarks=None`` takes the
    landmark names of the first subject's file; every subject must have all of them.
    """
    if spacing_mm is None or spacing_mm <= 0:
        raise ValueError("spacing_mm must be > 0")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(out_dir, "exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise InputError(out_dir, "already exists and is not empty (use --overwrite to replace it)")
    rows = read_manifest(manifest_csv)
    splits = assign_splits(rows, val_fraction, test_fraction, seed)
    by_subject = {row.subject: row for row in rows}

    names: list[tuple[str, ...]] = [tuple(landmarks)] if landmarks else []
    if landmarks and len(set(landmarks)) != len(landmarks):
        raise ValueError("landmark names must be unique")

    from mdgru_keras.io.nifti import world_space_note

    def load(subject_id: str) -> Subject:
        row = by_subject[subject_id]
        subject = load_subject_from_files(row, names[0] if names else None, spacing_mm)
        if progress and (note := world_space_note(row.image)):  # its landmarks may be in the other form's space
            from tqdm import tqdm

            tqdm.write(f"warning: {row.image}: {note}", file=sys.stderr)
        if not names:
            names.append(subject.landmark_names)
        return subject

    # The landmark list is needed before the first shard is closed; read the first subject's file early.
    if not names:
        names.append(_first_subject_landmarks(rows, splits)[1])

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    bar = None
    try:
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(rows), desc="prepare", unit="subject")
        description = write_dataset(temp_dir, splits, load, names[0], float(spacing_mm), shard_size,
                                    progress=(lambda _subject: bar.update(1)) if bar else None)
        _move_into_place(temp_dir, out_dir)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return description


def _move_into_place(temp_dir: Path, out_dir: Path) -> None:
    """Rename the finished ``temp_dir`` to ``out_dir``, replacing an existing ``out_dir`` only at the end."""
    if out_dir.is_dir() and any(out_dir.iterdir()):
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(temp_dir, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if out_dir.is_dir():
            out_dir.rmdir()
        os.replace(temp_dir, out_dir)
    # mkdtemp creates 0700 directories; give the dataset the mode a plain mkdir would (0777 minus the umask)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out_dir, 0o777 & ~umask)
