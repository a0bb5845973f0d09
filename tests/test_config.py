"""Presets load, validate and refuse bad keys with a message that names the file and the key."""

from pathlib import Path

import pytest

from mdgru_keras.config import Config, ConfigError, config_from_dict, load_config, load_preset


@pytest.mark.parametrize("name", ["paper", "cpu", "tiny", "afids"])
def test_presets_load_and_round_trip(name: str) -> None:
    config = load_preset(name)
    assert config.name == name
    assert config_from_dict(config.to_dict()) == config


def test_paper_preset_is_the_papers_network() -> None:
    config = load_preset("paper")
    for network in (config.coarse.network, config.fine.network):
        assert network.mdgru_units == (32, 64, 128)
        assert network.fc_channels == (48, 96, 192)
        assert network.mdgru_stride == 2
        assert network.dropconnect == 0.5
    assert (config.coarse.padded_size, config.coarse.input_stride, config.coarse.input_channels) == (256, 4, 16)
    assert config.fine.window_size == 64
    assert config.superresolution == 4
    assert (config.training.optimizer, config.training.learning_rate) == ("adadelta", 0.001)


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nfine:\n  windw_size: 32\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert str(path) in message and "fine.windw_size" not in message.split("unknown")[0]
    assert "windw_size" in message and "\n" not in message


def test_wrong_type_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("superresolution: four\n")
    with pytest.raises(ConfigError, match="superresolution: expected an integer"):
        load_config(path)


def test_inconsistent_sizes_are_refused() -> None:
    with pytest.raises(ConfigError, match="larger than coarse.padded_size"):
        config_from_dict({"coarse": {"padded_size": 32, "input_stride": 4}, "fine": {"window_size": 64}})
    with pytest.raises(ConfigError, match="not divisible"):
        config_from_dict({"fine": {"window_size": 36}})


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(ConfigError, match="presets: afids, cpu, paper, tiny"):
        load_config("nonexistent")


def test_default_config_is_valid() -> None:
    assert Config().num_landmarks == 1


def test_negative_label_sigma_is_refused() -> None:
    with pytest.raises(ConfigError, match="label_sigma_grid_voxel: must be >= 0"):
        config_from_dict({"training": {"label_sigma_grid_voxel": -1.0}})
