"""Evaluation: errors in mm and voxels, Table-1a rows, Markdown/JSON reports, best and worst cases."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mdgru_keras.errors import InputError
from mdgru_keras.evaluation import (
    ErrorTable,
    GroundTruth,
    Prediction,
    best_and_worst,
    compute_errors,
    evaluate,
    method_name,
    read_json,
)
from mdgru_keras.geometry import affine_maps

# An anisotropic scan: 1 mm along x, 2 mm along y, 2.5 mm along z.
ANISOTROPIC = np.diag([1.0, 2.0, 2.5, 1.0])
ANISOTROPIC[:3, 3] = [-90.0, -120.0, -70.0]

TRUE = {
    "s1": {"AC": np.array([0.0, 2.0, -4.0]), "PC": np.array([0.5, -25.0, -2.0])},
    "s2": {"AC": np.array([1.0, 3.0, -5.0]), "PC": np.array([1.5, -24.0, -1.0])},
    "s3": {"AC": np.array([-1.0, 1.0, -3.0]), "PC": np.array([0.0, -26.0, -3.0])},
}
# Shifts (mm) of the prediction per subject: 3, 4, 5 mm along x, y, z, i.e. 3, 2, 2 voxels.
SHIFTS_MM = {"s1": np.array([3.0, 0.0, 0.0]), "s2": np.array([0.0, 4.0, 0.0]), "s3": np.array([0.0, 0.0, 5.0])}


def truths(affine: np.ndarray | None = ANISOTROPIC) -> list[GroundTruth]:
    return [GroundTruth(subject, points, affine) for subject, points in TRUE.items()]


def shifted(method: str, shifts: dict[str, np.ndarray], landmarks: tuple[str, ...] = ("AC", "PC")) -> list[Prediction]:
    return [
        Prediction(subject, method, {name: TRUE[subject][name] + shift for name in landmarks})
        for subject, shift in shifts.items()
    ]


def test_known_shifts_give_exact_statistics_in_mm_and_voxels() -> None:
    table = evaluate(shifted("coarse", SHIFTS_MM), truths(), stream=None)
    overall = table.rows["coarse"].overall
    mm = np.array([3.0, 4.0, 5.0])
    voxel = np.array([3.0, 2.0, 2.0])  # 3 mm / 1 mm, 4 mm / 2 mm, 5 mm / 2.5 mm
    assert overall.count == 6  # 3 subjects x 2 landmarks
    assert overall.median_mm == pytest.approx(4.0)
    assert overall.mean_mm == pytest.approx(4.0)
    assert overall.std_mm == pytest.approx(math.sqrt(2.0 / 3.0))  # population std of 3, 4, 5 (each twice)
    assert overall.max_mm == pytest.approx(5.0)
    assert overall.median_voxel == pytest.approx(2.0)
    assert overall.mean_voxel == pytest.approx(voxel.mean())
    assert overall.std_voxel == pytest.approx(voxel.std())
    assert overall.max_voxel == pytest.approx(3.0)
    for name in ("AC", "PC"):
        stats = table.rows["coarse"].per_landmark[name]
        assert stats.count == 3
        assert (stats.median_mm, stats.mean_mm, stats.max_mm) == pytest.approx((4.0, mm.mean(), 5.0))
        assert (stats.median_voxel, stats.max_voxel) == pytest.approx((2.0, 3.0))


def test_a_3_4_5_shift_is_5_mm() -> None:
    errors = compute_errors(shifted("unet", {"s1": np.array([3.0, 4.0, 0.0])}), truths())
    assert [e.error_mm for e in errors] == pytest.approx([5.0, 5.0])
    assert [e.error_voxel for e in errors] == pytest.approx([math.hypot(3.0, 2.0)] * 2)


@settings(max_examples=40, deadline=None)
@given(
    spacing=st.lists(st.floats(0.3, 4.0), min_size=3, max_size=3),
    angles=st.lists(st.floats(-math.pi, math.pi), min_size=3, max_size=3),
    shift=st.lists(st.floats(-20.0, 20.0), min_size=3, max_size=3),
)
def test_voxel_error_is_the_distance_in_the_scans_voxel_coordinates(spacing, angles, shift) -> None:
    # A rotated anisotropic affine: the voxel error is |A^-1 d|, the mm error |d|.
    rotation = affine_maps.rotation_matrix(angles)
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = [5.0, -3.0, 12.0]
    true_mm = np.array([10.0, 20.0, -30.0])
    truth = GroundTruth("s", {"L": true_mm}, affine)
    (error,) = compute_errors([Prediction("s", "coarse", {"L": true_mm + np.array(shift)})], [truth])
    assert error.error_mm == pytest.approx(np.linalg.norm(shift), abs=1e-9)
    voxel_difference = affine_maps.world_to_voxel(true_mm + np.array(shift), affine) - affine_maps.world_to_voxel(
        true_mm, affine
    )
    assert error.error_voxel == pytest.approx(np.linalg.norm(voxel_difference), abs=1e-9)
    assert error.error_voxel == pytest.approx(np.linalg.norm(np.linalg.solve(affine[:3, :3], shift)), abs=1e-9)


def test_prediction_from_voxel_coordinates() -> None:
    true_voxel = affine_maps.world_to_voxel(TRUE["s1"]["AC"], ANISOTROPIC)
    predicted_voxel = true_voxel + np.array([0.0, 0.0, 2.0])  # two voxels along z = 5 mm
    prediction = Prediction.from_voxel("s1", "coarse", {"AC": predicted_voxel}, ANISOTROPIC)
    np.testing.assert_allclose(prediction.landmarks_world_mm["AC"], TRUE["s1"]["AC"] + [0.0, 0.0, 5.0])
    # The ground truth has no affine here: the prediction's affine defines the voxel units.
    (error,) = compute_errors([prediction], truths(affine=None))
    assert error.error_mm == pytest.approx(5.0)
    assert error.error_voxel == pytest.approx(2.0)


def test_rows_only_for_given_methods_in_table_order() -> None:
    predictions = (
        shifted("unet", SHIFTS_MM)
        + shifted(method_name("fine", 4, parabola=True), SHIFTS_MM)
        + shifted("coarse", SHIFTS_MM)
        + shifted(method_name("fine", 1, parabola=False), SHIFTS_MM)
        + shifted("registration", SHIFTS_MM)
    )
    table = evaluate(predictions, truths(), stream=None)
    assert list(table.rows) == [
        "coarse",
        "fine n=1 (argmax)",
        "fine n=4 + parabola",
        "registration",
        "unet",
    ]
    assert "fine n=1 + parabola" not in table.rows
    assert "fine n=4 (argmax)" not in table.rows
    markdown = table.to_markdown()
    assert "n=4 (argmax)" not in markdown and "n=1 + parabola" not in markdown
    assert set(table.to_dict()["rows"]) == set(table.rows)


def test_missing_landmarks_are_not_counted() -> None:
    predictions = shifted("coarse", SHIFTS_MM) + shifted("registration", {"s1": SHIFTS_MM["s1"]}, landmarks=("PC",))
    table = evaluate(predictions, truths(), stream=None)
    row = table.rows["registration"]
    assert row.subjects == 1 and row.overall.count == 1
    assert list(row.per_landmark) == ["PC"]
    assert row.overall.median_mm == pytest.approx(3.0) and row.overall.std_mm == 0.0
    # In the per-landmark table the registration's AC cell is empty, not zero.
    ac_line = next(line for line in table.to_markdown().splitlines() if line.startswith("| AC |"))
    assert ac_line.endswith("| – |")


def test_markdown_shows_the_numbers() -> None:
    stream = io.StringIO()
    evaluate(shifted("coarse", SHIFTS_MM), truths(), stream=stream)
    markdown = stream.getvalue()
    lines = markdown.splitlines()
    assert lines[0].startswith("| method | subjects | errors | median mm | mean ± std mm | max mm | median vox")
    coarse = next(line for line in lines if line.startswith("| coarse |"))
    cells = [cell.strip() for cell in coarse.strip("|").split("|")]
    expected_voxel = np.array([3.0, 2.0, 2.0])
    assert cells == [
        "coarse",
        "3",
        "6",
        "4.00",
        f"4.00 ± {math.sqrt(2 / 3):.2f}",
        "5.00",
        "2.00",
        f"{expected_voxel.mean():.2f} ± {expected_voxel.std():.2f}",
        "3.00",
    ]
    assert "Per landmark, error in mm" in markdown and "Per landmark, error in voxel" in markdown
    assert any(line.startswith("| PC | 4.00 / 4.00 ± ") for line in lines)


def test_without_affines_voxel_columns_are_empty() -> None:
    table = evaluate(shifted("coarse", SHIFTS_MM), truths(affine=None), stream=None)
    assert table.rows["coarse"].overall.median_voxel is None
    markdown = table.to_markdown()
    assert "Per landmark, error in voxel" not in markdown
    coarse = next(line for line in markdown.splitlines() if line.startswith("| coarse |"))
    assert coarse.endswith("| – | – | – |")


def test_json_report_round_trip(tmp_path) -> None:
    path = tmp_path / "report" / "evaluation.json"
    predictions = shifted("coarse", SHIFTS_MM) + shifted("unet", {"s2": SHIFTS_MM["s2"]})
    table = evaluate(predictions, truths(), json_path=path, stream=None)
    assert sorted(p.name for p in path.parent.iterdir()) == ["evaluation.json"]  # no temporary left behind
    data = json.loads(path.read_text())
    assert data["format"] == "mdgru-keras evaluation v1"
    assert data["landmarks"] == ["AC", "PC"]
    assert data["methods"] == ["coarse", "unet"]
    assert data["rows"]["coarse"]["overall"]["median_mm"] == pytest.approx(4.0)
    assert data["rows"]["unet"]["per_landmark"]["AC"]["count"] == 1
    assert len(data["errors"]) == 6 + 2
    assert {e["subject"] for e in data["errors"] if e["method"] == "unet"} == {"s2"}
    again = read_json(path)
    assert again.rows == table.rows and again.landmarks == table.landmarks


def test_bad_json_names_the_file(tmp_path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"format": "something else"}')
    with pytest.raises(InputError, match="broken.json"):
        read_json(path)


def test_inconsistent_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="no ground truth"):
        compute_errors([Prediction("s9", "coarse", {"AC": np.zeros(3)})], truths())
    with pytest.raises(ValueError, match="two 'coarse' predictions"):
        compute_errors(shifted("coarse", SHIFTS_MM) + shifted("coarse", {"s1": SHIFTS_MM["s1"]}), truths())
    other_affine = ANISOTROPIC.copy()
    other_affine[0, 3] += 1.0
    with pytest.raises(ValueError, match="voxel_to_world"):
        compute_errors([Prediction("s1", "coarse", TRUE["s1"], other_affine)], truths())
    with pytest.raises(ValueError, match="3-vector"):
        Prediction("s1", "coarse", {"AC": [1.0, 2.0]})


def test_best_and_worst_cases() -> None:
    shifts = {"s1": np.array([1.0, 0.0, 0.0]), "s2": np.array([0.0, 7.0, 0.0]), "s3": np.array([0.0, 0.0, 4.0])}
    predictions = shifted("coarse", shifts, landmarks=("AC",)) + shifted("unet", SHIFTS_MM)
    errors = compute_errors(predictions, truths())
    best, worst = best_and_worst(errors, k=2, method="coarse")
    assert [(e.subject, e.error_mm) for e in best] == [("s1", pytest.approx(1.0)), ("s3", pytest.approx(4.0))]
    assert [(e.subject, e.error_mm) for e in worst] == [("s2", pytest.approx(7.0)), ("s3", pytest.approx(4.0))]
    best, worst = best_and_worst(errors, k=1, method="unet")
    # unet: 3, 4, 5 mm on both landmarks; ties are broken by subject then landmark name.
    assert (best[0].subject, best[0].landmark) == ("s1", "AC")
    assert (worst[0].subject, worst[0].landmark) == ("s3", "AC")
    with pytest.raises(ValueError, match="several methods"):
        best_and_worst(errors)


def test_empty_table() -> None:
    table = ErrorTable.from_errors([])
    assert table.rows == {}
    assert table.to_markdown() == "No predictions to evaluate.\n"


def test_evaluate_prints_the_markdown_to_stdout(capsys) -> None:
    table = evaluate(shifted("registration", SHIFTS_MM), truths())
    assert capsys.readouterr().out == table.to_markdown()
