"""Landmark files: 3D Slicer ``.fcsv`` and ``.mrk.json``, and plain ``.csv``.

Every reader returns ``{name: world_mm}`` with ``world_mm`` a float64 array ``(3,)`` in RAS millimetres, in
file order; LPS files are converted (x and y negated). Writers always write RAS, atomically.

Formats
-------
* ``.fcsv`` (Slicer Markups fiducial CSV): ``#`` header lines, among them ``# CoordinateSystem = RAS`` (or
  ``LPS``, or the pre-4.11 numeric ``0`` = RAS, ``1`` = LPS; absent means RAS) and ``# columns = id,x,y,z,...``;
  the name is the ``label`` column.
* ``.mrk.json`` / ``.json`` (Slicer Markups JSON): ``markups[].controlPoints[].{label, position}`` with
  ``markups[].coordinateSystem`` ``RAS`` or ``LPS`` (the schema's default, LPS, when absent). Points whose
  ``positionStatus`` is ``missing`` or ``undefined`` are skipped.
* ``.csv``: a header line naming the columns ``name,x,y,z`` (RAS mm); also ``label,r,a,s`` and Slicer's
  control-point table ``label,l,p,s,...`` (LPS).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mdgru_keras.errors import InputError
from mdgru_keras.io.atomic import write_text_atomic

if TYPE_CHECKING:
    from mdgru_keras.io.nifti import Volume

FCSV_VERSION = "4.11"
FCSV_COLUMNS = ("id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label", "desc", "associatedNodeID")
MARKUPS_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)
FORMATS = ("fcsv", "mrk.json", "csv")
_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])

Landmarks = dict[str, np.ndarray]


def landmark_format(path: str | Path) -> str:
    """``fcsv``, ``mrk.json`` or ``csv`` from a file name (``.json`` counts as markups JSON)."""
    name = str(path).lower()
    if name.endswith(".fcsv"):
        return "fcsv"
    if name.endswith(".json"):
        return "mrk.json"
    if name.endswith(".csv"):
        return "csv"
    raise InputError(path, "unknown landmark file type; expected .fcsv, .mrk.json or .csv")


# ---------------------------------------------------------------------------------------------------------
# reading


def read_landmarks(path: str | Path) -> Landmarks:
    """Read a landmark file into ``{name: world_mm (3,) RAS}`` in file order.

    Raises :class:`~mdgru_keras.errors.InputError` for unreadable files, malformed rows, non-finite or
    duplicate names/coordinates, unknown or mixed coordinate systems, and files without any landmark.
    """
    path = Path(path)
    fmt = landmark_format(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(path, f"cannot read landmark file ({error.__class__.__name__}: {error})") from None
    reader = {"fcsv": _parse_fcsv, "mrk.json": _parse_markups_json, "csv": _parse_csv}[fmt]
    points = reader(path, text)
    landmarks: Landmarks = {}
    for name, world_mm, where in points:
        if not name:
            raise InputError(path, f"{where}: landmark without a name")
        if name in landmarks:
            raise InputError(path, f"{where}: duplicate landmark name {name!r}")
        if not np.all(np.isfinite(world_mm)):
            raise InputError(path, f"{where}: non-finite coordinates for landmark {name!r}")
        landmarks[name] = world_mm
    if not landmarks:
        raise InputError(path, "no landmarks in file")
    return landmarks


def _coordinates(path: Path, where: str, values: Iterable[object]) -> np.ndarray:
    try:
        world_mm = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(path, f"{where}: coordinates are not numbers: {list(values)!r}") from None
    if world_mm.shape != (3,):
        raise InputError(path, f"{where}: expected 3 coordinates, got {world_mm.size}")
    return world_mm


def _coordinate_system(path: Path, where: str, value: object) -> str:
    text = str(value).strip().upper()
    system = {"RAS": "RAS", "0": "RAS", "LPS": "LPS", "1": "LPS"}.get(text)
    if system is None:
        raise InputError(path, f"{where}: unsupported coordinate system {value!r}; expected RAS or LPS")
    return system


def _parse_fcsv(path: Path, text: str) -> list[tuple[str, np.ndarray, str]]:
    system = "RAS"
    columns = list(FCSV_COLUMNS)
    points = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            key = key.strip().lower()
            if key == "coordinatesystem":
                system = _coordinate_system(path, f"line {line_number}", value)
            elif key == "columns":
                columns = [c.strip() for c in value.split(",")]
            continue
        where = f"line {line_number}"
        missing = [c for c in ("x", "y", "z", "label") if c not in columns]
        if missing:
            raise InputError(path, f"{where}: the columns header lacks {', '.join(missing)}")
        row = next(csv.reader([line]))
        needed = max(columns.index(c) for c in ("x", "y", "z", "label")) + 1
        if len(row) < needed:
            raise InputError(path, f"{where}: malformed row, {len(row)} fields where at least {needed} are needed")
        world_mm = _coordinates(path, where, [row[columns.index(c)] for c in ("x", "y", "z")])
        if system == "LPS":
            world_mm = world_mm * _LPS_TO_RAS
        points.append((row[columns.index("label")].strip(), world_mm, where))
    return points


def _parse_markups_json(path: Path, text: str) -> list[tuple[str, np.ndarray, str]]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(path, f"not valid JSON (line {error.lineno}: {error.msg})") from None
    markups = document.get("markups") if isinstance(document, dict) else None
    if not isinstance(markups, list):
        raise InputError(path, "not a Slicer markups file (no 'markups' list)")
    systems = set()
    points = []
    for markup_index, markup in enumerate(markups):
        if not isinstance(markup, dict):
            raise InputError(path, f"markups[{markup_index}] is not an object")
        system = _coordinate_system(path, f"markups[{markup_index}]", markup.get("coordinateSystem", "LPS"))
        control_points = markup.get("controlPoints", [])
        if not isinstance(control_points, list):
            raise InputError(path, f"markups[{markup_index}].controlPoints is not a list")
        if control_points:
            systems.add(system)
        for point_index, point in enumerate(control_points):
            where = f"markups[{markup_index}].controlPoints[{point_index}]"
            if not isinstance(point, dict):
                raise InputError(path, f"{where} is not an object")
            if str(point.get("positionStatus", "defined")).lower() in ("missing", "undefined"):
                continue
            if "position" not in point:
                raise InputError(path, f"{where}: no position")
            position = point["position"]
            if not isinstance(position, list):
                raise InputError(path, f"{where}: position is not a list of 3 numbers")
            world_mm = _coordinates(path, where, position)
            if system == "LPS":
                world_mm = world_mm * _LPS_TO_RAS
            points.append((str(point.get("label", "")).strip(), world_mm, where))
    if len(systems) > 1:
        raise InputError(path, f"mixed coordinate systems ({', '.join(sorted(systems))}) in one file")
    return points


# header spellings accepted for the csv format: name column, then (x, y, z) columns and their system
_CSV_COLUMN_SETS = (
    (("name", "label", "id"), ("x", "y", "z"), "RAS"),
    (("name", "label", "id"), ("r", "a", "s"), "RAS"),
    (("name", "label", "id"), ("l", "p", "s"), "LPS"),
)


def _csv_layout(header: list[str]) -> tuple[int, list[int], str] | None:
    """(name column, x/y/z columns, coordinate system) of a csv header, or None."""
    for names, axes, system in _CSV_COLUMN_SETS:
        name_column = next((header.index(n) for n in names if n in header), None)
        if name_column is not None and all(a in header for a in axes):
            return name_column, [header.index(a) for a in axes], system
    return None


def _parse_csv(path: Path, text: str) -> list[tuple[str, np.ndarray, str]]:
    rows = [(n, row) for n, row in enumerate(csv.reader(io.StringIO(text)), start=1) if any(c.strip() for c in row)]
    if not rows:
        raise InputError(path, "empty file")
    header_line, header = rows[0]
    header = [c.strip().lower() for c in header]
    layout = _csv_layout(header)
    if layout is None:
        raise InputError(path, f"line {header_line}: header must name the columns name,x,y,z; got {','.join(header)}")
    name_column, axis_columns, system = layout
    points = []
    needed = max([name_column, *axis_columns]) + 1
    for line_number, row in rows[1:]:
        where = f"line {line_number}"
        if len(row) < needed:
            raise InputError(path, f"{where}: malformed row, {len(row)} fields where {needed} are needed")
        world_mm = _coordinates(path, where, [row[c] for c in axis_columns])
        if system == "LPS":
            world_mm = world_mm * _LPS_TO_RAS
        points.append((row[name_column].strip(), world_mm, where))
    return points


# ---------------------------------------------------------------------------------------------------------
# checks


def require_landmarks(landmarks: Mapping[str, np.ndarray], names: Iterable[str], path: str | Path | None) -> Landmarks:
    """The landmarks ``names`` in that order; an InputError naming ``path`` lists any that are missing, and the
    names the file has (case-sensitive)."""
    names = list(names)
    missing = [name for name in names if name not in landmarks]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        has = f"the file has {len(landmarks)}: {', '.join(landmarks)}" if landmarks else "the file has none"
        raise InputError(path, f"missing landmark{'s' if len(missing) > 1 else ''} {shown} ({has})")
    return {name: np.asarray(landmarks[name], dtype=np.float64) for name in names}


def check_landmarks_inside(volume: Volume, landmarks: Mapping[str, np.ndarray], path: str | Path | None = None) -> None:
    """InputError (naming ``path``, the landmark file) if a landmark lies outside the volume's voxel grid.

    Inside means within the grid's outer voxel faces: continuous voxel coordinates in ``[-0.5, n - 0.5]``.
    """
    from mdgru_keras.geometry import affine_maps  # here, so that reading landmark files does not import TensorFlow

    for name, world_mm in landmarks.items():
        voxel = affine_maps.world_to_voxel(np.asarray(world_mm, dtype=np.float64), volume.voxel_to_world)
        shape = np.asarray(volume.shape, dtype=np.float64)
        if np.any(voxel < -0.5) or np.any(voxel > shape - 0.5):
            world_text = ", ".join(f"{v:.1f}" for v in np.asarray(world_mm, dtype=np.float64))
            raise InputError(
                path,
                f"landmark {name!r} at ({world_text}) mm lies outside the image {Path(volume.path).name} "
                f"(voxel {np.round(voxel, 1).tolist()}, shape {'x'.join(map(str, volume.shape))})",
            )


# ---------------------------------------------------------------------------------------------------------
# writing


def _number(value: float) -> str:
    """Shortest text that reads back to the same float64."""
    return repr(float(value))


def _fcsv_text(landmarks: Mapping[str, np.ndarray], descriptions: Mapping[str, str]) -> str:
    out = io.StringIO()
    out.write(f"# Markups fiducial file version = {FCSV_VERSION}\n")
    out.write("# CoordinateSystem = RAS\n")
    out.write(f"# columns = {','.join(FCSV_COLUMNS)}\n")
    writer = csv.writer(out, lineterminator="\n")
    for index, (name, world_mm) in enumerate(landmarks.items(), start=1):
        x, y, z = (_number(v) for v in world_mm)
        writer.writerow([str(index), x, y, z, 0, 0, 0, 1, 1, 1, 0, name, descriptions.get(name, ""), ""])
    return out.getvalue()


def _markups_json_text(landmarks: Mapping[str, np.ndarray], descriptions: Mapping[str, str]) -> str:
    control_points = [
        {
            "id": str(index),
            "label": name,
            "description": descriptions.get(name, ""),
            "associatedNodeID": "",
            "position": [float(v) for v in world_mm],
            "orientation": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
            "selected": True,
            "locked": False,
            "visibility": True,
            "positionStatus": "defined",
        }
        for index, (name, world_mm) in enumerate(landmarks.items(), start=1)
    ]
    document = {
        "@schema": MARKUPS_SCHEMA,
        "markups": [
            {
                "type": "Fiducial",
                "coordinateSystem": "RAS",
                "coordinateUnits": "mm",
                "locked": False,
                "fixedNumberOfControlPoints": False,
                "labelFormat": "%N-%d",
                "lastUsedControlPointNumber": len(control_points),
                "controlPoints": control_points,
                "measurements": [],
            }
        ],
    }
    return json.dumps(document, indent=4) + "\n"


def _csv_text(landmarks: Mapping[str, np.ndarray], descriptions: Mapping[str, str]) -> str:
    del descriptions  # name,x,y,z has no column for them
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["name", "x", "y", "z"])
    for name, world_mm in landmarks.items():
        writer.writerow([name, *(_number(v) for v in world_mm)])
    return out.getvalue()


def write_landmarks(
    path: str | Path,
    landmarks_world_mm: Mapping[str, np.ndarray],
    fmt: str | None = None,
    descriptions: Mapping[str, str] | None = None,
) -> Path:
    """Write ``{name: world_mm (3,) RAS}`` as ``fmt`` (``fcsv``, ``mrk.json``, ``csv``; default: from the
    suffix), in RAS, atomically. Slicer 4.11+ and 5 open the ``.fcsv`` and ``.mrk.json`` files as point lists.
    ``descriptions`` (``{name: text}``, one line each) fill the points' description (``.fcsv``: column
    ``desc``, where commas are replaced by semicolons so that Slicer's reader keeps the columns; ``.mrk.json``:
    ``description``); ``csv`` has no such column.
    """
    fmt = landmark_format(path) if fmt is None else fmt
    if fmt not in FORMATS:
        raise ValueError(f"unknown landmark format {fmt!r}; expected one of {', '.join(FORMATS)}")
    cleaned = {}
    for name, text in (descriptions or {}).items():
        if "\n" in str(text):
            raise ValueError(f"description of {name!r} must be one line")
        cleaned[str(name)] = str(text).replace(",", ";") if fmt != "mrk.json" else str(text)
    checked: Landmarks = {}
    for name, world_mm in landmarks_world_mm.items():
        world_mm = np.asarray(world_mm, dtype=np.float64).reshape(-1)
        if world_mm.shape != (3,) or not all(math.isfinite(v) for v in world_mm):
            raise ValueError(f"landmark {name!r}: expected 3 finite coordinates, got {world_mm.tolist()}")
        if not str(name) or str(name) != str(name).strip() or "\n" in str(name):
            raise ValueError(f"landmark name {name!r} is empty or has surrounding white space")
        checked[str(name)] = world_mm
    text = {"fcsv": _fcsv_text, "mrk.json": _markups_json_text, "csv": _csv_text}[fmt](checked, cleaned)
    return write_text_atomic(path, text)
