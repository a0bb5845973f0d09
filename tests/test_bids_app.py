"""``mdgru-localize bids``: the BIDS app on a small synthetic BIDS dataset, with the toy localizer.

The toy model's "landmark k" is the k-th brightest voxel (:mod:`mdgru_keras.serving.testing`), so every scan
here has three bright voxels at known places and the expected world coordinates are those voxels mapped
through the file's affine. The dataset: sub-01 (T1w, T2w), sub-02 (ses-1: a dim T1w whose landmarks get a low
confidence; ses-2: two runs of an acq-mprage T1w), sub-03 (a corrupt T1w), sub-04 (a T2w only).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bids.layout import BIDSLayout, parse_file_entities
from click.testing import CliRunner, Result

from mdgru_keras.bids.derivatives import GROUP_COLUMNS, derivative_stem, plan_outputs
from mdgru_keras.bids.layout import BidsScan
from mdgru_keras.cli import main as cli
from mdgru_keras.commands.bids import spread_values
from mdgru_keras.geometry import affine_maps
from mdgru_keras.io import read_landmarks
from mdgru_keras.prediction import MIN_CONFIDENCE, worst_status
from mdgru_keras.serving.testing import TOY_LANDMARKS, save_toy_localizer
from mdgru_keras.version import package_version

REPO = Path(__file__).resolve().parents[1]
SHAPE = (20, 20, 20)


@dataclass(frozen=True)
class Scan:
    relpath: str  # in the BIDS dataset
    output: str  # the expected .fcsv below OUTPUT_DIR
    voxels: np.ndarray  # [3, 3]: the toy's landmarks, brightest first
    values: tuple[float, ...]  # their intensities
    corrupt: bool = False

    def world_mm(self, bids_dir: Path) -> np.ndarray:
        """The landmarks in world mm through the affine as stored in the file."""
        affine = nib.load(str(bids_dir / self.relpath)).affine
        return self.voxels @ affine[:3, :3].T + affine[:3, 3]


def _affine(angle_deg: float, spacing: tuple[float, float, float], origin: tuple[float, float, float]) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = affine_maps.rotation_matrix([0.0, 0.0, np.deg2rad(angle_deg)]) @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


BRIGHT = (9.0, 8.0, 7.0)
DIM = (-10.0, -11.0, -12.0)  # sigmoid: 4.5e-5, 1.7e-5, 6.1e-6, below the default --min-confidence 1e-3
SCANS = {
    "sub-01 T1w": (Scan("sub-01/anat/sub-01_T1w.nii.gz", "sub-01/anat/sub-01_space-T1w_desc-mdgru_afids.fcsv",
                        np.array([[3, 4, 5], [10, 11, 12], [16, 2, 9]]), BRIGHT),
                   _affine(15, (1.0, 1.2, 0.9), (-10.0, 20.0, 5.0))),
    "sub-01 T2w": (Scan("sub-01/anat/sub-01_T2w.nii.gz", "sub-01/anat/sub-01_space-T2w_desc-mdgru_afids.fcsv",
                        np.array([[5, 5, 5], [14, 3, 8], [1, 18, 11]]), BRIGHT),
                   np.diag([-1.0, 1.1, 1.5, 1.0]) + np.array([[0, 0, 0, 12.0], [0, 0, 0, -7], [0, 0, 0, 3],
                                                               [0, 0, 0, 0]])),
    "sub-02 ses-1": (Scan("sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz",
                          "sub-02/ses-1/anat/sub-02_ses-1_space-T1w_desc-mdgru_afids.fcsv",
                          np.array([[7, 7, 2], [2, 15, 15], [12, 9, 4]]), DIM),
                     _affine(-30, (0.8, 0.8, 1.6), (3.0, -4.0, 50.0))),
    "sub-02 run-1": (Scan("sub-02/ses-2/anat/sub-02_ses-2_acq-mprage_run-1_T1w.nii.gz",
                          "sub-02/ses-2/anat/sub-02_ses-2_acq-mprage_run-1_space-T1w_desc-mdgru_afids.fcsv",
                          np.array([[4, 16, 9], [9, 9, 9], [17, 1, 3]]), BRIGHT),
                     _affine(40, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))),
    "sub-02 run-2": (Scan("sub-02/ses-2/anat/sub-02_ses-2_acq-mprage_run-2_T1w.nii",
                          "sub-02/ses-2/anat/sub-02_ses-2_acq-mprage_run-2_space-T1w_desc-mdgru_afids.fcsv",
                          np.array([[0, 0, 19], [19, 19, 0], [8, 12, 6]]), BRIGHT),
                     _affine(5, (1.1, 0.9, 1.0), (-20.0, 7.0, -3.0))),
    "sub-03 T1w": (Scan("sub-03/anat/sub-03_T1w.nii.gz", "sub-03/anat/sub-03_space-T1w_desc-mdgru_afids.fcsv",
                        np.zeros((3, 3)), BRIGHT, corrupt=True), np.eye(4)),
    "sub-04 T2w": (Scan("sub-04/anat/sub-04_T2w.nii.gz", "sub-04/anat/sub-04_space-T2w_desc-mdgru_afids.fcsv",
                        np.array([[2, 3, 4], [12, 13, 14], [6, 16, 10]]), BRIGHT), np.eye(4)),
}  # fmt: skip
T1W_GOOD = ("sub-01 T1w", "sub-02 ses-1", "sub-02 run-1", "sub-02 run-2")


def write_scan(path: Path, scan: Scan, affine: np.ndarray, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if scan.corrupt:
        path.write_bytes(b"this is not a NIfTI file")
        return
    rng = np.random.default_rng(seed)
    floor = min(scan.values) - 10.0  # every other voxel is darker than the three landmarks
    volume = (floor + rng.uniform(0.0, 1.0, size=SHAPE)).astype(np.float32)
    for voxel, value in zip(scan.voxels, scan.values):
        volume[tuple(voxel)] = value
    nib.save(nib.Nifti1Image(volume, affine), str(path))


def make_dataset(bids_dir: Path) -> Path:
    bids_dir.mkdir(parents=True)
    (bids_dir / "dataset_description.json").write_text(json.dumps({"Name": "toy heads", "BIDSVersion": "1.10.0"}))
    (bids_dir / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\nsub-03\nsub-04\n")
    for seed, (scan, affine) in enumerate(SCANS.values()):
        write_scan(bids_dir / scan.relpath, scan, affine, seed)
    return bids_dir


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("models") / "toy"
    save_toy_localizer(base / "3")
    return base


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("study") / "bids")


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, ["bids", *map(str, args)])


def error_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith(("error:", "Error:"))]


@pytest.fixture(scope="module")
def participant_run(dataset: Path, model: Path) -> tuple[Result, Path]:
    """The participant level on the whole dataset, into BIDS_DIR/derivatives/mdgru (the usual place)."""
    out = dataset / "derivatives" / "mdgru"
    return run(dataset, out, "participant", "--model", model), out


def outputs(out: Path) -> list[str]:
    return sorted(path.relative_to(out).as_posix() for path in out.rglob("*") if path.is_file())


def test_participant_level_writes_a_bids_derivatives_dataset(participant_run, dataset: Path) -> None:
    result, out = participant_run
    broken = dataset / SCANS["sub-03 T1w"][0].relpath
    assert result.exit_code == 1, result.output  # one participant failed; the others were written
    assert error_lines(result) == [f"error: {broken}: cannot read NIfTI header (File {broken} is not a gzip file)"]
    assert "warning: sub-04: no T1w image" in result.stderr.splitlines()
    dim = dataset / SCANS["sub-02 ses-1"][0].relpath
    assert any(line.startswith(f"warning: {dim}: confidence below {MIN_CONFIDENCE:g}")
               for line in result.stderr.splitlines())  # fmt: skip
    assert result.stdout.strip().splitlines()[-1] == (
        f"Wrote 4 of 5 scans and 3 QC pages (sub-*.html) to {out} (1 scan with flagged landmarks (see warnings); "
        f"1 failed: {broken})"
    )
    expected = [SCANS[key][0].output for key in T1W_GOOD]
    assert outputs(out) == sorted(
        [".bidsignore", "dataset_description.json", "logs/sub-03_space-T1w_desc-mdgru_afids_error.json"]
        + ["sub-01.html", "sub-02.html", "sub-03.html"]  # the QC pages, sub-03's listing its failed scan
        + expected + [name.removesuffix(".fcsv") + ".json" for name in expected]
    )  # no temporary file left, no output for the broken scan
    for name in expected:
        entities = parse_file_entities(name)
        assert (entities["space"], entities["desc"], entities["suffix"], entities["extension"]) == (
            "T1w", "mdgru", "afids", ".fcsv")
        assert entities["datatype"] == "anat" and entities["subject"] in ("01", "02")
    assert parse_file_entities(expected[3])["acquisition"] == "mprage" and parse_file_entities(expected[3])["run"] == 2
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["BIDSVersion"]
    assert description["GeneratedBy"][0]["Name"] == "mdgru-keras"
    assert description["GeneratedBy"][0]["Version"] == package_version() != "unknown"
    assert description["DatasetLinks"]["raw"] == dataset.resolve().as_uri()
    # pybids reads the outputs as the derivatives of the dataset
    layout = BIDSLayout(str(dataset), derivatives=str(out), validate=False)
    found = layout.get(scope="mdgru-keras", suffix="afids", extension=".fcsv", return_type="filename")
    assert sorted(Path(path).relative_to(out).as_posix() for path in found) == sorted(expected)
    assert layout.get(scope="mdgru-keras", subject="02", session="2", run=2, suffix="afids", extension=".json")


def test_fcsv_holds_the_known_world_positions(participant_run, dataset: Path) -> None:
    _, out = participant_run
    for key in T1W_GOOD:
        scan = SCANS[key][0]
        landmarks = read_landmarks(out / scan.output)
        assert list(landmarks) == list(TOY_LANDMARKS)
        np.testing.assert_allclose(np.stack(list(landmarks.values())), scan.world_mm(dataset), atol=1e-9, err_msg=key)
        status = "low_confidence" if scan.values == DIM else "ok"
        text = (out / scan.output).read_text()
        assert text.startswith("# Markups fiducial file version = 4.11\n# CoordinateSystem = RAS\n")
        assert text.count(f",status {status}; confidence ") == 3, text


def test_sidecar_names_the_source_model_settings_and_statuses(participant_run, dataset: Path, model: Path) -> None:
    _, out = participant_run
    for key in T1W_GOOD:
        scan = SCANS[key][0]
        sidecar = json.loads((out / scan.output.replace(".fcsv", ".json")).read_text())
        assert sidecar["Sources"] == [f"bids:raw:{scan.relpath}"] and sidecar["CoordinateSystem"] == "RAS"
        assert {k: sidecar["Model"][k] for k in ("Name", "Version", "Path")} == {
            "Name": "toy", "Version": 3, "Path": str((model / "3").resolve())}
        assert sidecar["Model"]["Fingerprint"].startswith("sha256:")
        assert sidecar["Settings"] == {"Landmarks": "all", "MinConfidence": MIN_CONFIDENCE,
                                       "MaxFlipDisagreementMm": 8.0, "MaxCoarseShiftMm": 15.0}
        status = "low_confidence" if scan.values == DIM else "ok"
        assert sidecar["Status"] == status
        assert list(sidecar["Landmarks"]) == list(TOY_LANDMARKS)
        world_mm = scan.world_mm(dataset)
        for k, values in enumerate(sidecar["Landmarks"].values()):
            assert values["voxel"] == scan.voxels[k].tolist()
            np.testing.assert_allclose(values["world_mm"], world_mm[k], atol=1e-9)
            assert values["confidence"] == pytest.approx(1 / (1 + np.exp(-scan.values[k])), rel=1e-5)
            assert values["status"] == status and 0 <= values["flip_disagreement_mm"] < 8


def test_participant_and_session_filters_and_t2w(dataset: Path, model: Path, tmp_path: Path) -> None:
    out = tmp_path / "ses2"
    result = run(dataset, out, "participant", "--model", model, "--participant-label", "sub-02", "--session", "2")
    assert result.exit_code == 0, result.output
    assert [name for name in outputs(out) if name.endswith(".fcsv")] == [
        SCANS["sub-02 run-1"][0].output, SCANS["sub-02 run-2"][0].output]  # two runs, two files
    # several labels after one flag (the BIDS Apps spelling), T2w only: named space-T2w, in the T2w's own world mm
    out = tmp_path / "t2w"
    result = run(dataset, out, "participant", "--participant-label", "01", "02", "--suffix", "T2w", "--model", model)
    assert result.exit_code == 0, result.output
    assert "warning: sub-02: no T2w image" in result.stderr.splitlines()
    t2w = SCANS["sub-01 T2w"][0]
    assert [name for name in outputs(out) if name.endswith(".fcsv")] == [t2w.output]
    np.testing.assert_allclose(np.stack(list(read_landmarks(out / t2w.output).values())), t2w.world_mm(dataset),
                               atol=1e-9)  # fmt: skip
    both = run(dataset, tmp_path / "both", "participant", "--participant-label", "04", "--suffix", "T1w", "T2w",
               "--model", model)  # fmt: skip
    assert both.exit_code == 0, both.output
    assert [name for name in outputs(tmp_path / "both") if name.endswith(".fcsv")] == [SCANS["sub-04 T2w"][0].output]


def test_group_level_collects_every_participant(participant_run, dataset: Path, model: Path) -> None:
    _, out = participant_run
    result = run(dataset, out, "group")
    assert result.exit_code == 1, result.output  # sub-03 has no outputs
    broken = dataset / SCANS["sub-03 T1w"][0].relpath
    assert error_lines(result) == [f"error: {broken}: cannot read NIfTI header (File {broken} is not a gzip file)"]
    assert result.stdout.strip().splitlines()[-1] == (
        f"Wrote {out / 'group_afids.tsv'}, {out / 'group_summary.json'} and {out / 'group_report.html'} "
        "(2 participants, 4 scans, 12 landmarks; 1 failed: sub-03)"
    )
    with open(out / "group_afids.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert tuple(rows[0]) == GROUP_COLUMNS and len(rows) == 12
    assert {row["participant_id"] for row in rows} == {"sub-01", "sub-02"}
    assert sorted({(row["session_id"], row["image"]) for row in rows}) == sorted(
        ("n/a" if "ses-" not in SCANS[key][0].relpath else SCANS[key][0].relpath.split("/")[1], SCANS[key][0].relpath)
        for key in T1W_GOOD
    )
    for key in T1W_GOOD:
        scan = SCANS[key][0]
        mine = [row for row in rows if row["image"] == scan.relpath]
        assert [row["landmark"] for row in mine] == list(TOY_LANDMARKS)
        world_mm = np.array([[float(row[axis]) for axis in ("x_mm", "y_mm", "z_mm")] for row in mine])
        np.testing.assert_allclose(world_mm, scan.world_mm(dataset), atol=1e-9)
    summary = json.loads((out / "group_summary.json").read_text())
    assert summary["participant_status"] == {"sub-01": "ok", "sub-02": "low_confidence", "sub-03": "failed"}
    # the group page: the participants worst first, each linking to its page
    page = (out / "group_report.html").read_text()
    links = re.findall(r'<a href="(sub-\d+\.html)">(sub-\d+)</a>', page)
    assert links == [("sub-03.html", "sub-03"), ("sub-02.html", "sub-02"), ("sub-01.html", "sub-01")]
    assert all((out / href).is_file() for href, _ in links)
    assert summary["status_counts"] == {"ok": 9, "coarse_fine_disagree": 0, "unstable": 0,
                                       "low_confidence": 3, "outside_image": 0}
    assert summary["failed_participants"] == ["sub-03"]
    assert summary["failed_scans"] == [{"participant_id": "sub-03", "session_id": None,
                                        "image": "sub-03/anat/sub-03_T1w.nii.gz",
                                        "error": f"cannot read NIfTI header (File {broken} is not a gzip file)"}]
    assert summary["participants_without_scans"] == ["sub-04"]
    assert [model_["Name"] for model_ in summary["models"]] == ["toy"]
    # a subset, and model options refused at the group level
    subset = run(dataset, out, "group", "--participant-label", "01")
    assert subset.exit_code == 0, subset.output
    assert subset.stdout.strip().endswith("(1 participant, 1 scan, 3 landmarks)")
    refused = run(dataset, out, "group", "--model", model, "--min-confidence", "0.5")
    assert refused.exit_code == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        "Error: --model, --min-confidence: only for the participant level (the group level reads its outputs)")


def test_group_level_names_the_scans_the_model_is_probably_lost_in(participant_run, dataset: Path,
                                                                   tmp_path: Path) -> None:
    """sub-01's T1w outputs rewritten, as the participant level writes them, for a 12-landmark prediction with 9
    landmarks unstable (the rule of prediction.lost_scan_note, from the sidecar's statuses): the group summary
    lists the scan and the group page's line for sub-01 names it."""
    from mdgru_keras.bids import derivatives
    from mdgru_keras.bids.layout import find_scans
    from mdgru_keras.prediction import QualityThresholds, ScanPrediction

    study = tmp_path / "bids"
    shutil.copytree(dataset, study)
    out = study / "derivatives" / "mdgru"
    scan = next(scan for scan in find_scans(study).scans if scan.relpath == SCANS["sub-01 T1w"][0].relpath)
    [outputs], _ = derivatives.plan_outputs(out, [scan])
    sidecar = json.loads(outputs.sidecar.read_text())
    names = tuple(f"L{k}" for k in range(12))
    world_mm = np.arange(36, dtype=np.float64).reshape(12, 3)
    prediction = ScanPrediction(
        path=str(scan.path), landmark_names=names, world_mm=world_mm, voxel=world_mm % 20, coarse_world_mm=world_mm,
        coarse_voxel=world_mm % 20, confidence=np.ones(12, np.float32), shape=(20, 20, 20),
        flip_disagreement_mm=np.where(np.arange(12) < 9, 20.0, 0.0))
    thresholds = QualityThresholds(sidecar["Settings"]["MinConfidence"], sidecar["Settings"]["MaxFlipDisagreementMm"],
                                   sidecar["Settings"]["MaxCoarseShiftMm"])  # fmt: skip
    derivatives.write_scan_outputs(outputs, prediction, derivatives.Settings(sidecar["Model"], None, thresholds))
    result = run(study, out, "group")
    assert result.exit_code == 1, result.output  # sub-03 still has no outputs
    note = "9 of 12 landmarks flagged, the model is probably lost in this scan"
    summary = json.loads((out / "group_summary.json").read_text())
    assert summary["probably_lost_scans"] == [
        {"participant_id": "sub-01", "session_id": None, "image": scan.relpath, "note": note}]
    page = (out / "group_report.html").read_text()
    assert f"{scan.path.name}: {note}" in page
    assert page.count("probably lost") == 1  # sub-02's scans are not lost: 3 landmarks are too few to say
    # the same outputs with fewer flags: nothing is called lost
    prediction = dataclasses.replace(prediction, flip_disagreement_mm=np.where(np.arange(12) < 8, 20.0, 0.0))
    derivatives.write_scan_outputs(outputs, prediction, derivatives.Settings(sidecar["Model"], None, thresholds))
    run(study, out, "group")
    assert json.loads((out / "group_summary.json").read_text())["probably_lost_scans"] == []
    assert "probably lost" not in (out / "group_report.html").read_text()


def test_a_non_bids_folder_and_unknown_labels_are_one_line(dataset: Path, tmp_path: Path) -> None:
    plain = tmp_path / "scans"
    plain.mkdir()
    (plain / "scan.nii.gz").write_bytes(b"")
    for level in ("participant", "group"):
        result = run(plain, tmp_path / "out", level)
        assert result.exit_code == 1, result.output
        assert result.stderr.strip().splitlines() == [
            f"Error: {plain}: not a BIDS dataset: no dataset_description.json (BIDS_DIR is the dataset's top "
            "folder, which holds dataset_description.json and the sub-* folders)"]
    (plain / "dataset_description.json").write_text('{"Name": "x"}')
    result = run(plain, tmp_path / "out", "participant")
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: {plain / 'dataset_description.json'}: lacks BIDSVersion, which BIDS requires "
        '(e.g. {"Name": "My study", "BIDSVersion": "1.10.0"})')
    result = run(dataset, tmp_path / "out", "participant", "--participant-label", "01", "09")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: {dataset}: no participant sub-09 (the dataset has 4 participants: sub-01, sub-02, sub-03, sub-04)")
    result = run(dataset, tmp_path / "out", "participant", "--session", "ses-x_1")
    assert result.exit_code == 2 and "'ses-x_1' is not a BIDS label" in result.stderr
    result = run(dataset, tmp_path / "out", "group")  # nothing written there yet
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: {tmp_path / 'out'}: no mdgru-keras derivatives here (no dataset_description.json); run the "
        "participant level first")
    assert not (tmp_path / "out").exists()


def mtimes(out: Path) -> dict[str, int]:
    """The derivatives' (not the QC pages') modification times."""
    return {name: (out / name).stat().st_mtime_ns for name in outputs(out) if name.startswith("sub-") and "/" in name}


def test_reruns_finish_only_what_is_missing(participant_run, dataset: Path, model: Path, tmp_path: Path) -> None:
    study = tmp_path / "bids"
    shutil.copytree(dataset, study, ignore=shutil.ignore_patterns("group_*"))
    out = study / "derivatives" / "mdgru"
    for name in mtimes(out):
        os.utime(out / name, ns=(1_000_000_000, 1_000_000_000))
    before = mtimes(out)
    # sub-03's scan is repaired: only it is localized, the rest is skipped untouched
    scan, affine = SCANS["sub-03 T1w"]
    write_scan(study / scan.relpath, Scan(scan.relpath, scan.output, SCANS["sub-01 T1w"][0].voxels, BRIGHT),
               affine, 0)  # fmt: skip
    pages = {name: (out / name).stat().st_mtime_ns for name in ("sub-01.html", "sub-02.html", "sub-03.html")}
    result = run(study, out, "participant", "--model", model)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == (
        f"Wrote 1 of 5 scans and 1 QC page (sub-*.html) to {out} (4 already complete)")
    after = mtimes(out)
    assert {name: after[name] for name in before} == before
    # only the repaired participant's page is written again, now without the error
    assert [name for name, mtime in pages.items() if (out / name).stat().st_mtime_ns != mtime] == ["sub-03.html"]
    assert "cannot read NIfTI header" not in (out / "sub-03.html").read_text()
    assert not (out / "logs" / "sub-03_space-T1w_desc-mdgru_afids_error.json").exists()
    # a run killed while writing sub-01: its .fcsv is there, its sidecar not yet, a temporary file is left
    fcsv = out / SCANS["sub-01 T1w"][0].output
    fcsv.with_suffix(".json").unlink()
    fcsv.write_text("# Markups fiducial file version = 4.11\n1,2,3")  # half-written, even
    leftover = fcsv.parent / f".{fcsv.with_suffix('.json').name}.k1ll3d.tmp"
    leftover.write_text('{"Format": ')
    before = mtimes(out)
    result = run(study, out, "participant", "--model", model)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == (
        f"Wrote 1 of 5 scans and 1 QC page (sub-*.html) to {out} (4 already complete)")
    after = mtimes(out)
    assert sorted(name for name in after if after[name] != before.get(name)) == [
        "sub-01/anat/sub-01_space-T1w_desc-mdgru_afids.fcsv", "sub-01/anat/sub-01_space-T1w_desc-mdgru_afids.json"]
    assert not leftover.exists()
    np.testing.assert_allclose(np.stack(list(read_landmarks(fcsv).values())),
                               SCANS["sub-01 T1w"][0].world_mm(study), atol=1e-9)  # fmt: skip
    # other settings: refused per scan until --overwrite, which rewrites everything
    before = mtimes(out)
    result = run(study, out, "participant", "--model", model, "--participant-label", "01", "--min-confidence", "0.5")
    assert result.exit_code == 1
    assert error_lines(result) == [
        f"error: {fcsv.with_suffix('.json')}: made with other settings (--min-confidence {MIN_CONFIDENCE:g}, now "
        "0.5); give --overwrite to replace it"]
    assert mtimes(out) == before
    result = run(study, out, "participant", "--model", model, "--min-confidence", "0.5", "--overwrite")
    assert result.exit_code == 0, result.output
    after = mtimes(out)
    assert all(after[name] != before[name] for name in before)
    assert json.loads(fcsv.with_suffix(".json").read_text())["Settings"]["MinConfidence"] == 0.5
    # a scan that fails now loses its earlier outputs: the group level reports it instead of stale landmarks
    (study / SCANS["sub-01 T1w"][0].relpath).write_bytes(b"")
    result = run(study, out, "participant", "--model", model, "--participant-label", "01", "--min-confidence", "0.5",
                 "--overwrite")  # fmt: skip
    assert result.exit_code == 1 and len(error_lines(result)) == 1
    assert not fcsv.exists() and not fcsv.with_suffix(".json").exists()
    group = run(study, out, "group")
    assert group.exit_code == 1
    assert json.loads((out / "group_summary.json").read_text())["failed_participants"] == ["sub-01"]


def test_several_values_after_one_flag() -> None:
    args = ["d", "o", "participant", "--participant-label", "01", "sub-02", "--suffix", "T1w", "T2w"]
    assert spread_values(args) == ["d", "o", "participant", "--participant-label", "01", "--participant-label",
                                   "sub-02", "--suffix", "T1w", "--suffix", "T2w"]  # fmt: skip
    assert spread_values(["--session=1", "2", "--model", "m"]) == ["--session=1", "--session", "2", "--model", "m"]
    assert spread_values(["--participant-label", "04", "--suffix", "T1w", "T2w"]) == [
        "--participant-label", "04", "--suffix", "T1w", "--suffix", "T2w"]
    # a path or an analysis level ends the values; "--" ends option parsing
    assert spread_values(["--participant_label", "01", "/data/bids", "out", "participant"]) == [
        "--participant_label", "01", "/data/bids", "out", "participant"]
    assert spread_values(["--participant-label", "01", "participant"]) == ["--participant-label", "01", "participant"]
    assert spread_values(["--", "--suffix", "T1w", "T2w"]) == ["--", "--suffix", "T1w", "T2w"]


def test_worst_status() -> None:
    assert worst_status([]) == "ok"
    assert worst_status(["ok", "unstable", "ok"]) == "unstable"
    assert worst_status(["unstable", "low_confidence;unstable"]) == "low_confidence"
    assert worst_status(["ok", "outside_image;low_confidence"]) == "outside_image"


def test_help_is_quick_and_has_an_example() -> None:
    code = (
        "import sys; from click.testing import CliRunner; from mdgru_keras.cli import main; "
        "result = CliRunner().invoke(main, ['bids', '--help']); assert result.exit_code == 0, result.output; "
        "print(sorted(m for m in ('bids', 'pandas', 'tensorflow', 'tqdm') if m in sys.modules))"
    )
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, check=True)
    assert loaded.stdout.strip() == "[]"
    help_text = " ".join(CliRunner().invoke(cli, ["bids", "--help"]).output.split())
    assert "mdgru-localize bids /data/study /data/study/derivatives/mdgru participant" in help_text
    assert "--landmarks A,B,...|all" in help_text and f"[default: {MIN_CONFIDENCE:g};" in help_text


def test_output_names_keep_every_entity_and_refuse_a_shared_name(tmp_path: Path) -> None:
    def scan(relpath: str, suffix: str = "T1w") -> BidsScan:
        name = Path(relpath).name.split(".")[0]
        entities = tuple(tuple(token.split("-", 1)) for token in name.split("_")[:-1])
        return BidsScan(tmp_path / relpath, relpath, entities[0][1], None, suffix, entities)

    echo = scan("sub-01/anat/sub-01_acq-mp2_ce-gad_rec-norm_run-3_echo-1_part-mag_T1w.nii.gz")
    assert derivative_stem(echo) == "sub-01_acq-mp2_ce-gad_rec-norm_run-3_echo-1_part-mag_space-T1w_desc-mdgru_afids"
    assert parse_file_entities(derivative_stem(echo) + ".fcsv")["reconstruction"] == "norm"
    planned, conflicts = plan_outputs(tmp_path, [scan("sub-01/anat/sub-01_T1w.nii.gz"),
                                                 scan("sub-01/anat/sub-01_T1w.nii"),
                                                 scan("sub-01/anat/sub-01_T2w.nii", "T2w")])  # fmt: skip
    assert [outputs.landmarks.name for outputs in planned] == [
        "sub-01_space-T1w_desc-mdgru_afids.fcsv", "sub-01_space-T2w_desc-mdgru_afids.fcsv"]
    assert [(conflict.relpath, problem) for conflict, problem in conflicts] == [(
        "sub-01/anat/sub-01_T1w.nii",
        "has the same output name as sub-01/anat/sub-01_T1w.nii.gz (sub-01_space-T1w_desc-mdgru_afids.fcsv); skipped")]
