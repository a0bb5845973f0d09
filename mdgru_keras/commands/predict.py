"""``mdgru-localize predict``: landmarks of NIfTI scans, through an exported SavedModel or TF Serving."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from mdgru_keras.commands._options import ALL_LANDMARKS, LANDMARK_LIST, select_landmarks, shipped_model_dir

if TYPE_CHECKING:  # not imported at run time: --help stays quick
    from mdgru_keras.prediction import QualityThresholds

FORMATS = ("json", "csv", "fcsv", "mrk.json")
MARKUPS_FORMATS = ("fcsv", "mrk.json")  # 3D Slicer point lists: one file per scan
# As mdgru_keras.prediction.MIN_CONFIDENCE (not imported here: --help stays quick); the help below also repeats
# its MIN_SCAN_VOXELS. tests/test_predict.py checks that they agree.
MIN_CONFIDENCE = 0.001
MAX_FLIP_DISAGREEMENT_MM = 8.0  # as mdgru_keras.prediction.MAX_FLIP_DISAGREEMENT_MM
MAX_COARSE_SHIFT_MM = 15.0  # as mdgru_keras.prediction.MAX_COARSE_SHIFT_MM
# Errors after which every further scan would fail the same way: stop instead of trying each.
FATAL_CODES = ("UNAVAILABLE", "NOT_FOUND", "UNIMPLEMENTED", "UNAUTHENTICATED", "PERMISSION_DENIED")


@click.command("predict")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--model",
    "model_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Exported model: BASE/NAME (the newest numbered version is used) or one version folder BASE/NAME/V. "
    "Default (without --server): the model shipped with the package, all 32 AFIDs (docs/MODEL_CARD.md).",
)
@click.option(
    "--server",
    default=None,
    help="A TensorFlow Serving server instead of --model: HOST:PORT (gRPC, usually 8500) or "
    "http://HOST:PORT (REST, usually 8501).",
)
@click.option("--model-name", default="mdgru", show_default=True, help="With --server: the served model's name.")
@click.option(
    "--timeout", "timeout_s", type=float, default=300.0, show_default=True, help="With --server: seconds per scan."
)
@click.option(
    "--landmarks",
    type=LANDMARK_LIST,
    default=None,
    help="Comma-separated landmark names to report, e.g. --landmarks AC,PC, or 'all' (the default): every "
    "landmark the model knows (the shipped model: the 32 AFIDs).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="json",
    show_default=True,
    help="json: all scans in one document; csv: one row per scan and landmark; fcsv or mrk.json: a 3D "
    "Slicer point list per scan (each point's description holds its status, confidence, flip disagreement "
    "and coarse shift).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Output file for json/csv (default: standard output). For fcsv and mrk.json: the file for one "
    "scan (SCAN.fcsv / SCAN.mrk.json), or a directory that gets one such file per scan.",
)
@click.option(
    "--min-confidence",
    type=click.FloatRange(0.0, 1.0),
    default=MIN_CONFIDENCE,
    show_default=True,
    help="Landmarks with a lower confidence get status low_confidence (calibrated for the shipped model on "
    "held-out synthetic heads, docs/MODEL_CARD.md; models of other configs need their own; 0 switches the "
    "flag off).",
)
@click.option(
    "--max-disagreement",
    "max_disagreement_mm",
    type=click.FloatRange(min=0.0),
    default=MAX_FLIP_DISAGREEMENT_MM,
    show_default=True,
    help="Landmarks whose estimates in the scan and in its left-right mirror image lie more than this many mm "
    "apart get status unstable (models whose passes see the mirror image, such as the shipped one; calibrated on "
    "held-out synthetic heads, docs/MODEL_CARD.md).",
)
@click.option(
    "--max-coarse-shift",
    "max_coarse_shift_mm",
    type=click.FloatRange(min=0.0),
    default=MAX_COARSE_SHIFT_MM,
    show_default=True,
    help="Landmarks whose fine estimate lies more than this many mm from the coarse stage's estimate get status "
    "coarse_fine_disagree (calibrated on held-out synthetic heads, docs/MODEL_CARD.md; 0 switches the flag off).",
)
@click.option(
    "--figure",
    "figure_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write SCAN.png per scan into this directory: sagittal and axial slices through each landmark.",
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write visual QC reports into this directory: SCAN.html per scan (self-contained, opens offline: "
    "axial, coronal and sagittal slices through each landmark with its marker, confidence and status) and "
    "index.html listing the scans worst first.",
)
def predict(
    images: tuple[Path, ...],
    model_dir: Path | None,
    server: str | None,
    model_name: str,
    timeout_s: float,
    landmarks: tuple[str, ...] | None,
    fmt: str,
    out: Path | None,
    min_confidence: float,
    max_disagreement_mm: float,
    max_coarse_shift_mm: float,
    figure_dir: Path | None,
    report_dir: Path | None,
) -> None:
    """Find the landmarks in NIfTI scans (IMAGES: .nii or .nii.gz, any orientation and spacing).

    Without --model or --server, the model shipped with the package localizes all 32 AFIDs (anatomical
    fiducials: AC, PC, PMJ, ...; docs/MODEL_CARD.md). Otherwise the scans go through a model exported by
    `mdgru-localize export`, either loaded here (--model, loaded once for all scans) or served by
    TensorFlow Serving (--server). Coordinates are reported in RAS
    millimetres (world_mm, as 3D Slicer shows them) and as voxel indices of each file's own array (voxel,
    0-based). A scan that cannot be read, that is smaller than 2 voxels along an axis, or that
    the model refuses is reported on one line (error: SCAN: problem; with mdgru-localize --debug after its
    traceback) and skipped; the others are still written, and the exit status is 1.

    Every landmark has a confidence in [0, 1] and a status (JSON: "status", CSV: column status): ok, or
    outside_image (more than half a voxel beyond the scan's array: not in the scan, or the model is lost),
    low_confidence (below --min-confidence), unstable (flip disagreement above --max-disagreement) and/or
    coarse_fine_disagree (fine estimate farther than --max-coarse-shift from the coarse one), joined by ";".
    A scan with such landmarks gets one line "warning: SCAN: ..." on standard error naming them (it starts with
    "N of K landmarks flagged, the model is probably lost in this scan" when three quarters or more are), and the
    final line counts such scans; they are still written (.fcsv and .mrk.json: in each point's
    description), and they do not change the exit status. A scan whose header leaves its world space ambiguous
    (sform and qform that disagree, or neither set) gets a "warning: SCAN: ..." line saying so: the coordinates
    follow the sform, as nibabel reads it, and 3D Slicer may read the qform.

    Examples:

    \b
      mdgru-localize predict sub-01_T1w.nii.gz --format fcsv --out sub-01_afids.fcsv
      mdgru-localize predict scan.nii.gz --model export/mdgru --format fcsv --out scan.fcsv
      mdgru-localize predict scans/*.nii.gz --model export/mdgru --out landmarks.json --figure figures/
      mdgru-localize predict scans/*.nii.gz --out landmarks.json --report qc/   # then open qc/index.html
      mdgru-localize predict scans/*.nii.gz --server 127.0.0.1:8500 --format csv --out landmarks.csv
    """
    if model_dir is not None and server is not None:
        raise click.UsageError("give at most one of --model EXPORT_DIR and --server HOST:PORT")
    if model_dir is None and server is None:
        model_dir = shipped_model_dir()
    if fmt in MARKUPS_FORMATS and out is None:
        raise click.UsageError(
            f"--format {fmt} writes files: give --out (a .{fmt} file, or a directory for many scans)"
        )
    if fmt in MARKUPS_FORMATS and len(images) > 1 and out.name.lower().endswith(f".{fmt}"):
        raise click.UsageError(
            f"--out {out}: with {len(images)} scans, --out must be a directory (one .{fmt} per scan)"
        )
    requested = None if landmarks in (None, ALL_LANDMARKS) else landmarks
    from mdgru_keras.io.atomic import check_writable

    # Outputs that cannot be written are refused now, not after every scan was localized.
    if out is not None:
        one_file = fmt not in MARKUPS_FORMATS or (len(images) == 1 and out.name.lower().endswith(f".{fmt}"))
        check_writable(out, directory=not one_file)
    for directory in (figure_dir, report_dir):
        if directory is not None:
            check_writable(directory, directory=True)

    from tqdm import tqdm

    from mdgru_keras.errors import InputError
    from mdgru_keras.io.nifti import world_space_note
    from mdgru_keras.prediction import (
        QualityThresholds,
        per_scan_paths,
        predict_scan,
        predictions_csv,
        predictions_json,
        write_prediction_figure,
    )
    from mdgru_keras.serving import ServingError

    thresholds = QualityThresholds(min_confidence, max_disagreement_mm, max_coarse_shift_mm)
    client = _open_client(model_dir, server, model_name, timeout_s, requested)

    predictions, done, failed = [], [], []  # done: the index in IMAGES of each prediction
    flagged = 0  # scans with a landmark whose status is not ok
    figure_paths = per_scan_paths(images, figure_dir, ".png") if figure_dir is not None else None
    report = None
    if report_dir is not None:
        from mdgru_keras.reports import ScanReports, model_info_for_report

        report = ScanReports(
            report_dir, images, model_info=model_info_for_report(client, model_name if server is not None else None),
            thresholds=thresholds,
        )  # fmt: skip
    with client, tqdm(total=len(images), unit="scan", file=sys.stderr, disable=None, desc="predict") as progress:
        for index, image in enumerate(images):
            try:
                prediction = predict_scan(client, image)
            except InputError as error:
                _show_traceback(error, progress)
                failed.append((str(image), str(error).removeprefix(f"{image}: ")))
            except ServingError as error:
                _show_traceback(error, progress)
                failed.append((str(image), str(error)))
                if error.code in FATAL_CODES:
                    raise click.ClickException(f"{image}: {error} (stopped: the rest would fail alike)") from None
            else:
                if requested is not None:
                    prediction = prediction.select(select_landmarks(requested, prediction.landmark_names))
                predictions.append(prediction)
                done.append(index)
                if note := world_space_note(image):
                    progress.write(f"warning: {image}: {note}", file=sys.stderr)
                if warning := prediction.warning(thresholds):
                    progress.write(f"warning: {warning}", file=sys.stderr)
                    flagged += 1
                if figure_paths is not None:
                    try:
                        write_prediction_figure(prediction, figure_paths[index])
                    except (InputError, ValueError, OSError) as error:
                        _show_traceback(error, progress)
                        failed.append((str(image), f"figure: {error}"))
                if report is not None:
                    try:
                        report.add(index, prediction)
                    except (InputError, ValueError, OSError) as error:
                        _show_traceback(error, progress)
                        failed.append((str(image), f"report: {error}"))
            if failed and failed[-1][0] == str(image):
                progress.write(f"error: {image}: {failed[-1][1]}", file=sys.stderr)
            progress.update(1)

    if fmt in MARKUPS_FORMATS:
        written = _write_markups(predictions, done, images, out, fmt, thresholds)
    else:
        if fmt == "json":
            text = predictions_json(predictions, failed, str(client.server), thresholds)
        else:
            text = predictions_csv(predictions, thresholds)
        written = _write_text(text, out, fmt)
    count = sum(len(p.landmark_names) for p in predictions)
    summary = f"{len(predictions)} of {len(images)} scans, {count} landmarks"
    if flagged:
        summary += f"; {flagged} scan{'s' if flagged != 1 else ''} with flagged landmarks (see warnings)"
    if figure_dir is not None:
        summary += f"; figures in {figure_dir}"
    if report is not None:
        summary += f"; QC report {report.finish(failed)}"
    failed_files = list(dict.fromkeys(path for path, _ in failed))  # in the order given
    if failed_files:
        summary += f"; {len(failed_files)} failed: {', '.join(failed_files)}"
    click.echo(f"Wrote {written} ({summary})", err=out is None)
    if failed_files:
        sys.exit(1)


def _show_traceback(error: BaseException, progress) -> None:
    """With ``mdgru-localize --debug``: the traceback of a scan's failure, which is otherwise one line."""
    from mdgru_keras.cli import debug_enabled

    if debug_enabled():
        import traceback

        progress.write("".join(traceback.format_exception(error)).rstrip(), file=sys.stderr)


def _open_client(
    model_dir: Path | None, server: str | None, model_name: str, timeout_s: float, requested: tuple[str, ...] | None
):
    """The client for --model (loaded once) or --server; ``--landmarks`` is checked against the export's
    ``model_info.json`` before the model is loaded (with --server: against the first answer)."""
    if model_dir is not None:
        from mdgru_keras.commands._options import load_for_inference
        from mdgru_keras.export import read_model_info
        from mdgru_keras.serving.servable import resolve_version_dir

        known = read_model_info(resolve_version_dir(model_dir)[0]).get("landmarks")
        if requested is not None and known is not None:
            select_landmarks(requested, known)
        return load_for_inference(model_dir)
    from mdgru_keras.serving import connect

    return connect(server, model_name, timeout_s=timeout_s)


def _write_markups(
    predictions, done: list[int], images: tuple[Path, ...], out: Path, fmt: str, thresholds: QualityThresholds
) -> str:
    """One Slicer point list (``fmt``: fcsv or mrk.json) per scan: ``out`` itself for a single scan named
    ``*.fcsv`` / ``*.mrk.json``, else ``out/SCAN.fcsv``; each point's description holds its QC values
    and status under ``thresholds``."""
    from mdgru_keras.io import write_landmarks
    from mdgru_keras.prediction import per_scan_paths

    if len(images) == 1 and out.name.lower().endswith(f".{fmt}"):
        targets = [out]
    else:
        out.mkdir(parents=True, exist_ok=True)
        targets = per_scan_paths(images, out, f".{fmt}")
    for prediction, index in zip(predictions, done):
        descriptions = prediction.point_descriptions(thresholds)
        write_landmarks(targets[index], prediction.world_mm_by_name(), fmt=fmt, descriptions=descriptions)
    return f"{len(predictions)} .{fmt} file{'s' if len(predictions) != 1 else ''} to {out}"


def _write_text(text: str, out: Path | None, fmt: str) -> str:
    from mdgru_keras.io import write_text_atomic

    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return f"{fmt.upper()} to standard output"
    write_text_atomic(out, text)
    return str(out)
