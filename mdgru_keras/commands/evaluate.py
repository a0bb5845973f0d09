"""``mdgru-localize evaluate``: localization errors of an export (and baselines) against ground truth."""

from __future__ import annotations

import sys
from pathlib import Path

import click

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
BASELINES = ("registration", "ants", "unet")
ANTS_TRANSFORMS = ("SyN", "Affine")  # as mdgru_keras.baselines.ants_registration.ANTS_TRANSFORMS (not imported here)


@click.command("evaluate")
@click.option(
    "--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
    help="Exported model: BASE/NAME (the newest numbered version) or one version folder BASE/NAME/V.",
)
@click.option(
    "--manifest", type=_FILE, required=True,
    help="CSV with header subject,image,landmarks[,split]: a NIfTI scan and its true landmark file (.fcsv, "
    ".mrk.json or .csv, RAS mm) per subject, paths relative to the manifest (as `synth` writes it).",
)
@click.option(
    "--split", type=click.Choice(["train", "val", "test"]), default=None,
    help="Only the subjects of this split (when the manifest's split column is filled; else all subjects).",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the table and every single error as JSON here (for scripts).")
@click.option("--figures", "figure_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write figures of the 3 best and 3 worst cases (subject and landmark) of the model's own "
              "answer here: sagittal and axial slices with ground truth and prediction.")
@click.option("--baseline", "baselines", type=click.Choice(BASELINES), multiple=True,
              help="Also evaluate a baseline on the same subjects (repeatable). registration: the template "
              "registered rigid + affine to each scan (SimpleITK, Mattes MI, metric sampled in the box around "
              "the template's landmarks + 10 mm), row 'registration'; ants: affine + SyN (ANTsPy's 'SyN' preset; "
              "needs pip install 'mdgru-keras[ants]'), row 'ants-syn'; both need --template and "
              "--template-landmarks. unet: needs --unet-model.")
@click.option("--template", type=_FILE, default=None,
              help="--baseline registration / ants: the labelled template scan (NIfTI), e.g. "
              "demo/tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz.")
@click.option("--template-landmarks", type=_FILE, default=None,
              help="--baseline registration / ants: the template's landmarks, e.g. demo/afids.fcsv.")
@click.option("--ants-transform", type=click.Choice(ANTS_TRANSFORMS), default=None,
              help="--baseline ants: SyN (the default: affine then SyN, row 'ants-syn') or Affine (ANTsPy's "
              "affine preset alone, row 'ants-affine').")
@click.option("--unet-model", type=_FILE, default=None,
              help="--baseline unet: a U-Net from `mdgru-localize train-unet` (.keras), run on windows around "
              "the model's coarse estimate.")
@click.option("--n1-model", "n1_model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None,
              help="An export of the same landmarks trained with n = 1 class per voxel (superresolution: 1), as "
              "in the paper's Table 1a: its fine rows become the n = 1 rows, instead of the rows derived from "
              "--model by summing each voxel's n classes.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the registration baselines' random metric sampling.")
def evaluate(
    model_dir: Path,
    manifest: Path,
    split: str | None,
    json_path: Path | None,
    figure_dir: Path | None,
    baselines: tuple[str, ...],
    template: Path | None,
    template_landmarks: Path | None,
    ants_transform: str | None,
    unet_model: Path | None,
    n1_model_dir: Path | None,
    seed: int,
) -> None:
    """Compare an exported model's landmarks with the ground truth of a labelled test set.

    For every subject of --manifest the scan goes through the export (the `decodings` signature) and each
    landmark's Euclidean error is measured in mm and in the scan's voxels. The Markdown table on standard
    output has the rows of the paper's Table 1a: coarse only; fine with n = 1 class per voxel, argmax and +
    parabola (from a separately trained n = 1 export given with --n1-model, else derived from --model by
    summing the n classes of each voxel); fine with the model's n, argmax and + parabola; then the
    baselines. Per row and per landmark: median, mean ± standard deviation (population) and maximum. A
    subject enters only if every method answered for it, so all rows cover the same subjects; a file that
    cannot be read, or a scan the model or a baseline cannot handle, is reported on one line and skipped,
    and the exit status is then 1.

    Examples:

    \b
      mdgru-localize evaluate --model export/mdgru --manifest synth/manifest.csv --json eval.json
      mdgru-localize evaluate --model export/mdgru --manifest data/manifest.csv --split test \\
          --figures eval/figures --baseline registration \\
          --template demo/tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz --template-landmarks demo/afids.fcsv \\
          --baseline ants --baseline unet --unet-model runs/unet.keras
    """
    atlas = [name for name in ("registration", "ants") if name in baselines]
    for name in atlas:
        if template is None or template_landmarks is None:
            raise click.UsageError(f"--baseline {name} needs --template IMAGE and --template-landmarks FILE")
    if "unet" in baselines and unet_model is None:
        raise click.UsageError("--baseline unet needs --unet-model PATH (from `mdgru-localize train-unet`)")
    if (template is not None or template_landmarks is not None) and not atlas:
        raise click.UsageError("--template and --template-landmarks are used only with --baseline registration or ants")
    if ants_transform is not None and "ants" not in baselines:
        raise click.UsageError("--ants-transform is used only with --baseline ants")
    if unet_model is not None and "unet" not in baselines:
        raise click.UsageError("--unet-model is used only with --baseline unet")
    if "ants" in baselines:  # before loading anything: a missing optional dependency is one line
        from mdgru_keras.baselines.ants_registration import import_ants

        try:
            import_ants()
        except ImportError as error:
            raise click.ClickException(str(error)) from None
    from mdgru_keras.io.atomic import check_writable

    # Outputs that cannot be written are refused now, not after every subject was evaluated.
    if json_path is not None:
        check_writable(json_path)
    if figure_dir is not None:
        check_writable(figure_dir, directory=True)

    from tqdm import tqdm

    from mdgru_keras.evaluation import best_and_worst
    from mdgru_keras.evaluation import evaluate as error_table
    from mdgru_keras.evaluation_runner import (
        AntsBaseline,
        ExportedModel,
        RegistrationBaseline,
        UNetBaseline,
        case_figures,
        read_cases,
        run_evaluation,
        use_n1_model,
    )

    cases, note = read_cases(manifest, split)
    model = ExportedModel(model_dir)
    n1_model = None
    if n1_model_dir is not None:
        n1_model = ExportedModel(n1_model_dir)
        use_n1_model(model, n1_model)
    runners = []
    for name in dict.fromkeys(baselines):
        if name == "registration":
            runners.append(RegistrationBaseline(template, template_landmarks, model.landmark_names, seed=seed))
        elif name == "ants":
            transform = ants_transform or "SyN"
            names = model.landmark_names
            runners.append(AntsBaseline(template, template_landmarks, names, seed=seed, transform=transform))
        else:
            runners.append(UNetBaseline(unet_model, model.config))
    if note:
        click.echo(f"note: {note}", err=True)

    with tqdm(total=len(cases), unit="subject", file=sys.stderr, disable=None, desc="evaluate") as progress:

        def on_case(_case, error: str | None) -> None:
            if error is not None:
                progress.write(f"error: {error}", file=sys.stderr)
            progress.update(1)

        run = run_evaluation(cases, model, runners, on_case=on_case, n1_model=n1_model)
    model.close()
    if n1_model is not None:
        n1_model.close()

    sys.stdout.flush()
    table = error_table(run.predictions, run.truths, json_path=None, stream="stdout")
    sys.stdout.flush()

    written, figures = [], []
    if figure_dir is not None and table.errors:
        best_worst = best_and_worst(table.errors, k=3, method=model.main_method)
        figures = case_figures(best_worst, run.images, figure_dir)
        written.append(f"{len(figures)} figures of the best and worst {model.main_method} cases to {figure_dir}")
    if json_path is not None:
        _write_json(json_path, table, run, model, manifest, split, figures)
        written.insert(0, str(json_path))

    summary = f"{len(run.truths)} of {len(cases)} subjects, {len(model.landmark_names)} landmarks"
    summary += f", {len(table.rows)} methods"
    failed_files = list(dict.fromkeys(path for path, _ in run.failed))
    if failed_files:
        summary += f"; {len(failed_files)} failed: {', '.join(failed_files)}"
    what = "Wrote " + " and ".join(written) if written else "Evaluated (table on standard output)"
    click.echo(f"{what} ({summary})", err=True)
    if failed_files:
        sys.exit(1)


def _write_json(json_path, table, run, model, manifest, split, figures) -> None:
    import json

    from mdgru_keras.io import write_text_atomic

    document = table.to_dict()
    document.update(
        {
            "model": str(model.version_dir),
            "model_method": model.main_method,
            "superresolution": model.config.superresolution,
            "manifest": str(manifest),
            "split": split,
            "subjects": sorted(run.images),
            "failed": [{"file": path, "error": error} for path, error in run.failed],
            "median_seconds_per_scan": run.median_seconds(),
            "figures": [str(path) for path in figures],
        }
    )
    write_text_atomic(json_path, json.dumps(document, indent=2, allow_nan=False) + "\n")
