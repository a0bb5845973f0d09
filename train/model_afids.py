"""``make model-afids``: train the shipped 32-AFIDs model from scratch, resumably, bounded by steps.

Every step writes its result atomically and is skipped when its result exists, so the same command continues
after any interruption (a killed training resumes from its newest checkpoint):

1. demo data: the MNI152NLin2009cAsym T1w/T2w templates with the 32 AFIDs (``mdgru-localize demo-data``);
2. a synthetic training population from them (``mdgru-localize synth``, seed :data:`TRAIN_SEED`);
3. TFRecords (``mdgru-localize prepare``);
4. the coarse stage, then the fine stage (``mdgru_keras/configs/afids.yaml``; :data:`COARSE_EPOCHS` and
   :data:`FINE_EPOCHS` epochs of a fixed number of steps: every machine makes the same model, a slower one takes
   longer);
5. one SavedModel (``mdgru-localize export`` with :func:`export_options`);
6. installed as the package's pretrained model (:mod:`mdgru_keras.pretrained`): the SavedModel's files plus a
   manifest of their SHA-256, replaced in one step.

Run it as ``make model-afids`` or ``python -m train.model_afids --work runs/model-afids``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "mdgru_keras" / "configs" / "afids.yaml"
TRAIN_SUBJECTS = 88  # 80 training and 8 validation subjects
TRAIN_SEED = 101
COARSE_EPOCHS = 5
FINE_EPOCHS = 20
# How the SavedModel runs the fine stage (mdgru_keras.localizer): three passes, each centred on the mean of the
# estimates before it (after the shape prior's check, export_options): the first on the scan, one window per
# landmark centred on its coarse estimate; the second on the scan's left-right mirror image alone, the third on the
# scan, both with landmarks sharing windows with 4 voxels to spare; the answer is the mean of the three, each
# decoded with the classes pooled to one per voxel. Chosen on 16 synthetic heads apart from the benchmark's (seeds
# 301 and 302, docs/MODEL_CARD.md, "A third pass"): 1.02 / 1.18 mm against 1.10 / 1.27 for the schedule before
# (the scan, then a flip-averaged pass: as many fine windows), while a flip-averaged third pass gave 1.00 / 1.16
# for a third more windows. The pooled decoding was 0.07-0.09 mm better than the n = 4 one for every schedule.
EXPORT_OPTIONS = ("--pass-views", "scan,mirror,scan", "--average-passes",
                  "--share-refined-windows", "4", "--pooled-decoding")


def export_options(config_path: Path, fiducials: Path) -> list[str]:
    """:data:`EXPORT_OPTIONS`; ``--protocol-planes`` when the config's landmarks include AC, PC and the lateral
    ventricles' AFIDs, and the template's landmarks ``fiducials`` as ``--shape-prior`` when there are enough
    landmarks for its affine fit (the shipped model's 32 are; a test's one-landmark config is not), with the
    second pass's windows turned with the head (``--aligned-windows rotation``: chosen on the selection heads,
    docs/MODEL_CARD.md, "Windows turned with the head")."""
    from mdgru_keras.config import load_config
    from mdgru_keras.geometry.protocol_planes import plane_constraints
    from mdgru_keras.geometry.shape_prior import MIN_SHAPE_PRIOR_LANDMARKS

    landmarks = load_config(config_path).landmarks
    planes = ["--protocol-planes"] if plane_constraints(landmarks) else []
    prior = (["--shape-prior", str(fiducials), "--aligned-windows", "rotation"]
             if len(landmarks) >= MIN_SHAPE_PRIOR_LANDMARKS else [])
    return [*EXPORT_OPTIONS, *planes, *prior]


def recorded_options(options: list[str]) -> list[str]:
    """``options`` as the manifest records them: paths inside the repository relative to it (no machine's
    folders in the package)."""
    recorded = []
    for option in options:
        path = Path(option)
        recorded.append(str(path.relative_to(REPO)) if path.is_absolute() and path.is_relative_to(REPO) else option)
    return recorded


def _cli() -> list[str]:
    return [sys.executable, "-m", "mdgru_keras.cli"]  # the CLI of this interpreter's environment


def _step(title: str, done: Path | None, command: list[str]) -> None:
    """Run ``command`` unless ``done`` exists; print what happens and how long it took."""
    if done is not None and done.exists():
        print(f"[model-afids] {title}: done already ({done})", flush=True)
        return
    print(f"[model-afids] {title} ...\n  $ {' '.join(command)}", flush=True)
    started = time.monotonic()
    subprocess.run(command, check=True)
    print(f"[model-afids] {title}: {time.monotonic() - started:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "model-afids", help="working folder")
    parser.add_argument("--demo", type=Path, default=REPO / "demo", help="demo data folder")
    parser.add_argument("--coarse-epochs", type=int, default=COARSE_EPOCHS)
    parser.add_argument("--fine-epochs", type=int, default=FINE_EPOCHS)
    parser.add_argument("--subjects", type=int, default=TRAIN_SUBJECTS)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--t1", type=Path, default=None, help="template T1w (default: the demo data's)")
    parser.add_argument("--t2", type=Path, default=None, help="template T2w (default: the demo data's)")
    parser.add_argument("--fiducials", type=Path, default=None, help="template landmarks (default: demo's)")
    parser.add_argument("--synth-args", default="", help="extra `mdgru-localize synth` options (tests)")
    parser.add_argument("--no-install", action="store_true", help="leave the package's pretrained model alone")
    parser.add_argument("--export-again", action="store_true",
                        help="no training: export the installed model's trained weights again with the current "
                             "export options (after a change of them) and install that")
    args = parser.parse_args(argv)
    if args.export_again:
        return export_again(args)
    work, demo = args.work.resolve(), args.demo.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    t1 = args.t1 or demo / "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"
    t2 = args.t2 or demo / "tpl-MNI152NLin2009cAsym_res-01_T2w.nii.gz"
    fiducials = _fiducials(args)
    if args.t1 is None:
        _step("demo data", demo / "afids.fcsv", [*_cli(), "demo-data", "--out", str(demo)])
    _step(
        "synthetic population",
        work / "population" / "manifest.csv",
        [*_cli(), "synth", "--image", str(t1), "--image2", str(t2), "--landmarks", str(fiducials),
         "--n", str(args.subjects), "--seed", str(TRAIN_SEED), "--workers", "2", "--out", str(work / "population"),
         *shlex.split(args.synth_args)],
    )
    _step(
        "TFRecords",
        work / "dataset" / "dataset.json",
        [*_cli(), "prepare", str(work / "population" / "manifest.csv"), "--out", str(work / "dataset"),
         "--val-fraction", "0.09", "--test-fraction", "0", "--overwrite"],
    )
    for stage, epochs in (("coarse", args.coarse_epochs), ("fine", args.fine_epochs)):
        # --resume continues a killed run from its newest checkpoint, or starts one; a finished run returns at once
        _step(
            f"{stage} stage ({epochs} epochs)",
            None,
            [*_cli(), "train", "--stage", stage, "--config", str(args.config),
             "--data", str(work / "dataset"), "--out", str(work / stage), "--epochs", str(epochs), "--resume"],
        )
    export_dir = work / "export" / "afids32" / "1"
    _step(
        "SavedModel",
        export_dir,
        [*_cli(), "export", "--coarse", str(work / "coarse"), "--fine", str(work / "fine"),
         "--out", str(work / "export"), "--name", "afids32", "--version", "1",
         *export_options(args.config, fiducials)],
    )
    if not args.no_install:
        from mdgru_keras.pretrained import install_pretrained

        target = install_pretrained("afids32", export_dir, recipe=_recipe(work, args, fiducials))
        size_mb = sum(p.stat().st_size for p in target.rglob("*") if p.is_file()) / 1e6
        print(f"[model-afids] installed {target} ({size_mb:.1f} MB)", flush=True)
    print(f"[model-afids] done in {time.monotonic() - started:.0f} s", flush=True)
    shutil.rmtree(work / "tmp", ignore_errors=True)
    return 0


def export_again(args: argparse.Namespace) -> int:
    """``--export-again``: the installed model's weights through ``export --weights-from`` with
    :func:`export_options`, installed with its recipe's training record kept and its export options updated."""
    from mdgru_keras.pretrained import install_pretrained, pretrained_model_dir, read_manifest

    work = args.work.resolve() / "export-again"
    shutil.rmtree(work, ignore_errors=True)
    source = pretrained_model_dir("afids32")
    recipe = read_manifest("afids32")["recipe"]
    options = export_options(args.config, _fiducials(args))
    _step("SavedModel from the installed weights", None,
          [*_cli(), "export", "--weights-from", str(source), "--out", str(work), "--name", "afids32", "--version", "1",
           *options])  # fmt: skip
    if not args.no_install:
        target = install_pretrained("afids32", work / "afids32" / "1",
                                    recipe={**recipe, "export_options": recorded_options(options)})
        print(f"[model-afids] installed {target}", flush=True)
    return 0


def _fiducials(args: argparse.Namespace) -> Path:
    """The template's landmark file: ``--fiducials``, else the demo data's."""
    return args.fiducials or args.demo.resolve() / "afids.fcsv"


def _recipe(work: Path, args: argparse.Namespace, fiducials: Path) -> dict:
    """What the manifest records about how the model was made: the command's settings and each stage's run."""
    recipe = {
        "command": "make model-afids",
        "config": Path(args.config).name,
        "subjects": args.subjects,
        "population_seed": TRAIN_SEED,
        "epochs": {"coarse": args.coarse_epochs, "fine": args.fine_epochs},
        "export_options": recorded_options(export_options(args.config, fiducials)),
    }
    for stage in ("coarse", "fine"):
        path = work / stage / "summary.json"
        if path.is_file():
            summary = json.loads(path.read_text())
            last = summary.get("last_validation") or {}
            recipe[stage] = {
                "steps": summary.get("step"),
                "validation_error_mm_mean": last.get("val_error_mm_mean"),
                "validation_error_mm_median": last.get("val_error_mm_median"),
                "training_seconds": last.get("elapsed_s"),
            }
    return recipe


if __name__ == "__main__":
    raise SystemExit(main())
