"""``mdgru-localize synth``: a synthetic labelled population from one template scan."""

from __future__ import annotations

from pathlib import Path

import click

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command("synth")
@click.option("--image", type=_FILE, required=True, help="Template scan (NIfTI), e.g. the demo-data T1w template.")
@click.option("--landmarks", type=_FILE, required=True, help="Its landmarks (.fcsv, .mrk.json or .csv).")
@click.option("--n", "count", type=click.IntRange(min=1), required=True, help="Number of subjects to write.")
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output directory."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed; the same seed gives the same data.")
@click.option("--image2", type=_FILE, default=None, help="Second template on the same grid (e.g. the T2w template).")
@click.option(
    "--image2-probability",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Chance that a subject is made from --image2.",
)
@click.option(
    "--neck-probability",
    type=click.FloatRange(0, 1),
    default=0.3,
    show_default=True,
    help="Chance of a lowered, taller field of view reaching the neck (else centred on the head).",
)
@click.option(
    "--max-scale",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.10,
    show_default=True,
    help="Head size: each template axis scaled by a factor in [1 - s, 1 + s].",
)
@click.option(
    "--scale-centre",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Mean head size: the --max-scale factors are multiplied by this (e.g. 0.87 with --max-scale 0.03: heads "
    "13 % smaller than the template).",
)
@click.option("--max-rotation-deg", type=click.FloatRange(min=0), default=15.0, show_default=True)
@click.option(
    "--pitch-deg",
    type=(float, float),
    default=None,
    metavar="LOW HIGH",
    help="Tilt about the left-right axis between LOW and HIGH degrees (either sign) instead of up to "
    "--max-rotation-deg: heads tilted more than the training heads.",
)
@click.option("--max-translation-mm", type=click.FloatRange(min=0), default=20.0, show_default=True)
@click.option(
    "--elastic-mm",
    type=click.FloatRange(min=0),
    default=3.0,
    show_default=True,
    help="Std of the fine elastic displacement (per component, mm); 0 for none.",
)
@click.option(
    "--elastic-smoothness-mm",
    type=click.FloatRange(min=1),
    default=20.0,
    show_default=True,
    help="Correlation length of the fine elastic displacement.",
)
@click.option(
    "--max-elastic-large-mm",
    type=click.FloatRange(min=0),
    default=4.0,
    show_default=True,
    help="Largest std of the large-scale elastic displacement (per subject uniform in [0, this]); 0 for none.",
)
@click.option(
    "--elastic-large-smoothness-mm",
    type=click.FloatRange(min=1),
    default=50.0,
    show_default=True,
    help="Correlation length of the large-scale elastic displacement.",
)
@click.option("--spacing-mm", type=click.FloatRange(min=0.1), default=1.0, show_default=True, help="Voxel size.")
@click.option(
    "--lowres-probability",
    type=click.FloatRange(0, 1),
    default=0.3,
    show_default=True,
    help="Chance of an isotropic voxel size from --lowres-spacing-mm instead of --spacing-mm.",
)
@click.option("--lowres-spacing-mm", type=(float, float), default=(1.0, 1.6), show_default=True)
@click.option(
    "--anisotropic-probability",
    type=click.FloatRange(0, 1),
    default=0.25,
    show_default=True,
    help="Chance that one axis gets thick slices (see --slice-thickness-mm).",
)
@click.option("--slice-thickness-mm", type=(float, float), default=(1.5, 4.0), show_default=True)
@click.option(
    "--max-contrast-log-slope",
    type=click.FloatRange(min=0),
    default=0.4,
    show_default=True,
    help="Tissue contrast: each segment of a monotone intensity curve (knots at template percentiles) has its "
    "slope multiplied by exp(U[-c, c]).",
)
@click.option(
    "--strong-contrast-probability",
    type=click.FloatRange(0, 1),
    default=0.05,
    show_default=True,
    help="Chance of a random, non-monotone intensity curve instead (never in --family train).",
)
@click.option(
    "--max-log-gamma",
    type=click.FloatRange(min=0),
    default=0.3,
    show_default=True,
    help="Gamma exp(U[-g, g]) on intensities normalized to the 99th percentile.",
)
@click.option(
    "--sharpen-probability",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Chance of an unsharp mask (--max-sharpen), else a Gaussian blur (--max-blur-mm).",
)
@click.option("--max-sharpen", type=click.FloatRange(min=0), default=1.0, show_default=True, help="Unsharp amount.")
@click.option(
    "--max-blur-mm", type=click.FloatRange(min=0), default=1.2, show_default=True, help="Largest blur sigma (mm)."
)
@click.option(
    "--bias", "bias_std", type=click.FloatRange(min=0), default=0.15, show_default=True, help="Bias field strength."
)
@click.option(
    "--noise",
    "max_noise",
    type=click.FloatRange(min=0),
    default=0.06,
    show_default=True,
    help="Largest Rician noise sigma, as a fraction of the 99th intensity percentile.",
)
@click.option(
    "--family",
    type=click.Choice(["all", "train", "heldout"]),
    default="all",
    show_default=True,
    help="Generalization check: train draws the lower 60 % of every marked range, heldout the rest and never "
    "seen contrasts (docs/SYNTH.md); all draws whole ranges.",
)
@click.option(
    "--protocol-planes/--tissue-labels",
    default=False,
    show_default=True,
    help="Place RLVAC/LLVAC and RLVPC/LLVPC where a rater following the AFIDs protocol would: in the subject's "
    "coronal plane of AC or PC (perpendicular to its AC-PC line), on the moved ventricle edge. "
    "--tissue-labels: move them with the tissue like every other landmark.",
)
@click.option(
    "--deface",
    is_flag=True,
    default=False,
    help="Remove the face (eyes, nose, mouth, chin: set to 0 after the noise), as defacing tools do with shared "
    "scans; the region is given in MNI152 coordinates (docs/SYNTH.md).",
)
@click.option("--landmark-format", type=click.Choice(["fcsv", "mrk.json", "csv"]), default="fcsv", show_default=True)
@click.option(
    "--gzip", "compress", is_flag=True, help="Write .nii.gz instead of .nii (noisy images shrink ~12 %, 2-3x slower)."
)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Parallel processes.")
def synth(
    image: Path,
    landmarks: Path,
    count: int,
    out_dir: Path,
    seed: int,
    image2: Path | None,
    compress: bool,
    workers: int,
    **ranges: object,
) -> None:
    """Write a synthetic population made from one template scan and its landmarks.

    Every subject is the template with a random head size (--max-scale), a random smooth elastic deformation
    at two scales and a random rigid pose (rotations up to --max-rotation-deg about each axis, translations up
    to --max-translation-mm), with changed tissue contrast and gamma, sharpened or blurred, acquired at 1 mm,
    lower isotropic resolution or with thick slices, through a random field of view (centred on the head, or
    lowered to reach the neck), with a bias field and Rician noise. The landmarks follow the same transform
    exactly (with --protocol-planes, the lateral ventricles' four AFIDs follow the protocol's planes instead).
    With --image2, subjects are mixed from both images (e.g. T1w and T2w). Every range and chance is switched
    off by 0. --family train / heldout write two populations with disjoint ranges, to train on one
    and measure the error on unseen heads with the other (docs/SYNTH.md).

    OUT gets images/ (int16 NIfTI, .nii unless --gzip), landmarks/ (one file per subject, RAS), manifest.csv
    (subject,image,landmarks,split; ready for `mdgru-localize prepare`) and synth.json (what was drawn).

    Example with the demo data (`mdgru-localize demo-data --out demo`):

    \b
      mdgru-localize synth --image demo/tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz
      --image2 demo/tpl-MNI152NLin2009cAsym_res-01_T2w.nii.gz
      --landmarks demo/afids.fcsv --n 40 --out synth --seed 1
    """
    from mdgru_keras.data.synth import SynthOptions, load_template, synthesize_population

    try:
        options = SynthOptions(image_suffix=".nii.gz" if compress else ".nii", **ranges)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    template = load_template(image, landmarks, image2)
    manifest = synthesize_population(template, count, out_dir, seed=seed, options=options, workers=workers)
    click.echo(f"Wrote {count} synthetic subjects to {out_dir} (manifest {manifest}, description {out_dir}/synth.json)")
