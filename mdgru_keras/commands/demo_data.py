"""``mdgru-localize demo-data``: fetch the MNI template with its 32 AFIDs landmarks."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("demo-data")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory for the demo files (created if needed).",
)
@click.option(
    "--wheel",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Use this local copy of autoafids-0.1.4-py3-none-any.whl instead of downloading it (offline use).",
)
@click.option("--force", is_flag=True, help="Extract again even if the files are already there and intact.")
def demo_data(out_dir: Path, wheel: Path | None, force: bool) -> None:
    """Fetch the demo data: the MNI ICBM 2009c template (T1w and T2w, 1 mm) and its 32 AFIDs landmarks.

    The files are taken from the autoafids 0.1.4 wheel on PyPI (downloaded with pip, 27 MB, checked against
    a pinned SHA-256) and written to OUT with the wheel's MIT licence and the template's attribution. When
    the files are already in OUT and intact, nothing is downloaded. OUT/afids.fcsv holds the same 32 AFIDs
    labelled with the protocol's short names (AC, PC, ICS, PMJ, ...), the names that --landmarks options take.

    Next step, a synthetic training population from the template:

    \b
      mdgru-localize synth --image OUT/tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz
      --image2 OUT/tpl-MNI152NLin2009cAsym_res-01_T2w.nii.gz
      --landmarks OUT/afids.fcsv --n 40 --out synth/
    """
    from mdgru_keras.data.demo import fetch_demo_data

    result = fetch_demo_data(out_dir, wheel=wheel, force=force)
    how = "extracted" if result.downloaded else "already present, nothing downloaded"
    click.echo(
        f"Wrote demo data to {result.directory} ({how}): {result.t1w.name}, {result.t2w.name}, "
        f"{result.landmarks.name}, {result.named_landmarks.name}, {result.licence.name}, {result.attribution.name}"
    )
