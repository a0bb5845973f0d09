"""The command line's one error boundary (``mdgru_keras.cli.LazyGroup.invoke`` with
``mdgru_keras.errors.describe_failure``): expected failures of any command end as one line ``Error: PATH: problem``
with exit status 1, usage errors keep exit status 2, bugs keep their traceback. Also: atomic writes name the
file the user asked for, not their temporary file. (``predict``'s own cases are in test_predict.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from mdgru_keras import cli as cli_module
from mdgru_keras.cli import main as cli
from mdgru_keras.config import ConfigError, load_preset
from mdgru_keras.errors import InputError, describe_failure, one_line
from mdgru_keras.io import atomic_path, check_writable, write_bytes_atomic, write_text_atomic


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env)


def assert_one_error_line(result: Result, expected_start: str) -> str:
    """Exit status 1, no traceback, and one error line, the last on standard error, starting with
    ``expected_start`` (a command may have said what it is doing before)."""
    assert result.exit_code == 1, result.output
    assert result.exc_info is None or isinstance(result.exc_info[1], SystemExit), result.exc_info
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.lower().startswith("error")] == lines[-1:], lines
    assert lines[-1].startswith(expected_start), lines[-1]
    return lines[-1]


# ---------------------------------------------------------------------------------------------------------
# describe_failure on real exceptions


def test_expected_failures_are_one_line_naming_the_file(tmp_path: Path) -> None:
    assert describe_failure(InputError(tmp_path / "a.nii", "cannot read\nvoxel data")) == (
        f"{tmp_path / 'a.nii'}: cannot read; voxel data"
    )
    assert describe_failure(ConfigError("x.yaml: training.epochs: expected an int")) == (
        "x.yaml: training.epochs: expected an int"
    )
    try:
        open(tmp_path / "missing.json")  # noqa: SIM115 - the real error is the point
    except OSError as error:
        assert describe_failure(error) == f"{tmp_path / 'missing.json'}: No such file or directory"
    assert describe_failure(FileExistsError(f"{tmp_path}: version 1 exists already")) == (
        f"{tmp_path}: version 1 exists already"
    )
    assert describe_failure(MemoryError()) == "out of memory (MemoryError)"


def test_tensorflow_out_of_memory_is_expected() -> None:
    import tensorflow as tf

    error = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[1,64,256,256]")
    assert describe_failure(error) == (
        "out of memory (ResourceExhaustedError: OOM when allocating tensor with shape[1,64,256,256])"
    )


def test_bugs_are_not_described() -> None:
    for error in (KeyError("x"), TypeError("unsupported operand"), ValueError("not an input error"),
                  AttributeError("x"), RuntimeError("y")):
        assert describe_failure(error) is None, error


def test_one_line() -> None:
    assert one_line("first\n\n  second  \n") == "first; second"


# ---------------------------------------------------------------------------------------------------------
# atomic writes name the target


def test_atomic_write_errors_name_the_requested_file(tmp_path: Path) -> None:
    regular = tmp_path / "regular"
    regular.write_text("x")
    for target in (regular / "out.json", regular / "sub" / "out.json"):
        with pytest.raises(NotADirectoryError) as caught:
            write_text_atomic(target, "{}")
        assert describe_failure(caught.value) == f"{target}: cannot write here: {regular} is not a directory"
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(IsADirectoryError) as caught:
        write_text_atomic(folder, "{}")
    assert describe_failure(caught.value) == f"{folder}: Is a directory"
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["folder", "regular"]


@pytest.mark.parametrize("durable", [False, True])
def test_atomic_writes_replace_whole_files_or_nothing(tmp_path: Path, durable: bool) -> None:
    target = tmp_path / "sub" / "run.json"
    write_text_atomic(target, "old\n", durable=durable)
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_text() == "old\n" and target.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(RuntimeError), atomic_path(target, durable=durable) as temporary:
        temporary.write_text("half")
        raise RuntimeError("killed while writing")
    assert target.read_text() == "old\n"
    write_bytes_atomic(target, b"new", durable=durable)
    assert target.read_bytes() == b"new" and os.listdir(target.parent) == ["run.json"]


def test_check_writable_passes_where_writing_works_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "existing").mkdir()
    for target, directory in ((tmp_path / "new" / "deeper" / "out.json", False), (tmp_path / "figures", True),
                              (tmp_path / "existing", True), (tmp_path / "existing" / "out.csv", False)):
        check_writable(target, directory=directory)
    assert [p.name for p in tmp_path.iterdir()] == ["existing"] and not any((tmp_path / "existing").iterdir())
    regular = tmp_path / "existing" / "regular"
    regular.write_text("x")
    with pytest.raises(NotADirectoryError) as caught:
        check_writable(regular / "a" / "out.json")
    expected = f"{regular / 'a' / 'out.json'}: cannot write here: {regular} is not a directory"
    assert describe_failure(caught.value) == expected


def test_checkpoints_write_through_the_one_atomic_writer() -> None:
    from mdgru_keras.training import callbacks, checkpoints, trainer

    for module in (checkpoints, callbacks, trainer):
        assert not hasattr(module, "atomic_write_text")
    assert checkpoints.write_text_atomic is write_text_atomic


# ---------------------------------------------------------------------------------------------------------
# the boundary, through real commands


def test_a_bad_config_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed\n")
    result = run("train", "--stage", "coarse", "--config", str(bad), "--data", str(tmp_path), "--out",
                 str(tmp_path / "run"))  # fmt: skip
    assert_one_error_line(result, f"Error: {bad}: not valid YAML")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("training:\n  epochz: 3\n")
    result = run("train", "--stage", "coarse", "--config", str(unknown), "--data", str(tmp_path), "--out",
                 str(tmp_path / "run"))  # fmt: skip
    line = assert_one_error_line(result, f"Error: {unknown}: ")
    assert "epochz" in line


def test_a_corrupt_model_keras_is_one_line(tmp_path: Path) -> None:
    from mdgru_keras.serving.testing import save_training_run

    config = load_preset("tiny")
    coarse = save_training_run(tmp_path / "coarse", "coarse", config, seed=0)
    model = coarse / "model.keras"
    model.write_bytes(model.read_bytes()[:2000])  # a copy cut short
    fine = tmp_path / "fine"
    fine.mkdir()
    result = run("export", "--coarse", str(coarse), "--fine", str(fine), "--out", str(tmp_path / "export"))
    assert_one_error_line(result, f"Error: {model}: cannot load the model (")
    assert not (tmp_path / "export").exists()


def test_usage_errors_keep_exit_status_2(tmp_path: Path) -> None:
    result = run("train", "--stage", "sideways", "--config", "tiny", "--data", str(tmp_path), "--out", str(tmp_path))
    assert result.exit_code == 2 and "Invalid value for '--stage'" in result.output


def test_debug_shows_the_traceback_of_an_expected_failure(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed\n")
    args = ["train", "--stage", "coarse", "--config", str(bad), "--data", str(tmp_path), "--out", str(tmp_path / "r")]
    assert_one_error_line(run(*args), f"Error: {bad}: not valid YAML")
    assert_one_error_line(run(*args, env={"MDGRU_DEBUG": "0"}), f"Error: {bad}: not valid YAML")
    for result in (run("--debug", *args), run(*args, env={"MDGRU_DEBUG": "1"})):
        assert result.exit_code == 1
        assert isinstance(result.exception, ConfigError)  # let through: CliRunner keeps it, Python prints it
        assert str(result.exception).startswith(f"{bad}: not valid YAML")
        assert "Error:" not in result.output
    # usage errors stay usage errors; --debug belongs to the group, before the command
    result = run("--debug", "train", "--stage", "sideways", "--config", "tiny", "--data", ".", "--out", ".")
    assert result.exit_code == 2 and "Invalid value for '--stage'" in result.output
    assert run("train", "--debug").exit_code == 2


def test_debug_through_the_real_command_line(tmp_path: Path) -> None:
    """As a user runs it: one line on standard error without --debug, Python's traceback with it."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    env.pop("MDGRU_DEBUG", None)
    args = ["train", "--stage", "coarse", "--config", "no-such-preset", "--data", str(tmp_path), "--out",
            str(tmp_path / "run")]  # fmt: skip

    def command_line(*extra: str, **env_changes: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mdgru_keras.cli", *extra, *args], capture_output=True,
                              text=True, timeout=120, env={**env, **env_changes}, cwd=tmp_path)

    plain = command_line()
    assert plain.returncode == 1 and plain.stdout == ""
    assert plain.stderr.strip().splitlines() == [
        "Error: no-such-preset: no such config file or preset (presets: afids, cpu, paper, tiny)"
    ]
    for debug in (command_line("--debug"), command_line(MDGRU_DEBUG="1")):
        assert debug.returncode == 1
        assert debug.stderr.startswith("Traceback (most recent call last):")
        last = debug.stderr.strip().splitlines()[-1]
        assert last == ("mdgru_keras.config.ConfigError: no-such-preset: no such config file or preset "
                        "(presets: afids, cpu, paper, tiny)")
        assert not [line for line in debug.stderr.splitlines() if line.startswith("Error:")]


def test_help_lists_the_exit_statuses() -> None:
    result = run("--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "Exit status: 0 success" in text and " 1 an expected failure" in text and " 2 a usage error" in text
    assert "--debug" in text and "MDGRU_DEBUG" in text and "docs/ERRORS.md" in text


# Commands that fail in given ways, to show what the boundary lets through (registered in COMMANDS below).
@click.command("fails")
@click.argument("kind")
@click.argument("path", required=False)
def fails(kind: str, path: str | None) -> None:
    if kind == "write":
        write_text_atomic(Path(path), "text")
    elif kind == "memory":
        raise MemoryError()
    elif kind == "bug":
        {}["missing key"]  # noqa: B018 - a bug: KeyError
    elif kind == "usage":
        raise click.UsageError("give something else")


@pytest.fixture
def failing_cli(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(cli_module.COMMANDS, "fails", f"{__name__}:fails")
    return lambda *args: CliRunner().invoke(cli, ["fails", *args])


def test_the_boundary_covers_every_command(failing_cli, tmp_path: Path) -> None:
    regular = tmp_path / "regular"
    regular.write_text("x")
    result = failing_cli("write", str(regular / "out.txt"))
    assert_one_error_line(result, f"Error: {regular / 'out.txt'}: cannot write here: {regular} is not a directory")
    assert_one_error_line(failing_cli("memory"), "Error: out of memory (MemoryError)")
    usage = failing_cli("usage")
    assert usage.exit_code == 2 and "Error: give something else" in usage.output and "Usage:" in usage.output


def test_bugs_keep_their_traceback(failing_cli) -> None:
    result = failing_cli("bug")
    assert result.exit_code == 1
    assert isinstance(result.exception, KeyError)  # not turned into a message: CliRunner shows the traceback
    assert "Error:" not in result.output


def test_a_corrupt_unet_model_names_the_file_once(tmp_path: Path) -> None:
    from mdgru_keras.evaluation_runner import UNetBaseline

    model = tmp_path / "unet.keras"
    model.write_bytes(b"not a zip archive")
    with pytest.raises(InputError) as caught:
        UNetBaseline(model, load_preset("tiny"))
    assert str(caught.value).startswith(f"{model}: cannot load the model (")
    assert not str(caught.value).startswith(f"{model}: {model}")
