"""What ``pip install`` ships: a wheel built from this source tree holds the one package ``mdgru_keras`` (with
the presets and the pretrained-model files, and none of the checkout's entry-point folders ``train/`` and
``serving/``), and the presets load from an installed copy (not from a checkout), as ``--config cpu`` needs."""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
# train/ and serving/ (entry-point scripts and deployment files) are copied too: the wheel must leave them out.
SOURCES = ("setup.py", "pyproject.toml", "README.md", "mdgru_keras", "train", "serving")
PRESETS = sorted(path.name for path in (ROOT / "mdgru_keras" / "configs").glob("*.yaml"))
# A stand-in for a pretrained model, laid out as `make model-afids` installs one (files nested two levels deep).
FAKE_MODEL = {
    "mdgru_keras/pretrained/afids32/manifest.json": "{}\n",
    "mdgru_keras/pretrained/afids32/saved_model/saved_model.pb": "pb",
    "mdgru_keras/pretrained/afids32/saved_model/variables/variables.index": "index",
    "mdgru_keras/pretrained/afids32/saved_model/variables/variables.data-00000-of-00001": "data",
    "mdgru_keras/pretrained/afids32/saved_model/assets/model_info.json": "{}\n",
}


def _pip(*args: str, cwd: Path) -> None:
    # --no-build-isolation: build with this environment's setuptools and wheel (no network needed)
    result = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of a copy of this source tree (without caches, build outputs or a real pretrained model), with
    the stand-in pretrained model added."""
    directory = tmp_path_factory.mktemp("wheel")
    source = directory / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "afids32")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, source / name)
    for relative, text in FAKE_MODEL.items():
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        (source / relative).write_text(text)
    _pip("wheel", ".", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(directory / "dist"),
         cwd=source)
    (built,) = (directory / "dist").glob("mdgru_keras-*.whl")
    return built


@pytest.mark.slow
def test_the_wheel_holds_the_presets_and_the_pretrained_model_files(wheel: Path) -> None:
    assert PRESETS == ["afids.yaml", "cpu.yaml", "paper.yaml", "tiny.yaml"]
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for preset in PRESETS:
            member = f"mdgru_keras/configs/{preset}"
            assert member in names
            assert archive.read(member) == (ROOT / "mdgru_keras" / "configs" / preset).read_bytes()
    assert set(FAKE_MODEL) <= names
    for module in ("cli.py", "export.py", "training/stages.py", "serving/__init__.py", "serving/grpc_server.py",
                   "commands/serve.py"):
        assert f"mdgru_keras/{module}" in names


def test_the_wheel_holds_mdgru_keras_only(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        top_level = {name.split("/", 1)[0] for name in archive.namelist()}
        dist_info = {name for name in top_level if name.endswith(".dist-info")}
        assert top_level - dist_info == {"mdgru_keras"}
        (info,) = dist_info
        assert archive.read(f"{info}/top_level.txt").decode().split() == ["mdgru_keras"]


@pytest.mark.slow
def test_presets_load_from_an_installed_copy(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    _pip("install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel), cwd=tmp_path)
    script = (
        "import mdgru_keras.config as c\n"
        "print(c.__file__)\n"
        "print(c.load_preset('cpu').name, c.load_config('afids').name, c.load_config('tiny').coarse.padded_size)\n"
        "try:\n"
        "    c.load_config('nonexistent')\n"
        "except c.ConfigError as error:\n"
        "    print(error)\n"
    )
    # cwd and PYTHONPATH away from this checkout: the installed copy is the one imported
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    module, loaded, missing = result.stdout.splitlines()
    assert Path(module).is_relative_to(site)
    assert loaded == "cpu afids 32"
    assert missing == "nonexistent: no such config file or preset (presets: afids, cpu, paper, tiny)"


def test_the_checkout_keeps_configs_as_a_link_to_the_presets() -> None:
    # `--config configs/cpu.yaml` (older commands, shell history) still names the same file
    for preset in PRESETS:
        assert (ROOT / "configs" / preset).resolve() == (ROOT / "mdgru_keras" / "configs" / preset).resolve()


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.slow
def test_the_wheel_trains_exports_and_predicts_from_a_fresh_virtualenv(wheel: Path, tmp_path: Path) -> None:
    """The packaging smoke test: the wheel goes into a new virtual environment outside the checkout, which
    borrows this environment's dependencies (TensorFlow and the rest: a path file, no downloads) but not its
    editable mdgru_keras; its own `mdgru-localize` then prepares a dataset, trains both stages of the tiny
    preset for one epoch, exports them and predicts."""
    import site
    import venv

    from training_helpers import write_raw_population

    fresh = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(fresh)
    python = fresh / "bin" / "python"
    # this environment's pip installs into the new one (it has none of its own); dependencies come next
    _pip("--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel), cwd=tmp_path)
    (fresh_site,) = (fresh / "lib").glob("python3.*/site-packages")
    # a plain path line: the borrowed folder's own .pth files (among them the editable install's finder) are
    # not run, so the only mdgru_keras the new environment sees is the wheel's
    (fresh_site / "borrowed-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    work = tmp_path / "work"
    work.mkdir()

    where = _run([str(python), "-c", "import mdgru_keras; print(mdgru_keras.__file__)"], work, env)
    assert Path(where.strip()).is_relative_to(fresh_site)
    cli = str(fresh / "bin" / "mdgru-localize")
    usage = _run([cli, "--help"], work, env)
    for command in ("prepare", "train", "export", "predict", "serve"):
        assert command in usage

    manifest = write_raw_population(work / "raw", train=4, val=2, shape=(20, 22, 18), seed=7)
    _run([cli, "prepare", str(manifest), "--out", "dataset"], work, env)
    for stage in ("coarse", "fine"):
        _run([cli, "train", "--stage", stage, "--config", "tiny", "--landmarks", "A", "--data", "dataset",
              "--out", f"runs/{stage}", "--epochs", "1", "--quiet"], work, env)
        assert (work / "runs" / stage / "model.keras").is_file()
    _run([cli, "export", "--coarse", "runs/coarse", "--fine", "runs/fine", "--out", "exports", "--name", "blob"],
         work, env)
    assert (work / "exports" / "blob" / "1" / "saved_model.pb").is_file()
    table = _run([cli, "predict", "raw/val00.nii.gz", "raw/val01.nii.gz", "--model", "exports/blob",
                  "--format", "csv"], work, env)
    rows = list(csv.DictReader(io.StringIO(table)))
    assert [(Path(row["file"]).name, row["landmark"]) for row in rows] == [("val00.nii.gz", "A"),
                                                                           ("val01.nii.gz", "A")]
    for row in rows:
        voxel = np.array([float(row[f"voxel_{axis}"]) for axis in "ijk"])
        # one epoch of a tiny model is not expected to be accurate, and may answer outside the scan: then
        # (and only then) the row says so
        assert np.all(np.isfinite(voxel))
        outside = bool(np.any(voxel < -0.5) or np.any(voxel > np.array([20, 22, 18]) - 0.5))
        assert ("outside_image" in row["status"].split(";")) == outside
