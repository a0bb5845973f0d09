"""Landmark files: Slicer .fcsv and .mrk.json, plain .csv; round trips, coordinate systems, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mdgru_keras.errors import InputError
from mdgru_keras.io import (
    Volume,
    check_landmarks_inside,
    read_landmarks,
    require_landmarks,
    write_landmarks,
)

SUFFIXES = (".fcsv", ".mrk.json", ".csv")

LANDMARKS = {
    "AC": np.array([-0.204861407692308, 2.72288076923077, -4.88105282051282]),
    "PC": np.array([0.1, -25.0450538461538, -2.21068230769231]),
    "R superior LMS, lateral": np.array([13.3113025641026, -25.951058974359, -9.74885435897436]),
    'Tür "quoted"': np.array([1e-7, -123456.75, 0.0]),
    "4": np.array([-0.0892198512820513, -23.1885743589744, -21.5288358974359]),
}


def assert_same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].shape == (3,) and got[name].dtype == np.float64
        np.testing.assert_array_equal(got[name], expected[name])


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_round_trip_is_exact_and_keeps_order(tmp_path: Path, suffix: str) -> None:
    path = write_landmarks(tmp_path / f"points{suffix}", LANDMARKS)
    assert_same(read_landmarks(path), LANDMARKS)
    assert [p.name for p in tmp_path.iterdir()] == [f"points{suffix}"]  # no temporary left behind


@pytest.mark.parametrize("fmt", ["fcsv", "mrk.json", "csv"])
def test_explicit_format_overrides_the_suffix(tmp_path: Path, fmt: str) -> None:
    path = write_landmarks(tmp_path / "points.txt", LANDMARKS, fmt=fmt)
    renamed = path.rename(tmp_path / f"points.{fmt}")
    assert_same(read_landmarks(renamed), LANDMARKS)


names = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=12).filter(
    lambda s: s == s.strip()
)
coordinates = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.dictionaries(names, st.tuples(coordinates, coordinates, coordinates), min_size=1, max_size=6),
    st.sampled_from(SUFFIXES),
)
def test_round_trip_property(tmp_path: Path, points: dict[str, tuple[float, float, float]], suffix: str) -> None:
    landmarks = {name: np.array(xyz, dtype=np.float64) for name, xyz in points.items()}
    path = write_landmarks(tmp_path / f"property{suffix}", landmarks)
    assert_same(read_landmarks(path), landmarks)


def test_fcsv_header_is_the_slicer_standard(tmp_path: Path) -> None:
    lines = write_landmarks(tmp_path / "p.fcsv", {"A": np.array([1.0, 2.0, 3.0])}).read_text().splitlines()
    assert lines[:3] == [
        "# Markups fiducial file version = 4.11",
        "# CoordinateSystem = RAS",
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID",
    ]
    assert lines[3].split(",") == ["1", "1.0", "2.0", "3.0", "0", "0", "0", "1", "1", "1", "0", "A", "", ""]


def test_markups_json_has_schema_and_ras(tmp_path: Path) -> None:
    document = json.loads(write_landmarks(tmp_path / "p.mrk.json", LANDMARKS).read_text())
    assert document["@schema"].endswith("markups-schema-v1.0.3.json#")
    (markup,) = document["markups"]
    assert markup["type"] == "Fiducial" and markup["coordinateSystem"] == "RAS"
    assert [p["label"] for p in markup["controlPoints"]] == list(LANDMARKS)


@pytest.mark.parametrize("system", ["LPS", "1"])
def test_fcsv_in_lps_is_converted_to_ras(tmp_path: Path, system: str) -> None:
    path = tmp_path / "lps.fcsv"
    path.write_text(
        "# Markups fiducial file version = 4.10\n"
        f"# CoordinateSystem = {system}\n"
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
        "vtkMRMLMarkupsFiducialNode_0,10.5,-20,30,0,0,0,1,1,1,0,F-1,,\n"
        "vtkMRMLMarkupsFiducialNode_1,-1,2,-3,0,0,0,1,1,1,0,F-2,a note,vtkMRMLScalarVolumeNode1\n"
    )
    assert_same(read_landmarks(path), {"F-1": np.array([-10.5, 20.0, 30.0]), "F-2": np.array([1.0, -2.0, -3.0])})


def test_old_numeric_ras_fcsv_as_in_the_afids_templates(tmp_path: Path) -> None:
    path = tmp_path / "afids.fcsv"
    path.write_text(
        "# Markups fiducial file version = 4.6\n"
        "# CoordinateSystem = 0\n"
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
        "vtkMRMLMarkupsFiducialNode_1,-0.2048,2.7228,-4.8810,0,0,0,1,1,1,0,1,AC,vtkMRMLScalarVolumeNode1\n"
        "vtkMRMLMarkupsFiducialNode_2,-0.0072,-25.0450,-2.2106,0,0,0,1,1,1,0,2,PC,vtkMRMLScalarVolumeNode1\n"
    )
    assert_same(
        read_landmarks(path), {"1": np.array([-0.2048, 2.7228, -4.8810]), "2": np.array([-0.0072, -25.0450, -2.2106])}
    )


def test_fcsv_follows_its_columns_header(tmp_path: Path) -> None:
    path = tmp_path / "reordered.fcsv"
    path.write_text("# columns = label,z,y,x\nA,3,2,1\n\nB,6,5,4\n")  # no coordinate system line: RAS
    assert_same(read_landmarks(path), {"A": np.array([1.0, 2.0, 3.0]), "B": np.array([4.0, 5.0, 6.0])})


def test_markups_json_lps_default_and_skipped_points(tmp_path: Path) -> None:
    path = tmp_path / "slicer.mrk.json"
    # the example from Slicer's documentation: no coordinateSystem -> LPS (the schema's default) ...
    document = {
        "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
        "Schema/markups-schema-v1.0.0.json#",
        "markups": [
            {
                "type": "Fiducial",
                "controlPoints": [
                    {"label": "F-1", "position": [-53.38, -73.33, 0.0]},
                    {"label": "F-2", "position": [49.86, -88.58, 1.5]},
                    {"label": "F-3", "positionStatus": "missing"},
                ],
            }
        ],
    }
    path.write_text(json.dumps(document))
    assert_same(read_landmarks(path), {"F-1": np.array([53.38, 73.33, 0.0]), "F-2": np.array([-49.86, 88.58, 1.5])})
    # ... and with an explicit RAS
    document["markups"][0]["coordinateSystem"] = "RAS"
    path.write_text(json.dumps(document))
    assert_same(read_landmarks(path), {"F-1": np.array([-53.38, -73.33, 0.0]), "F-2": np.array([49.86, -88.58, 1.5])})


def test_csv_headers_in_ras_and_lps(tmp_path: Path) -> None:
    (tmp_path / "ras.csv").write_text("Name, X, Y, Z\nA,1,2,3\n")
    assert_same(read_landmarks(tmp_path / "ras.csv"), {"A": np.array([1.0, 2.0, 3.0])})
    (tmp_path / "slicer.csv").write_text(
        "label,l,p,s,defined,selected,visible,locked,description\nA,1,2,3,1,1,1,0,\nB,-4,5,6,1,1,1,0,x\n"
    )
    assert_same(
        read_landmarks(tmp_path / "slicer.csv"), {"A": np.array([-1.0, -2.0, 3.0]), "B": np.array([4.0, -5.0, 6.0])}
    )


# ---------------------------------------------------------------------------------------------------------
# bad input


BAD_FILES = {
    "duplicate.fcsv": ("# CoordinateSystem = RAS\n1,1,2,3,0,0,0,1,1,1,0,A,,\n2,4,5,6,0,0,0,1,1,1,0,A,,\n", "duplicate"),
    "short.fcsv": ("# CoordinateSystem = RAS\n1,1,2,3,0,0,0\n", "line 2: malformed row"),
    "words.fcsv": ("1,one,2,3,0,0,0,1,1,1,0,A,,\n", "line 1: coordinates are not numbers"),
    "nan.fcsv": ("1,nan,2,3,0,0,0,1,1,1,0,A,,\n", "non-finite"),
    "unnamed.fcsv": ("1,1,2,3,0,0,0,1,1,1,0,,,\n", "without a name"),
    "ijk.fcsv": ("# CoordinateSystem = 2\n1,1,2,3,0,0,0,1,1,1,0,A,,\n", "unsupported coordinate system"),
    "empty.fcsv": ("# Markups fiducial file version = 4.11\n", "no landmarks"),
    "nocolumns.fcsv": ("# columns = id,x,y\n1,1,2\n", "lacks z, label"),
    "mixed.mrk.json": (
        json.dumps(
            {
                "markups": [
                    {"coordinateSystem": "RAS", "controlPoints": [{"label": "A", "position": [1, 2, 3]}]},
                    {"coordinateSystem": "LPS", "controlPoints": [{"label": "B", "position": [1, 2, 3]}]},
                ]
            }
        ),
        "mixed coordinate systems (LPS, RAS)",
    ),
    "broken.mrk.json": ('{"markups": [', "not valid JSON"),
    "other.json": ('{"points": []}', "not a Slicer markups file"),
    "twod.mrk.json": (json.dumps({"markups": [{"controlPoints": [{"label": "A", "position": [1, 2]}]}]}), "3 coord"),
    "noposition.mrk.json": (json.dumps({"markups": [{"controlPoints": [{"label": "A"}]}]}), "no position"),
    "dup.mrk.json": (
        json.dumps({"markups": [{"controlPoints": [{"label": "A", "position": [1, 2, 3]}] * 2}]}),
        "duplicate landmark name 'A'",
    ),
    "header.csv": ("a,b,c\n1,2,3\n", "header must name the columns name,x,y,z"),
    "row.csv": ("name,x,y,z\nA,1,2\n", "line 2: malformed row"),
    "dup.csv": ("name,x,y,z\nA,1,2,3\nA,1,2,3\n", "line 3: duplicate"),
    "blank.csv": ("\n\n", "empty file"),
    "points.txt": ("A,1,2,3\n", "unknown landmark file type"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_landmark_files_give_one_line_input_errors(tmp_path: Path, name: str) -> None:
    text, fragment = BAD_FILES[name]
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InputError) as info:
        read_landmarks(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and fragment in message and "\n" not in message, message


def test_missing_and_undecodable_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        read_landmarks(tmp_path / "absent.fcsv")
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(InputError, match="cannot read landmark file"):
        read_landmarks(tmp_path / "binary.csv")


def test_write_refuses_bad_points(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 finite coordinates"):
        write_landmarks(tmp_path / "p.fcsv", {"A": np.array([1.0, np.nan, 2.0])})
    with pytest.raises(ValueError, match="3 finite coordinates"):
        write_landmarks(tmp_path / "p.fcsv", {"A": np.array([1.0, 2.0])})
    with pytest.raises(ValueError, match="empty or has surrounding"):
        write_landmarks(tmp_path / "p.csv", {" A": np.array([1.0, 2.0, 3.0])})
    assert not list(tmp_path.iterdir())


def test_require_landmarks_orders_and_names_missing(tmp_path: Path) -> None:
    got = require_landmarks(LANDMARKS, ["PC", "AC"], tmp_path / "l.fcsv")
    assert list(got) == ["PC", "AC"]
    with pytest.raises(InputError) as info:
        require_landmarks(LANDMARKS, ["AC", "RP", "LP"], tmp_path / "l.fcsv")
    assert str(info.value) == (
        f"{tmp_path / 'l.fcsv'}: missing landmarks 'RP', 'LP' "
        f"(the file has 5: AC, PC, R superior LMS, lateral, Tür \"quoted\", 4)"
    )
    with pytest.raises(InputError) as info:  # names are case-sensitive
        require_landmarks(LANDMARKS, ["ac"], None)
    assert str(info.value) == (
        "missing landmark 'ac' (the file has 5: AC, PC, R superior LMS, lateral, Tür \"quoted\", 4)"
    )
    with pytest.raises(InputError) as info:
        require_landmarks({}, ["AC"], "empty.csv")
    assert str(info.value) == "empty.csv: missing landmark 'AC' (the file has none)"


def test_check_landmarks_inside(tmp_path: Path) -> None:
    affine = np.diag([2.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-10.0, -5.0, 0.0]
    volume = Volume(
        data=np.zeros((10, 10, 10), np.float32),
        voxel_to_world=affine,
        path="scan.nii.gz",
        file_shape=(10, 10, 10),
        file_voxel_to_world=affine,
        array_to_file_voxel=np.eye(4),
    )
    # voxel faces: x in [-11, 9) mm, y in [-5.5, 4.5], z in [-0.5, 9.5]
    check_landmarks_inside(volume, {"corner": np.array([-10.9, -5.4, 9.4]), "centre": np.array([0.0, 0.0, 4.0])})
    with pytest.raises(InputError) as info:
        check_landmarks_inside(volume, {"ok": np.array([0.0, 0.0, 4.0]), "out": np.array([9.5, 0.0, 4.0])}, "l.csv")
    assert str(info.value).startswith("l.csv: landmark 'out' at (9.5, 0.0, 4.0) mm lies outside the image scan.nii.gz")


def test_written_files_get_the_usual_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        path = write_landmarks(tmp_path / "p.fcsv", LANDMARKS)
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0o600


def test_reading_landmarks_does_not_import_tensorflow() -> None:
    code = "import sys; from mdgru_keras.io import read_landmarks; print('tensorflow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
