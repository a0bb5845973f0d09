"""``mdgru-localize bids``: the BIDS app. Landmarks of a BIDS dataset's T1w (and T2w) scans as a BIDS-derivatives
dataset (participant level), and one table of them all (group level). The library: :mod:`mdgru_keras.bids`."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from mdgru_keras.bids.layout import SUFFIXES, parse_label
from mdgru_keras.commands import predict as predict_command
from mdgru_keras.commands._options import ALL_LANDMARKS, select_landmarks, shipped_model_dir

LEVELS = ("participant", "group")
# Options that take several values after one flag, as BIDS Apps' argparse options (nargs="+") do.
MULTI_VALUE_OPTIONS = ("--participant-label", "--participant_label", "--session", "--suffix")
# What may follow such an option as one more value: a label (sub-/ses- optional), or a suffix.
_MORE_VALUE = re.compile(r"[A-Za-z0-9]+(-[A-Za-z0-9]+)?")
# Options of the participant level only (the group level reads what it wrote).
QUALITY_OPTIONS = ("min_confidence", "max_disagreement_mm", "max_coarse_shift_mm")  # predict's own options
PARTICIPANT_ONLY = ("model_dir", "landmarks", *QUALITY_OPTIONS, "overwrite")


def spread_values(args: list[str]) -> list[str]:
    """``--participant-label 01 02`` -> ``--participant-label 01 --participant-label 02`` (and alike for the
    other :data:`MULTI_VALUE_OPTIONS`), so that click's repeated options take the BIDS Apps spelling.

    Further values are taken while they look like labels (or suffixes) and are not an analysis level; as with
    BIDS Apps, the three arguments come first (``bids BIDS_DIR OUTPUT_DIR participant --participant-label 01 02``).
    """
    spread: list[str] = []
    index = 0
    while index < len(args):
        token = args[index]
        index += 1
        spread.append(token)
        if token == "--":
            return spread + args[index:]
        name, equals, _ = token.partition("=")
        if name not in MULTI_VALUE_OPTIONS:
            continue
        if not equals and index < len(args):  # the option's first value
            spread.append(args[index])
            index += 1
        while index < len(args) and _MORE_VALUE.fullmatch(args[index]) and args[index] not in LEVELS:
            spread.extend([name, args[index]])
            index += 1
    return spread


class BidsAppCommand(click.Command):
    """A click command whose :data:`MULTI_VALUE_OPTIONS` also take several values after one flag."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, spread_values(list(args)))


def _labels(prefix: str):
    def convert(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
        try:
            return tuple(dict.fromkeys(parse_label(value, prefix) for value in values))
        except ValueError as error:
            raise click.BadParameter(str(error), ctx, param) from None

    return convert


def _predict_option(name: str) -> click.Parameter:
    """predict's own option ``name`` (the same flag, type, default and help)."""
    return next(param for param in predict_command.predict.params if param.name == name)


EPILOG = """\b
Exit status:
  0  every selected scan has its outputs (also when landmarks are flagged: "warning:" lines)
  1  a scan failed ("error: IMAGE: problem" lines; the others were written, and a rerun does only
     what is missing), the group level found scans without outputs, or an expected failure
     ("Error: PATH: problem", e.g. BIDS_DIR is not a BIDS dataset)
  2  a usage error, e.g. an unknown --landmarks name
"""


@click.command("bids", cls=BidsAppCommand, epilog=EPILOG, context_settings={"max_content_width": 100})
@click.argument("bids_dir", type=click.Path(path_type=Path))
@click.argument("output_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("analysis_level", type=click.Choice(LEVELS))
@click.option(
    "--participant-label",
    "--participant_label",
    "participants",
    multiple=True,
    metavar="LABEL...",
    callback=_labels("sub-"),
    help="Only these participants (01 or sub-01; several after one flag: --participant-label 01 02, after the "
    "three arguments as in the examples). Default: all.",
)
@click.option(
    "--session",
    "sessions",
    multiple=True,
    metavar="LABEL...",
    callback=_labels("ses-"),
    help="Only these sessions (1 or ses-1; several after one flag). Default: all, and scans outside sessions.",
)
@click.option(
    "--suffix",
    "suffixes",
    multiple=True,
    type=click.Choice(SUFFIXES),
    metavar="T1w|T2w...",
    help="Which scans to localize in: T1w (the default), T2w or both (--suffix T1w T2w). A T2w scan's "
    "outputs are named space-T2w.",
)
@click.option(
    "--model",
    "model_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Exported model: BASE/NAME (the newest numbered version) or one version folder BASE/NAME/V. Default: "
    "the model shipped with the package, all 32 AFIDs (docs/MODEL_CARD.md). Loaded once, and only when a "
    "scan needs it.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Localize again scans whose outputs are complete (default: skip them, so that a rerun finishes only "
    "what is missing).",
)
def bids(
    bids_dir: Path,
    output_dir: Path,
    analysis_level: str,
    participants: tuple[str, ...],
    sessions: tuple[str, ...],
    suffixes: tuple[str, ...],
    model_dir: Path | None,
    overwrite: bool,
    landmarks: tuple[str, ...] | None,
    min_confidence: float,
    max_disagreement_mm: float,
    max_coarse_shift_mm: float,
) -> None:
    """Localize the landmarks of a whole BIDS dataset, as a BIDS App.

    BIDS_DIR is the dataset (the folder with dataset_description.json and the sub-* folders), OUTPUT_DIR the
    derivatives dataset to write (e.g. BIDS_DIR/derivatives/mdgru), ANALYSIS_LEVEL participant or group.

    participant: every sub-*/[ses-*/]anat/*_T1w.nii[.gz] (--suffix: also or only T2w) of the selected
    participants gets, in OUTPUT_DIR/sub-*/[ses-*/]anat/, a 3D Slicer point list NAME_space-T1w_desc-mdgru_afids.fcsv
    (RAS millimetres of that scan; NAME keeps the scan's entities: sub, ses, acq, run, ...) and a JSON sidecar
    with the model, its version, the settings and per landmark its confidence and status (ok, outside_image,
    low_confidence, unstable, coarse_fine_disagree; as in `mdgru-localize predict`). A scan that fails is
    reported on one line (error: IMAGE: problem) and the others go on; one whose header leaves its world space
    ambiguous (sform and qform disagree, or neither is set) gets a warning line. Scans with complete outputs are
    skipped unless --overwrite: every file is written atomically, so a rerun after a killed or failed run
    finishes only what is missing.
    A scan whose outputs were made with another model or other settings is an error until --overwrite.

    group: OUTPUT_DIR/group_afids.tsv, one row per scan and landmark (participant_id, session_id, image,
    landmark, x_mm, y_mm, z_mm, confidence, flip_disagreement_mm, status), and OUTPUT_DIR/group_summary.json:
    counts per status, each participant's worst status, the failed participants and scans with their errors, the
    scans the model is probably lost in (three quarters or more of their landmarks flagged).
    It takes --participant-label, --session and --suffix (which scans to collect), no model options.

    Examples:

    \b
      mdgru-localize bids /data/study /data/study/derivatives/mdgru participant
      mdgru-localize bids /data/study out participant --participant-label 01 02 --session 1
      mdgru-localize bids /data/study out participant --suffix T1w T2w --model exports/mdgru
      mdgru-localize bids /data/study out group
    """
    ctx = click.get_current_context()
    requested = None if landmarks in (None, ALL_LANDMARKS) else landmarks
    suffixes = tuple(dict.fromkeys(suffixes)) or ("T1w",)
    if analysis_level == "group":
        given = [
            param.opts[0] for param in ctx.command.params
            if param.name in PARTICIPANT_ONLY and ctx.get_parameter_source(param.name) == ParameterSource.COMMANDLINE
        ]  # fmt: skip
        if given:
            raise click.UsageError(
                f"{', '.join(given)}: only for the participant level (the group level reads its outputs)"
            )
        _group(bids_dir, output_dir, participants, sessions, suffixes)
    else:
        _participant(bids_dir, output_dir, participants, sessions, suffixes, model_dir, overwrite, requested,
                     (min_confidence, max_disagreement_mm, max_coarse_shift_mm))  # fmt: skip


# predict's definitions of these three, so that both commands take them alike
bids.params.extend(_predict_option(name) for name in ("landmarks", *QUALITY_OPTIONS))


def _participant(
    bids_dir: Path,
    output_dir: Path,
    participants: tuple[str, ...],
    sessions: tuple[str, ...],
    suffixes: tuple[str, ...],
    model_dir: Path | None,
    overwrite: bool,
    requested: tuple[str, ...] | None,
    quality_options: tuple[float, float, float],
) -> None:
    from contextlib import ExitStack

    from tqdm import tqdm

    from mdgru_keras.bids import derivatives
    from mdgru_keras.bids.layout import find_scans
    from mdgru_keras.errors import InputError
    from mdgru_keras.io.nifti import world_space_note
    from mdgru_keras.prediction import QualityThresholds, predict_scan
    from mdgru_keras.serving import ServingError

    selection = find_scans(bids_dir, participants, sessions, suffixes)
    if model_dir is None:
        model_dir = shipped_model_dir()
    _check_landmarks(model_dir, requested)
    settings = derivatives.Settings(
        derivatives.describe_model(model_dir), requested, QualityThresholds(*quality_options)
    )
    derivatives.prepare_output_dir(output_dir, bids_dir)
    planned, conflicts = derivatives.plan_outputs(output_dir, selection.scans)
    for label in selection.without_scans:
        click.echo(f"warning: sub-{label}: no {' or '.join(suffixes)} image", err=True)

    written, skipped, flagged = 0, 0, 0
    failed: list[tuple[str, str]] = []
    touched: set[str] = set()  # participants with a scan written or failed in this run
    total = len(selection.scans)
    with ExitStack() as stack:
        progress = stack.enter_context(tqdm(total=total, unit="scan", file=sys.stderr, disable=None, desc="bids"))
        client = None

        def fail(image: Path, problem: str) -> None:
            failed.append((str(image), problem))
            progress.write(f"error: {image}: {problem}", file=sys.stderr)

        for scan, problem in conflicts:
            fail(scan.path, problem)
            progress.update(1)
        for outputs in planned:
            scan = outputs.scan
            document = None if overwrite else derivatives.read_complete(outputs)
            if document is not None:
                if differences := settings.differences(document):
                    fail(outputs.sidecar, f"made with other settings ({'; '.join(differences)}); give --overwrite "
                                          "to replace it")  # fmt: skip
                else:
                    skipped += 1
                progress.update(1)
                continue
            if client is None:  # the model is loaded once, when the first scan needs it
                from mdgru_keras.commands._options import load_for_inference

                client = stack.enter_context(load_for_inference(model_dir))
            try:
                prediction = predict_scan(client, scan.path)
                if requested is not None:
                    prediction = prediction.select(select_landmarks(requested, prediction.landmark_names))
                derivatives.write_scan_outputs(outputs, prediction, settings)
            except (InputError, ServingError, ValueError) as error:  # ValueError: non-finite values to write
                predict_command._show_traceback(error, progress)
                problem = str(error).removeprefix(f"{scan.path}: ")
                derivatives.record_failure(outputs, problem)
                fail(scan.path, problem)
            else:
                written += 1
                if note := world_space_note(scan.path):
                    progress.write(f"warning: {scan.path}: {note}", file=sys.stderr)
                if warning := prediction.warning(settings.thresholds):
                    progress.write(f"warning: {warning}", file=sys.stderr)
                    flagged += 1
            progress.update(1)
            touched.add(scan.participant_id)

    pages = _participant_pages(output_dir, planned, touched, settings, fail)
    summary = [f"{skipped} already complete"] if skipped else []
    if flagged:
        summary.append(f"{_count(flagged, 'scan')} with flagged landmarks (see warnings)")
    if failed:
        summary.append(f"{len(failed)} failed: {', '.join(path for path, _ in failed)}")
    done = f"Wrote {written} of {total} scans" + (f" and {_count(pages, 'QC page')} (sub-*.html)" if pages else "")
    click.echo(f"{done} to {output_dir}" + (f" ({'; '.join(summary)})" if summary else ""))
    if failed:
        sys.exit(1)


def _participant_pages(output_dir: Path, planned, touched: set[str], settings, fail) -> int:
    """The QC page of every participant with a scan written or failed in this run, or without a page yet;
    returns how many were written (a page that cannot be written is a failure, reported by ``fail``)."""
    from mdgru_keras.bids.reports import participant_page, write_participant_report
    from mdgru_keras.errors import InputError

    participants = sorted({outputs.scan.participant_id for outputs in planned})
    written = 0
    for participant in participants:
        if participant not in touched and participant_page(output_dir, participant).is_file():
            continue
        try:
            write_participant_report(output_dir, participant, planned, settings.thresholds, settings.model)
        except (InputError, OSError, ValueError) as error:
            fail(participant_page(output_dir, participant), f"QC page: {error}")
        else:
            written += 1
    return written


def _count(number: int, what: str) -> str:
    return f"{number} {what}{'s' if number != 1 else ''}"


def _check_landmarks(model_dir: Path, requested: tuple[str, ...] | None) -> None:
    """``--landmarks`` against the export's ``model_info.json``, before the model is loaded (as predict does)."""
    if requested is None:
        return
    from mdgru_keras.export import read_model_info
    from mdgru_keras.serving.servable import resolve_version_dir

    known = read_model_info(resolve_version_dir(model_dir)[0]).get("landmarks")
    if known is not None:
        select_landmarks(requested, known)


def _group(
    bids_dir: Path,
    output_dir: Path,
    participants: tuple[str, ...],
    sessions: tuple[str, ...],
    suffixes: tuple[str, ...],
) -> None:
    from mdgru_keras.bids import derivatives
    from mdgru_keras.bids.layout import check_bids_dir, find_scans

    check_bids_dir(bids_dir)
    derivatives.check_output_dir(output_dir)
    selection = find_scans(bids_dir, participants, sessions, suffixes)
    result = derivatives.collect_group(output_dir, selection)
    for scan, problem in result.failed:
        click.echo(f"error: {scan.path}: {problem}", err=True)
    table, summary = derivatives.write_group(output_dir, result)
    from mdgru_keras.bids.reports import write_group_report

    report = write_group_report(output_dir, result)
    scans = len(selection.scans) - len(result.failed)
    counts = ", ".join(
        _count(number, what)
        for number, what in ((len(result.statuses), "participant"), (scans, "scan"), (len(result.rows), "landmark"))
    )
    if result.failed:
        counts += f"; {len(result.failed_participants)} failed: {', '.join(result.failed_participants)}"
    click.echo(f"Wrote {table}, {summary} and {report} ({counts})")
    if result.failed:
        sys.exit(1)
