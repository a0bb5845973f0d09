"""The one ``--landmarks A,B,...|all`` parser (:class:`mdgru_keras.commands._options.LandmarkList`) of every
command that takes a landmark list, and :func:`select_landmarks`, which resolves it against the names a model
(or dataset, or file) knows. Quick: nothing here loads a model."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from mdgru_keras.cli import COMMANDS
from mdgru_keras.cli import main as cli
from mdgru_keras.commands._options import ALL_LANDMARKS, LandmarkList, select_landmarks
from mdgru_keras.config import ConfigError, load_preset
from mdgru_keras.data.demo import AFID_NAMES


def convert(value: str) -> tuple[str, ...]:
    return LandmarkList().convert(value, None, None)


def test_names_all_and_refusals() -> None:
    assert convert("AC,PC") == ("AC", "PC")
    assert convert(" PMJ , AC,") == ("PMJ", "AC")  # order kept, blanks and empty items dropped
    assert convert("pmj") == ("pmj",)  # case as written: names are case-sensitive, as in the landmark files
    assert convert("all") == ALL_LANDMARKS
    assert convert(("AC", "PC")) == ("AC", "PC")
    for value, message in (
        ("", "give at least one landmark name, e.g. --landmarks AC,PC, or --landmarks all"),
        (" , ", "give at least one landmark name"),
        ("AC,PC,AC", "AC is given twice (names must be unique)"),
        ("all,AC", "'all' stands alone: give 'all' or names, not both"),
    ):
        with pytest.raises(click.BadParameter) as caught:
            convert(value)
        assert caught.value.message.startswith(message), (value, caught.value.message)


def test_select_landmarks() -> None:
    assert select_landmarks(ALL_LANDMARKS, AFID_NAMES) == AFID_NAMES
    assert select_landmarks(("PC", "AC"), AFID_NAMES) == ("PC", "AC")
    with pytest.raises(click.BadParameter) as caught:
        select_landmarks(("AC", "pmj", "XYZ"), AFID_NAMES)
    assert caught.value.format_message() == (
        f"Invalid value for '--landmarks': unknown landmarks pmj, XYZ; the model knows 32: {', '.join(AFID_NAMES)}"
    )
    with pytest.raises(click.BadParameter, match="unknown landmark C; the dataset knows 2: A, B$"):
        select_landmarks(("C",), ("A", "B"), owner="the dataset")


def test_the_config_refuses_lists_by_the_same_rule() -> None:
    with pytest.raises(ConfigError, match="landmarks: AC is given twice"):
        load_preset("tiny").replace(landmarks=("AC", "PC", "AC"))
    with pytest.raises(ConfigError, match="landmarks: at least one landmark name is needed"):
        load_preset("tiny").replace(landmarks=())


def landmark_options() -> dict[str, click.Parameter]:
    """command name -> its --landmarks option, for every command that has one."""
    found = {}
    for name in COMMANDS:
        command = cli.get_command(click.Context(cli), name)
        for param in command.params:
            if "--landmarks" in getattr(param, "opts", ()):
                found[name] = param
    return found


def test_every_landmark_list_option_uses_the_one_type() -> None:
    options = landmark_options()
    # synth's --landmarks is the template's landmark file, not a list of names
    assert isinstance(options.pop("synth").type, click.Path)
    assert sorted(options) == ["bids", "predict", "prepare", "train"]
    for name, param in options.items():
        assert isinstance(param.type, LandmarkList), name
        help_text = " ".join(CliRunner().invoke(cli, [name, "--help"]).output.split())
        assert "--landmarks A,B,...|all" in help_text, name


@pytest.mark.parametrize("command", ["prepare", "train", "predict"])
def test_the_commands_refuse_bad_lists_alike(command: str, tmp_path) -> None:
    args = {
        "prepare": ["prepare", str(tmp_path / "manifest.csv"), "--out", str(tmp_path / "ds")],
        "train": ["train", "--stage", "coarse", "--config", "tiny", "--data", str(tmp_path), "--out",
                  str(tmp_path / "run")],  # fmt: skip
        "predict": ["predict", str(tmp_path / "scan.nii.gz")],
    }[command]
    for value, message in (("AC,PC,AC", "AC is given twice (names must be unique)"),
                           ("all,AC", "'all' stands alone"), (",", "give at least one landmark name")):
        result = CliRunner().invoke(cli, [*args, "--landmarks", value])
        assert result.exit_code == 2, result.output
        assert f"Error: Invalid value for '--landmarks': {message}" in result.stderr
    assert not list(tmp_path.iterdir())


def test_predict_checks_names_against_the_shipped_model_before_loading_it(tmp_path) -> None:
    # the 32 AFIDs of model_info.json, case-sensitive; the scan is never read
    result = CliRunner().invoke(cli, ["predict", str(tmp_path / "scan.nii.gz"), "--landmarks", "AC,pmj"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: Invalid value for '--landmarks': unknown landmark pmj; the model knows 32: {', '.join(AFID_NAMES)}"
    )
