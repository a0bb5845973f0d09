"""``mdgru-localize train-unet``: the 3D U-Net baseline's fine stage, trained for a wall-clock budget."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("train-unet")
@click.option("--config", "config_name", required=True, metavar="CONFIG",
              help="A preset name (paper, cpu, afids, tiny) or a YAML config file: the same as the MD-GRU fine "
              "stage's, so the U-Net sees the same windows (fine.window_size), landmarks, spacing and augmentation.")
@click.option("--data", "dataset_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="A dataset made by `mdgru-localize prepare` (its 'train' split is used).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The model file to write (.keras); a summary goes next to it as .json.")
@click.option("--budget-seconds", type=click.FloatRange(min=0.0, min_open=True), required=True,
              help="Wall-clock training time (tracing the graph included): give the fine stage's, for a fair "
              "comparison.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the weights and the data order.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_unet(config_name: str, dataset_dir: Path, out_path: Path, budget_seconds: float, seed: int,
               quiet: bool) -> None:
    """Train the 3D U-Net heatmap baseline on a prepared dataset for a fixed wall-clock budget.

    The U-Net replaces only the fine stage: it is trained on the same fine windows as the MD-GRU fine
    network (same crops, preprocessing and augmentation from the config) to regress a Gaussian heatmap of
    the landmark, with Adam, until --budget-seconds have passed. `mdgru-localize evaluate --baseline unet
    --unet-model OUT` then runs it around the MD-GRU model's coarse estimates (docs/BASELINES.md). Example,
    with the fine stage's budget of one hour:

    \b
      mdgru-localize train-unet --config cpu --data demo/dataset --out runs/unet.keras --budget-seconds 3600
    """
    if out_path.suffix != ".keras":
        raise click.BadParameter(f"{out_path}: the U-Net is saved in Keras format; use a .keras name",
                                 param_hint="--out")

    import json

    from mdgru_keras.baselines.unet import fit_unet
    from mdgru_keras.config import load_config
    from mdgru_keras.io import write_text_atomic

    config = load_config(config_name)
    summary = fit_unet(dataset_dir, config, budget_seconds, out_path, seed=seed, progress=not quiet)
    # Record what evaluate must match (landmark order = heatmap channels, window size, spacing, high-pass).
    summary_path = out_path.with_suffix(".json")
    record = {**summary.to_dict(), "config": config.to_dict(), "dataset": str(dataset_dir.resolve()),
              "budget_seconds": budget_seconds, "seed": seed}
    write_text_atomic(summary_path, json.dumps(record, indent=2, allow_nan=False) + "\n")
    click.echo(f"Wrote {out_path} and {summary_path} ({summary.steps} steps in {summary.seconds:.0f} s, "
               f"loss {summary.first_loss:.4g} -> {summary.final_loss:.4g})")
