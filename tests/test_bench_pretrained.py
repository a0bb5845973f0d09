"""bench-pretrained's tables: the affine + SyN rows kept beside the model's evaluation, and the landmark counts."""

from __future__ import annotations

import json
from pathlib import Path

from bench.bench_pretrained import ANTS_ROW, ants_report, markdown, with_ants_rows

LANDMARKS = ["AC", "PC", "PMJ"]


def _row(per_landmark_mm: list[float]) -> dict:
    mean = sum(per_landmark_mm) / len(per_landmark_mm)
    return {
        "subjects": 2,
        "overall": {"count": 6, "mean_mm": mean, "median_mm": mean, "std_mm": 0.0, "max_mm": max(per_landmark_mm)},
        "per_landmark": {name: {"mean_mm": mm} for name, mm in zip(LANDMARKS, per_landmark_mm)},
    }


def _condition(model_mm: list[float], registration_mm: list[float]) -> dict:
    return {
        "landmarks": LANDMARKS,
        "model_method": "fine n=4 + parabola",
        "rows": {"fine n=4 + parabola": _row(model_mm), "registration": _row(registration_mm)},
        "median_seconds_per_scan": {"model": 2.0, "registration": 6.0},
    }


def _result(conditions: dict) -> dict:
    return {
        "date": "2026-12-01 00:00 UTC",
        "machine": {"processor": "test", "cores": 2},
        "conditions": conditions,
        "speed": {"matmul_gflops": 150.0, "scan_shape": "10x10x10", "wall_s": [1.0], "wall_s_median": 1.0,
                  "cpu_s_median": 2.0, "load_and_first_s": 3.0},
    }


def test_syn_rows_are_merged_from_their_own_report_and_counted(tmp_path: Path) -> None:
    unseen = _condition([1.0, 2.0, 3.0], [2.0, 1.0, 4.0])
    # an `evaluate --baseline ants --json` report of the same heads (its model rows are not used)
    report = _condition([9.0, 9.0, 9.0], [9.0, 9.0, 9.0])
    report["rows"][ANTS_ROW] = _row([0.5, 2.5, 3.5])
    report["median_seconds_per_scan"][ANTS_ROW] = 75.0
    ants_report(tmp_path, "unseen").write_text(json.dumps(report))

    merged, seconds = with_ants_rows(unseen, tmp_path, "unseen", tmp_path / "manifest.csv", tmp_path, tmp_path,
                                     run_now=False)
    assert seconds is None  # nothing was run: the kept report was used
    assert merged["rows"][ANTS_ROW] == report["rows"][ANTS_ROW]
    assert merged["rows"]["fine n=4 + parabola"] == unseen["rows"]["fine n=4 + parabola"]  # the model's own rows
    assert merged["median_seconds_per_scan"] == {"model": 2.0, "registration": 6.0, ANTS_ROW: 75.0}
    assert ANTS_ROW not in unseen["rows"]  # the input is left as it was

    # a condition without a kept SyN report stays as it is
    other = _condition([1.0, 1.0, 1.0], [2.0, 2.0, 2.0])
    assert with_ants_rows(other, tmp_path, "beyond", tmp_path, tmp_path, tmp_path, run_now=False)[0] is other

    text = markdown(_result({"unseen": merged, "beyond": other}))
    # model below registration on AC and PMJ (1 < 2, 3 < 4), not PC; below SyN on PC and PMJ (2 < 2.5, 3 < 3.5)
    assert "- unseen: the model's mean error is below registration on 2 of 3, SyN on 2 of 3 landmarks." in text
    assert "- beyond: the model's mean error is below registration on 3 of 3 landmarks." in text
    assert "| AC | 1.00 / 2.00 / 0.50 | 1.00 / 2.00 / - |" in text
    assert "| unseen | 2 | 2.00 ± 0.00 | 2.00 | 3.00 | 2.33 | 2.33 | 2.17 | 2.17 | 75 |" in text
    assert "| beyond | 2 | 1.00 ± 0.00 | 1.00 | 1.00 | 2.00 | 2.00 | - | - | - |" in text
