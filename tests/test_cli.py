"""The medseg command line: errors users see, and the commands it builds."""

import pytest

from medseg.cli import main, ui_command


def test_unknown_dataset_is_a_clear_error(capsys, tmp_path):
    assert main(["build", "no_such_dataset", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no_such_dataset" in err and "kits_phantom" in err


def test_unknown_builder_config_is_a_clear_error(capsys, tmp_path):
    assert main(["build", "kits_phantom", "--config", "huge", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "huge" in err and "tiny" in err


def test_unknown_config_key_is_a_clear_error(capsys):
    assert main(["train", "train.epoch=3", "--print-config"]) == 2
    assert "unknown config key 'train.epoch'; did you mean 'train.epochs'?" in capsys.readouterr().err


def test_print_config_applies_overrides(capsys):
    assert main(["train", "--print-config", "train.epochs=3"]) == 0
    assert '"epochs": 3' in capsys.readouterr().out


def test_patch_larger_than_volume_is_a_clear_error(capsys, tiny_data_dir, tmp_path):
    code = main(
        [
            "train",
            "data.config=tiny",
            f"data.data_dir={tiny_data_dir}",
            "patch.patch_size=256,256,256",
            f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            f"tracking.artifact_root={tmp_path}",
        ]
    )
    assert code == 2
    assert "patch size (256, 256, 256) is larger than the preprocessed volume" in capsys.readouterr().err


def test_info_shows_the_stored_fingerprint(capsys, tiny_data_dir):
    assert main(["info", "kits_phantom", "--config", "tiny", "--data-dir", tiny_data_dir]) == 0
    out = capsys.readouterr().out
    assert "kits_phantom/tiny/1.1.0" in out and "foreground_intensity" in out


def test_ui_serves_the_store_on_loopback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cmd = ui_command(5001, "sqlite:///mlruns/mlflow.db")
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--port") + 1] == "5001"
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path}/mlruns/mlflow.db"


@pytest.mark.parametrize("argv", [["train", "--config", "missing.toml"]])
def test_missing_config_file(argv, capsys):
    assert main(argv) == 2
    assert "missing.toml does not exist" in capsys.readouterr().err


def test_manual_dataset_without_its_data_says_how_to_get_it(capsys, tmp_path):
    assert main(["build", "kits19", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "kits19: the manually downloaded data was not found" in err
    assert "--manual-dir" in err and "CC BY-NC-SA 4.0" in err
