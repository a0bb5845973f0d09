"""``mdgru-localize prepare``: a manifest of scans and landmark files -> a TFRecord training dataset."""

from __future__ import annotations

from pathlib import Path

import click

from mdgru_keras.commands._options import ALL_LANDMARKS, LANDMARK_LIST, select_landmarks


@click.command("prepare")
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for the dataset (created; must not exist or be empty unless --overwrite).")
@click.option("--landmarks", type=LANDMARK_LIST, default=None,
              help="Comma-separated landmark names to keep, in this order, or 'all' (the default): every "
                   "landmark of the first subject's file (a name it lacks is a usage error). Every subject "
                   "must have all of them.")
@click.option("--spacing", "spacing_mm", type=click.FloatRange(min=0.0, min_open=True), default=1.0,
              show_default=True, help="Resample every scan to this isotropic voxel size (mm); the model "
                                      "config's spacing_mm must match.")
@click.option("--val-fraction", type=click.FloatRange(0.0, 1.0), default=0.1, show_default=True,
              help="Fraction of the subjects without a split in the manifest that go to validation.")
@click.option("--test-fraction", type=click.FloatRange(0.0, 1.0), default=0.1, show_default=True,
              help="Fraction of the subjects without a split in the manifest that go to test.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random split.")
@click.option("--shard-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Subjects per TFRecord file (about 17 MB each for a 193x229x193 scan).")
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset in --out (only once the new one "
                                                "is complete).")
def prepare(manifest: Path, out_dir: Path, landmarks: tuple[str, ...] | None, spacing_mm: float,
            val_fraction: float, test_fraction: float, seed: int, shard_size: int, overwrite: bool) -> None:
    """Build a training dataset from MANIFEST, a CSV file with one subject per line.

    The header names the columns subject,image,landmarks and optionally split (train, val or test);
    image is a NIfTI scan, landmarks a 3D Slicer .fcsv/.mrk.json or a name,x,y,z .csv file (RAS mm).
    Paths are relative to the manifest. Example:

    \b
      subject,image,landmarks,split
      sub-01,scans/sub-01_T1w.nii.gz,landmarks/sub-01.fcsv,
      sub-02,scans/sub-02_T1w.nii.gz,landmarks/sub-02.fcsv,test

    Each scan is reoriented to RAS and resampled to --spacing; landmarks must lie inside their scan. A scan
    whose header's sform and qform disagree gets a warning line: it is read by its sform, and landmarks placed
    in 3D Slicer may be in the qform's space.
    Subjects without a split are divided at random (--seed) so that no subject is in two splits. The result,
    OUT/dataset.json and OUT/{split}-*.tfrecord, is written to a temporary directory and moved into place
    only when complete: a bad file stops with a one-line error naming it and leaves nothing behind.

    Next step: train on OUT with `mdgru-localize train` (see its --help).
    """
    from mdgru_keras.data.records import first_subject_landmarks, prepare_dataset

    if val_fraction + test_fraction > 1.0:
        raise click.BadParameter("--val-fraction plus --test-fraction must be at most 1")
    if landmarks == ALL_LANDMARKS:
        landmarks = None
    if landmarks is not None:  # names the first subject's file lacks: a usage error, before any scan is read
        path, known = first_subject_landmarks(manifest, val_fraction, test_fraction, seed)
        select_landmarks(landmarks, known, owner=f"the first subject's file {path}")
    description = prepare_dataset(manifest, out_dir, landmarks=landmarks, spacing_mm=spacing_mm,
                                  val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                                  shard_size=shard_size, overwrite=overwrite, progress=True)
    counts = ", ".join(f"{split} {count}" for split, count in description["counts"].items())
    shards = sum(len(split["shards"]) for split in description["splits"].values())
    click.echo(f"Wrote {sum(description['counts'].values())} subjects ({counts}), "
               f"{len(description['landmarks'])} landmarks, to {out_dir}: dataset.json and {shards} shard(s)")
