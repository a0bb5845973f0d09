"""``mdgru-localize export``: both trained stages as one SavedModel for ``predict`` and TensorFlow Serving."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("export")
@click.option(
    "--coarse",
    "coarse_run",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Training run directory of the coarse stage (config.json, model.keras).",
)
@click.option(
    "--fine",
    "fine_run",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Training run directory of the fine stage (config.json, model.keras).",
)
@click.option(
    "--pretrained",
    default=None,
    help="Instead of --coarse/--fine: write a model shipped with the package (afids32: all 32 AFIDs) as a "
    "TensorFlow Serving SavedModel, e.g. for the official TF Serving image.",
)
@click.option(
    "--weights-from",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Instead of --coarse/--fine: the trained weights of an existing export (its version folder, e.g. "
    "export/mdgru/1), written again with the inference options given here (e.g. fewer fine passes: faster).",
)
@click.option(
    "--out",
    "base_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Base directory of exported models (TF Serving's --model_base_path is OUT/NAME).",
)
@click.option("--name", default="mdgru", show_default=True, help="Model name: the export goes to OUT/NAME/VERSION/.")
@click.option(
    "--version",
    "version",
    type=click.IntRange(min=1),
    default=None,
    help="Version number (default: one more than the newest in OUT/NAME, 1 for a new model). "
    "An existing version is never overwritten.",
)
@click.option(
    "--fine-batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="At most this many fine windows through the fine network at once (default: all landmarks at once; "
    "lower it to bound memory with many landmarks and the paper preset).",
)
@click.option(
    "--fine-passes",
    type=click.IntRange(min=1),
    default=None,
    help="Fine passes: 1 centres the fine windows on the coarse estimates (the paper); 2 runs the fine stage "
    "again with windows centred on the first fine estimates, and so on. Default: 1, or one per --pass-views.",
)
@click.option(
    "--flip-average/--no-flip-average",
    default=False,
    show_default=True,
    help="Also run the fine stage on the left-right mirrored scan (left and right landmarks swapped, e.g. RMB "
    "and LMB) and average both estimates: more accurate, twice the fine stage's time. The model then reports "
    "flip_disagreement_mm, the distance between the two estimates, per landmark.",
)
@click.option(
    "--average-passes/--no-average-passes",
    default=False,
    show_default=True,
    help="With --fine-passes 2 or more: report the mean of all passes' estimates (each pass centred on the "
    "mean of the passes before it) instead of the last pass's.",
)
@click.option(
    "--pass-views",
    type=str,
    default=None,
    metavar="VIEW,...",
    help="What each fine pass looks at, one of scan, mirror (the left-right mirror image alone, its estimates "
    "mapped back) or both (flip-averaged) per pass, e.g. scan,mirror,scan: an ensemble with mirror-image members "
    "for the cost of single views. Sets --fine-passes; the last pass must see the scan. Default: both for every "
    "pass with --flip-average, scan without.",
)
@click.option(
    "--share-refined-windows",
    "refine_share_margin_voxel",
    type=click.IntRange(min=0),
    default=None,
    metavar="VOXELS",
    help="With --fine-passes 2 or more: from the second pass on, landmarks whose estimates fit into one fine "
    "window at least VOXELS from its faces share it (the fine network's trunk runs once per window). "
    "Default: one window per landmark in every pass.",
)
@click.option(
    "--pooled-decoding",
    is_flag=True,
    help="Answer with the fine classes pooled to one per voxel before the parabola (evaluate's 'fine n=1 + "
    "parabola' row) instead of the n classes per voxel.",
)
@click.option(
    "--protocol-planes/--no-protocol-planes",
    default=False,
    show_default=True,
    help="Move the lateral ventricles' AFIDs (RLVAC, LLVAC, RLVPC, LLVPC) along the estimated AC-PC line onto "
    "the coronal plane of the estimated AC or PC, where the AFIDs protocol places them. Needs AC and PC.",
)
@click.option(
    "--shape-prior",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    metavar="LANDMARKS",
    help="With --fine-passes 2 or more: reference positions of the model's landmarks (.fcsv, .mrk.json or .csv, "
    "e.g. the template's AFIDs). Before each later pass the estimates are compared with the reference mapped "
    "by the robust affine fit to them; a landmark farther than --shape-prior-tolerance from it gets its next "
    "window centred there (it was most likely outside its first window) and leaves the mean of the passes.",
)
@click.option(
    "--shape-prior-tolerance",
    "shape_prior_tolerance_mm",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,  # geometry.shape_prior.TOLERANCE_MM, written out: the command line starts without NumPy
    show_default=True,
    metavar="MM",
    help="How far an estimate may lie from the shape prior before its next window is centred on the prior "
    "(gross errors only: affine registration of a template places AFIDs 3-4 mm from the truth on average).",
)
@click.option(
    "--aligned-windows",
    type=click.Choice(["rotation", "affine"]),
    default=None,
    help="With --shape-prior: cut the windows of every pass after the first along the axes of the shape "
    "prior's fit instead of the scan's: 'rotation' turns them with the head (the fine network sees every head "
    "in the reference's pose), 'affine' also scales and shears them to the reference's size. Default: the "
    "scan's axes.",
)
def export(
    coarse_run: Path | None,
    fine_run: Path | None,
    pretrained: str | None,
    weights_from: Path | None,
    base_dir: Path,
    name: str,
    version: int | None,
    fine_batch_size: int | None,
    fine_passes: int | None,
    flip_average: bool,
    average_passes: bool,
    protocol_planes: bool,
    pass_views: str | None,
    refine_share_margin_voxel: int | None,
    pooled_decoding: bool,
    shape_prior: Path | None,
    shape_prior_tolerance_mm: float,
    aligned_windows: str | None,
) -> None:
    """Export the coarse and the fine stage as ONE SavedModel that does the whole localization.

    The SavedModel takes a scan as its NIfTI file stores it (array and voxel-to-world affine, any
    orientation and spacing), reorients and resamples it to the model's grid, runs both stages and returns
    each landmark in RAS millimetres and in the file's voxels. It is written to OUT/NAME/VERSION/, the
    layout TensorFlow Serving loads (a new version is picked up by a running server), in one atomic step.
    Signatures: serving_default (float32 volume), localize_int16 (int16 volume), coarse (coarse stage only);
    assets/model_info.json records both stages' configs, the landmarks, the training data and the version.

    Example, then serve it (see docs/SERVING.md) or predict with it:

    \b
      mdgru-localize export --coarse runs/coarse --fine runs/fine --out export --name mdgru
      mdgru-localize predict scan.nii.gz --model export/mdgru --format fcsv --out scan.fcsv
      mdgru-localize export --pretrained afids32 --out models --name afids32
      mdgru-localize export --weights-from export/mdgru/1 --fine-passes 2 --out export --name mdgru
    """
    import time

    from mdgru_keras.export import export_again, export_runs, next_version, read_model_info

    sources = [given for given, was_given in (("--coarse/--fine", coarse_run is not None or fine_run is not None),
                                               ("--pretrained", pretrained is not None),
                                               ("--weights-from", weights_from is not None)) if was_given]
    if len(sources) > 1:
        raise click.UsageError(
            f"give one of --coarse and --fine, --pretrained or --weights-from, not {' and '.join(sources)}"
        )
    if pretrained is not None:
        from mdgru_keras.pretrained import copy_pretrained

        version_dir = copy_pretrained(pretrained, base_dir, name, version)
        click.echo(f"Wrote SavedModel {version_dir} (pretrained model {pretrained})")
        return
    if weights_from is None and (coarse_run is None or fine_run is None):
        raise click.UsageError("give --coarse and --fine (training runs), --pretrained NAME or --weights-from DIR")
    views = None if pass_views is None else [view.strip() for view in pass_views.split(",")]
    if views is not None:
        # localizer.PASS_VIEWS, written out: the command line starts without TensorFlow
        unknown = sorted({view for view in views if view not in ("scan", "mirror", "both")})
        if unknown:
            raise click.BadParameter(f"{', '.join(unknown)}: each view is scan, mirror or both",
                                     param_hint="--pass-views")
        fine_passes = fine_passes if fine_passes is not None else len(views)
    fine_passes = 1 if fine_passes is None else fine_passes
    inference = {"fine_passes": fine_passes, "flip_average": flip_average, "average_passes": average_passes,
                 "protocol_planes": protocol_planes, "pass_views": views,
                 "refine_share_margin_voxel": refine_share_margin_voxel, "pooled_decoding": pooled_decoding,
                 "shape_prior": shape_prior, "shape_prior_tolerance_mm": shape_prior_tolerance_mm,
                 "aligned_windows": aligned_windows}
    started = time.monotonic()
    shown_version = version or next_version(base_dir / name)
    source = f"{weights_from} (weights)" if weights_from else f"{coarse_run} (coarse) and {fine_run} (fine)"
    click.echo(f"Exporting {source} as {name} version {shown_version} ...", err=True)
    if weights_from is not None:
        version_dir = export_again(weights_from, base_dir, name, version, fine_batch_size, **inference)
    else:
        version_dir = export_runs(coarse_run, fine_run, base_dir, name, version, fine_batch_size, **inference)
    info = read_model_info(version_dir)
    landmarks = info.get("landmarks", [])
    click.echo(
        f"Wrote SavedModel {version_dir} (version {info.get('version')}, {len(landmarks)} landmarks: "
        f"{', '.join(landmarks[:6])}{' ...' if len(landmarks) > 6 else ''}; {time.monotonic() - started:.0f} s)"
    )
