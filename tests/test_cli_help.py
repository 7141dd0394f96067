"""The command line teaches: help on every option, an example per subcommand, --version,
YAML configs and the shipped recipes (``--config kits19``)."""

import argparse
import importlib.metadata
import re
import subprocess
import sys

import numpy as np
import pytest

import medseg
from medseg.cli import _parser, main
from medseg.config import Config, ConfigError
from medseg.configs import list_recipes, recipe_path


def _subcommands():
    parser = _parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_option_of_every_subcommand_has_help():
    missing = [
        f"medseg {name} {action.option_strings or action.dest}"
        for name, sub in _subcommands().items()
        for action in sub._actions
        if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()
    ]
    assert not missing, f"options without help=: {missing}"


def test_every_subcommand_has_an_example_line():
    subs = _subcommands()
    assert {"build", "train", "evaluate", "predict", "score", "export", "compare"} <= set(subs)
    for name, sub in subs.items():
        text = sub.format_help()
        assert re.search(rf"^\s+medseg {name} \S", text, re.M), f"medseg {name}: no example"


def test_version_prints_the_package_version():
    out = subprocess.run(
        [sys.executable, "-m", "medseg.cli", "--version"], capture_output=True, text=True,
        check=True,
    ).stdout
    assert out.strip() == f"medseg {medseg.__version__}"
    assert medseg.__version__ == importlib.metadata.version("medseg")


TOML = """
seed = 7

[data]
dataset = "kits_phantom"
config = "tiny"

[train]
epochs = 3
learning_rate = 0.001

[patch]
patch_size = [16, 32, 32]

[model]
dropout = 0.1
"""

YAML = """
seed: 7
data:
  dataset: kits_phantom
  config: tiny
train:
  epochs: 3
  learning_rate: 0.001
patch:
  patch_size: [16, 32, 32]
model:
  dropout: 0.1
"""


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_config_equals_the_toml_one(tmp_path, suffix):
    (tmp_path / "c.toml").write_text(TOML)
    (tmp_path / f"c{suffix}").write_text(YAML)
    from_toml = Config.from_file(tmp_path / "c.toml")
    from_yaml = Config.from_file(tmp_path / f"c{suffix}")
    assert from_yaml == from_toml
    assert from_yaml.explicit_keys == from_toml.explicit_keys
    assert from_yaml.patch.patch_size == (16, 32, 32) and from_yaml.train.epochs == 3


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: 3\n  learning_rate: [0.1\nmodel:\n  depth: 3\n")
    with pytest.raises(ConfigError) as err:
        Config.from_file(path)
    message = str(err.value)
    assert str(path) in message and "not valid YAML" in message
    assert re.search(r"line [45]\b", message), message


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "list.yml"
    path.write_text("- train.epochs=3\n")
    with pytest.raises(ConfigError, match="expected sections"):
        Config.from_file(path)


def test_yaml_unknown_key_names_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml.*train\.epoch"):
        Config.from_file(path)


def test_recipe_name_resolves_to_the_shipped_file(capsys):
    assert main(["train", "--config", "kits19", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert '"dataset": "kits19"' in printed
    assert Config.from_file("kits19") == Config.from_file(recipe_path("kits19"))
    assert recipe_path("kits19").name == "kits19.toml"
    assert recipe_path("kits") is None


@pytest.mark.parametrize("name", list_recipes())
def test_each_shipped_recipe_parses(name):
    assert set(list_recipes()) >= {"kits19", "msd_task04"}
    config = Config.from_file(name)
    assert config.data.dataset in ("kits19", "msd")
    assert "data.dataset" in config.explicit_keys


def test_unknown_recipe_lists_the_available_ones(capsys):
    with pytest.raises(ConfigError, match=r"kits19, msd_task04"):
        Config.from_file("kits")
    assert main(["train", "--config", "kits", "--print-config"]) == 2
    assert "kits19, msd_task04" in capsys.readouterr().err


def test_list_configs_prints_every_recipe(capsys):
    assert main(["train", "--list-configs"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == list_recipes()


def test_missing_file_with_a_suffix_is_not_a_recipe(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Config.from_file(tmp_path / "nothing.toml")
    with pytest.raises(ConfigError, match="expected a .json, .toml, .yaml or .yml"):
        (tmp_path / "c.ini").write_text("[train]\n")
        Config.from_file(tmp_path / "c.ini")


@pytest.mark.slow  # imports TensorFlow and MLflow: ~20 s
def test_pictures_of_a_logged_run(tmp_path, monkeypatch):
    import imageio.v3 as iio
    import mlflow

    from medseg.tracking.pictures import main as pictures_main

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("pictures")
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (5, 12, 30, 3), dtype=np.uint8)
    logged = tmp_path / "logged"
    (logged / "plots").mkdir(parents=True)
    (logged / "evaluation").mkdir()
    iio.imwrite(logged / "plots" / "overlay_case_1.gif", frames, loop=0, duration=100)
    (logged / "evaluation" / "validation_cases.tsv").write_text(
        "case_id\tdice_kidney\tdice_tumour\thd95_kidney\n"
        "a\t0.9\tnan\t1.0\nb\t0.8\t0.5\t2.0\nc\t0.7\t0.6\t3.0\n"
    )
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(logged))
    out = tmp_path / "images"
    assert pictures_main(["--run-id", run.info.run_id, "--output", str(out),
                          "--tracking-uri", uri]) == 0
    overlay = iio.imread(out / "overlay.png")
    expected = iio.imread(logged / "plots" / "overlay_case_1.gif", index=None)[2, ..., :3]
    np.testing.assert_array_equal(overlay[..., :3], expected)
    box = iio.imread(out / "dice_boxplot.png")
    assert box.ndim == 3 and box.shape[0] > 100
    assert sorted(p.name for p in out.iterdir()) == ["dice_boxplot.png", "overlay.png"]

    from medseg.tracking.pictures import read_case_dice

    dice = read_case_dice(logged / "evaluation" / "validation_cases.tsv")
    np.testing.assert_allclose(dice["kidney"], [0.9, 0.8, 0.7])
    np.testing.assert_allclose(dice["tumour"], [0.5, 0.6])  # nan left out

    with mlflow.start_run() as empty:
        mlflow.log_param("x", 1)
    from medseg.tracking.pictures import write_pictures

    with pytest.raises(ValueError, match=r"has no plots/overlay_<case>\.gif nor evaluation"):
        write_pictures(empty.info.run_id, tmp_path / "none", uri)
    assert not (tmp_path / "none").exists()
