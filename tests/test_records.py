"""TFRecord schema and storage, atomic shard writes, and ``prepare`` on a tiny NIfTI + fcsv manifest."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from mdgru_keras.data.records import (
    QUANTIZATION_TOLERANCE,
    Subject,
    assign_splits,
    encode_volume,
    make_example,
    parse_example,
    read_manifest,
    write_dataset,
    write_shard,
)
from mdgru_keras.errors import InputError


def _decode_tf(encoded) -> np.ndarray:
    subject = Subject("s", np.zeros(encoded.shape, np.float32), np.eye(4), np.zeros((1, 3)), ("A",))
    return parse_example(make_example(subject, encoded).SerializeToString())["volume"].numpy()


# ---------------------------------------------------------------------------------------------------------
# storage


@settings(max_examples=20, deadline=None)
@given(low=st.integers(-32768, 32000), span=st.integers(0, 767), seed=st.integers(0, 2**16))
def test_integer_volumes_are_stored_losslessly_as_int16(low, span, seed):
    volume = np.random.default_rng(seed).integers(low, low + span + 1, size=(5, 6, 7)).astype(np.float32)
    encoded = encode_volume(volume)
    assert (encoded.dtype, encoded.scale, encoded.offset) == ("int16", 1.0, 0.0)
    assert len(encoded.data) == volume.size * 2
    np.testing.assert_array_equal(encoded.decode(), volume)
    np.testing.assert_array_equal(_decode_tf(encoded), volume)


def test_smooth_float_volume_is_quantized_within_tolerance(rng):
    volume = (rng.normal(size=(9, 8, 7)) * 80.0 + 300.0).astype(np.float32)  # a resampled scan
    encoded = encode_volume(volume)
    assert encoded.dtype == "int16" and encoded.scale != 1.0
    error = np.abs(encoded.decode() - volume).max()
    assert error <= QUANTIZATION_TOLERANCE * volume.std() * 1.01  # no outliers: robust std ~ std
    np.testing.assert_allclose(_decode_tf(encoded), encoded.decode(), rtol=0, atol=1e-4)


def test_volume_with_outliers_falls_back_to_float16(rng):
    volume = rng.normal(size=(10, 10, 10)).astype(np.float32)
    volume[0, 0, 0] = 1e6  # one extreme voxel: 65536 int16 levels would be ~30 units wide
    encoded = encode_volume(volume)
    assert encoded.dtype == "float16"
    decoded = encoded.decode()
    z = (volume.astype(np.float64) - encoded.offset) / encoded.scale
    # float16 keeps 11 significant bits of every z-value
    assert np.all(np.abs(decoded - volume) <= np.abs(z) * encoded.scale * 2.0**-11 + 1e-3 * encoded.scale)
    np.testing.assert_allclose(_decode_tf(encoded), decoded, rtol=1e-6, atol=1e-2)


def test_constant_and_bad_volumes():
    encoded = encode_volume(np.full((3, 4, 5), 2.5, np.float32))
    np.testing.assert_array_equal(encoded.decode(), 2.5)
    with pytest.raises(ValueError, match="NaN"):
        encode_volume(np.full((2, 2, 2), np.nan))
    with pytest.raises(ValueError, match="3D"):
        encode_volume(np.zeros((2, 2)))


def test_example_round_trip(rng):
    volume = rng.integers(0, 1000, size=(6, 7, 8)).astype(np.float32)
    affine = np.array([[1.5, 0, 0, -10.25], [0, 1.5, 0, 20.5], [0, 0, 2.0, 3.0], [0, 0, 0, 1]])
    landmarks_voxel = np.array([[1.25, 2.5, 3.75], [4.0, 5.5, 0.0]])
    subject = Subject("sub-01", volume, affine, landmarks_voxel, ("AC", "PC"))
    parsed = parse_example(make_example(subject).SerializeToString())
    assert parsed["subject"].numpy() == b"sub-01"
    np.testing.assert_array_equal(parsed["volume"].numpy(), volume)
    np.testing.assert_array_equal(parsed["shape"].numpy(), [6, 7, 8])
    np.testing.assert_allclose(parsed["spacing_mm"].numpy(), [1.5, 1.5, 2.0])
    np.testing.assert_allclose(parsed["voxel_to_world"].numpy(), affine, rtol=1e-7)
    assert parsed["landmark_names"].numpy().tolist() == [b"AC", b"PC"]
    np.testing.assert_allclose(parsed["landmarks_voxel"].numpy(), landmarks_voxel, rtol=1e-7)
    # the raw bytes follow the contract: little-endian C-order [x, y, z]
    raw = make_example(subject).features.feature["volume"].bytes_list.value[0]
    np.testing.assert_array_equal(np.frombuffer(raw, "<i2").reshape(6, 7, 8), volume)


# ---------------------------------------------------------------------------------------------------------
# writing


def test_write_shard_is_atomic(tmp_path):
    path = write_shard(tmp_path / "train-00000-of-00001.tfrecord", [b"one", b"two"])
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(path))] == [b"one", b"two"]

    def failing():
        yield b"three"
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_shard(path, failing())
    # the old shard is untouched and no temp file is left behind
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(path))] == [b"one", b"two"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_write_dataset_layout(tmp_path, rng):
    subjects = {
        f"s{i}": Subject(f"s{i}", rng.integers(0, 50, size=(4, 5, 6)).astype(np.float32), np.eye(4),
                         np.array([[1.0, 2.0, 3.0]]), ("A",))
        for i in range(5)
    }
    description = write_dataset(tmp_path, {"train": ["s0", "s1", "s2"], "val": ["s3", "s4"]}, subjects.__getitem__,
                                ("A",), 1.0, shard_size=2)
    assert description["splits"]["train"]["shards"] == ["train-00000-of-00002.tfrecord",
                                                        "train-00001-of-00002.tfrecord"]
    assert description["splits"]["val"]["shards"] == ["val-00000-of-00001.tfrecord"]
    assert description["counts"] == {"train": 3, "val": 2}
    assert json.loads((tmp_path / "dataset.json").read_text()) == description
    files = [str(tmp_path / name) for name in description["splits"]["train"]["shards"]]
    ids = [parse_example(r)["subject"].numpy().decode() for r in tf.data.TFRecordDataset(files)]
    assert ids == ["s0", "s1", "s2"]


# ---------------------------------------------------------------------------------------------------------
# manifest and splits


def _rows(tmp_path: Path, lines: list[str]):
    for name in ("a.nii.gz", "a.fcsv"):
        (tmp_path / name).write_text("x")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_manifest_errors_are_one_line_and_name_the_file(tmp_path):
    cases = {
        "subject,image\ns1,a.nii.gz": "missing column(s) landmarks",
        "subject,image,landmarks\ns1,a.nii.gz,a.fcsv\ns1,a.nii.gz,a.fcsv": "already listed on line 2",
        "subject,image,landmarks,split\ns1,a.nii.gz,a.fcsv,training": "split 'training'",
        "subject,image,landmarks\ns1,missing.nii.gz,a.fcsv": "no such file",
        "subject,image,landmarks\n": "no subjects",
    }
    for text, message in cases.items():
        manifest = _rows(tmp_path, text.splitlines())
        with pytest.raises(InputError) as info:
            read_manifest(manifest)
        assert message in str(info.value) and "\n" not in str(info.value)
        assert ("missing.nii.gz" if "missing" in text else "manifest.csv") in str(info.value)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), val=st.floats(0, 0.5), test=st.floats(0, 0.5), seed=st.integers(0, 100),
       given_splits=st.lists(st.sampled_from(["", "train", "val", "test"]), min_size=40, max_size=40))
def test_split_by_subject(tmp_path_factory, n, val, test, seed, given_splits):
    tmp_path = tmp_path_factory.mktemp("m")
    manifest = _rows(tmp_path, ["subject,image,landmarks,split"] +
                     [f"s{i},a.nii.gz,a.fcsv,{given_splits[i]}" for i in range(n)])
    rows = read_manifest(manifest)
    splits = assign_splits(rows, val, test, seed)
    everyone = [s for subjects in splits.values() for s in subjects]
    assert sorted(everyone) == sorted(f"s{i}" for i in range(n))  # every subject in exactly one split
    for i in range(n):  # a split given in the manifest is kept
        if given_splits[i]:
            assert f"s{i}" in splits[given_splits[i]]
    free = sum(1 for i in range(n) if not given_splits[i])
    given_test = sum(1 for i in range(n) if given_splits[i] == "test")
    assert len(splits.get("test", [])) == given_test + round(test * free)
    assert splits == assign_splits(rows, val, test, seed)  # seeded


# ---------------------------------------------------------------------------------------------------------
# prepare (needs mdgru_keras.io)


def _write_fcsv(path: Path, landmarks_world_mm: dict[str, tuple[float, float, float]]) -> None:
    """A 3D Slicer markups file in LPS (Slicer's default since 4.11)."""
    lines = ["# Markups fiducial file version = 4.11", "# CoordinateSystem = LPS",
             "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"]
    for i, (name, (r, a, s)) in enumerate(landmarks_world_mm.items()):
        lines.append(f"vtkMRMLMarkupsFiducialNode_{i},{-r},{-a},{s},0,0,0,1,1,1,0,{name},,")
    path.write_text("\n".join(lines) + "\n")


def _tiny_manifest(tmp_path: Path, count: int = 5) -> tuple[Path, dict]:
    nibabel = pytest.importorskip("nibabel")
    rng = np.random.default_rng(7)
    truth = {}
    lines = ["subject,image,landmarks,split"]
    (tmp_path / "scans").mkdir()
    for i in range(count):
        data = rng.integers(0, 200, size=(12, 14, 10)).astype(np.int16)
        affine = np.diag([1.0, 1.0, 1.0, 1.0])
        affine[:3, 3] = [-6.0 + i, -7.0, -5.0]
        nibabel.save(nibabel.Nifti1Image(data, affine), tmp_path / "scans" / f"sub{i}.nii.gz")
        voxel = {"A": np.array([3.0 + 0.5 * i, 4.0, 5.0]), "B": np.array([8.0, 9.25, 2.0])}
        world = {name: tuple(affine[:3, :3] @ v + affine[:3, 3]) for name, v in voxel.items()}
        _write_fcsv(tmp_path / "scans" / f"sub{i}.fcsv", world)
        truth[f"sub{i}"] = (data, voxel)
        lines.append(f"sub{i},scans/sub{i}.nii.gz,scans/sub{i}.fcsv,{'test' if i == 0 else ''}")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, truth


@pytest.fixture
def prepare_dataset():
    pytest.importorskip("mdgru_keras.io.landmarks")
    from mdgru_keras.data.records import prepare_dataset

    return prepare_dataset


def test_prepare_tiny_manifest(tmp_path, prepare_dataset):
    manifest, truth = _tiny_manifest(tmp_path)
    out = tmp_path / "dataset"
    description = prepare_dataset(manifest, out, landmarks=["B", "A"], val_fraction=0.25, test_fraction=0.0,
                                  seed=3, shard_size=2)
    assert description["landmarks"] == ["B", "A"] and description["spacing_mm"] == 1.0
    assert description["splits"]["test"]["subjects"] == ["sub0"]
    assert description["counts"] == {"train": 3, "val": 1, "test": 1}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["dataset.json"] + [s for split in description["splits"].values() for s in split["shards"]])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    files = [str(out / s) for split in description["splits"].values() for s in split["shards"]]
    seen = set()
    for serialized in tf.data.TFRecordDataset(files):
        parsed = parse_example(serialized)
        subject = parsed["subject"].numpy().decode()
        data, voxel = truth[subject]
        seen.add(subject)
        np.testing.assert_array_equal(parsed["volume"].numpy(), data)  # integers: lossless
        np.testing.assert_allclose(parsed["landmarks_voxel"].numpy(), [voxel["B"], voxel["A"]], atol=1e-4)
        assert parsed["landmark_names"].numpy().tolist() == [b"B", b"A"]
    assert seen == set(truth)


def test_prepare_bad_files_leave_nothing(tmp_path, prepare_dataset):
    manifest, _ = _tiny_manifest(tmp_path)
    out = tmp_path / "dataset"
    scans = tmp_path / "scans"

    def expect(message: str, culprit: str, **kwargs) -> None:
        with pytest.raises(InputError) as info:
            prepare_dataset(manifest, out, **kwargs)
        text = str(info.value)
        assert culprit in text and message in text and "\n" not in text, text
        assert not out.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.csv", "scans"]

    expect("missing landmark 'C'", "sub", landmarks=["A", "C"])
    good = (scans / "sub3.fcsv").read_text()
    _write_fcsv(scans / "sub3.fcsv", {"A": (100.0, 0.0, 0.0), "B": (0.0, 0.0, 0.0)})
    expect("outside the image", "sub3.fcsv")
    (scans / "sub3.fcsv").write_text(good)
    (scans / "sub2.nii.gz").write_bytes(b"not a nifti file")
    expect("cannot read NIfTI", "sub2.nii.gz")


def test_prepare_refuses_existing_directory_and_overwrites_on_request(tmp_path, prepare_dataset):
    manifest, _ = _tiny_manifest(tmp_path, count=3)
    out = tmp_path / "dataset"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="already exists"):
        prepare_dataset(manifest, out)
    assert (out / "keep.txt").read_text() == "mine"
    prepare_dataset(manifest, out, overwrite=True)
    assert (out / "dataset.json").is_file() and not (out / "keep.txt").exists()
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask


def test_prepare_command(tmp_path, prepare_dataset):
    from click.testing import CliRunner

    from mdgru_keras.cli import main

    manifest, _ = _tiny_manifest(tmp_path, count=4)
    runner = CliRunner()
    result = runner.invoke(main, ["prepare", str(manifest), "--out", str(tmp_path / "ds"), "--landmarks", "A",
                                  "--val-fraction", "0.34", "--test-fraction", "0", "--seed", "1"])
    assert result.exit_code == 0, result.output
    last = result.stdout.strip().splitlines()[-1]  # the progress bar goes to stderr
    assert last.startswith("Wrote 4 subjects (") and "test 1" in last and "dataset.json" in last
    description = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert description["landmarks"] == ["A"] and description["counts"]["val"] == 1

    # a name the first subject's file lacks: a usage error (exit status 2) before any scan is read
    result = runner.invoke(main, ["prepare", str(manifest), "--out", str(tmp_path / "ds2"), "--landmarks", "A,Z",
                                  "--val-fraction", "0.34", "--test-fraction", "0", "--seed", "1"])
    assert result.exit_code == 2
    error_line = result.stderr.strip().splitlines()[-1]
    assert error_line.startswith("Error: Invalid value for '--landmarks': unknown landmark Z; the first subject's "
                                 f"file {tmp_path / 'scans'}")
    assert not (tmp_path / "ds2").exists()
    result = runner.invoke(main, ["prepare", str(manifest), "--out", str(tmp_path / "ds3"), "--landmarks", "all",
                                  "--val-fraction", "0.34", "--test-fraction", "0", "--seed", "1"])
    assert result.exit_code == 0, result.output
    every = json.loads((tmp_path / "ds3" / "dataset.json").read_text())["landmarks"]
    assert len(every) > 1 and every[0] == "A" and error_line.endswith(f".fcsv knows {len(every)}: {', '.join(every)}")
    assert "manifest" in runner.invoke(main, ["prepare", "--help"]).output.lower()
    assert "warning:" not in result.stderr
    # a scan whose qform lies 3 mm off its sform (the one read): one warning line names it, the dataset is written
    nibabel = pytest.importorskip("nibabel")
    image = nibabel.load(tmp_path / "scans" / "sub1.nii.gz")
    qform = image.affine.copy()
    qform[:3, 3] += [0.0, 3.0, 0.0]
    image.set_qform(qform, code=1)
    nibabel.save(image, tmp_path / "scans" / "sub1.nii.gz")
    result = runner.invoke(main, ["prepare", str(manifest), "--out", str(tmp_path / "ds4"), "--landmarks", "A"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"warning: {tmp_path / 'scans' / 'sub1.nii.gz'}: sform and qform differ by up to 3 mm (codes 2 and 1): ")
