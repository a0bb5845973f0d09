"""``mdgru-localize train``: train the coarse or the fine stage on a prepared dataset."""

from __future__ import annotations

from pathlib import Path

import click

from mdgru_keras.commands._options import ALL_LANDMARKS, LANDMARK_LIST, select_landmarks


@click.command("train")
@click.option("--stage", type=click.Choice(["coarse", "fine"]), required=True,
              help="Which network to train: coarse (whole padded scan) or fine (window around a landmark).")
@click.option("--config", "config_name", required=True, metavar="CONFIG",
              help="A preset name (paper, cpu, afids, tiny) or a YAML config file.")
@click.option("--data", "dataset_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="A dataset made by `mdgru-localize prepare` (with 'train' and 'val' subjects).")
@click.option("--out", "run_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Run directory: config, checkpoints, logs, and at the end model.keras and loss.png.")
@click.option("--landmarks", type=LANDMARK_LIST, default=None,
              help="Comma-separated landmark names to train (all must be in the dataset: a name it lacks is a "
                   "usage error), or 'all' for every landmark of the dataset. Default: the config's landmarks.")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its newest valid checkpoint (exactly where it stopped: "
                   "same optimizer state, step and data position). Starts fresh if --out holds no run.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Train for this many epochs in total (default: training.epochs of the config).")
@click.option("--max-seconds", type=click.FloatRange(min=0.0), default=None,
              help="Stop after this much wall time (checkpoint, validation, model and figure are still "
                   "written; --resume continues). 0: no limit. Default: training.max_train_seconds.")
@click.option("--deterministic/--fast", default=True, show_default=True,
              help="TensorFlow op determinism: a run repeats exactly on the same machine for the same seed.")
@click.option("--quiet", is_flag=True, help="No progress bar and no line per epoch.")
def train(stage: str, config_name: str, dataset_dir: Path, run_dir: Path, landmarks: tuple[str, ...] | None,
          resume: bool, epochs: int | None, max_seconds: float | None, deterministic: bool, quiet: bool) -> None:
    """Train one stage of the landmark localizer on a prepared dataset.

    As in the paper, one epoch is one random sample from every training subject (times
    training.samples_per_subject); batch size, epochs, learning rate and optimizer come from the config.
    After every epoch the model is validated on the 'val' subjects: loss and localization error in mm
    (mean, median, max) through the same decoding as inference. Checkpoints are written every
    training.checkpoint_every_steps steps and after every epoch; the last training.keep_checkpoints and the
    best by validation error are kept. Logs: OUT/log.csv (per epoch), OUT/steps.csv (per step) and
    OUT/tensorboard/. Example, both stages of the CPU preset:

    \b
      mdgru-localize train --stage coarse --config cpu --landmarks PMJ --data demo/dataset --out runs/cpu/coarse
      mdgru-localize train --stage fine --config cpu --landmarks PMJ --data demo/dataset --out runs/cpu/fine

    A killed run continues with the same command plus --resume. Several GPUs: set
    training.distribution: mirrored in the config; several machines: multi_worker and TF_CONFIG on each.
    Next step: mdgru-localize export with both run directories.
    """
    from mdgru_keras.config import load_config

    config = load_config(config_name)
    if landmarks is not None and landmarks != ALL_LANDMARKS:  # ("all",) is every landmark of the dataset
        from mdgru_keras.data.records import read_description

        select_landmarks(landmarks, read_description(dataset_dir)["landmarks"], owner=f"the dataset {dataset_dir}")
    from mdgru_keras.training.stages import train_stage

    result = train_stage(stage, config, dataset_dir, run_dir, resume=resume, epochs=epochs, landmarks=landmarks,
                         max_seconds=max_seconds, deterministic=deterministic, verbose=0 if quiet else 1)
    if result.model_path is None:  # a non-chief worker of a multi-worker run writes nothing
        click.echo(f"worker finished after {result.step} steps")
        return
    validation = result.last_validation or {}
    error_text = (f", validation error {validation['val_error_mm_mean']:.2f} mm mean" if validation else "")
    stopped = " (time budget used up; --resume continues)" if result.stopped_by == "time" else ""
    figure = f" and {result.figure_path}" if result.figure_path else ""
    click.echo(f"wrote {result.model_path}{figure} after {result.step} steps "
               f"({result.epochs_done:.2f} epochs{error_text}){stopped}")
