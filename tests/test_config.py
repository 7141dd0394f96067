import json

import pytest

from medseg.config import Config, ConfigError


def test_overrides_parse_each_field_type():
    config = Config().with_overrides(
        [
            "train.epochs=5",
            "train.learning_rate=1e-4",
            "train.deterministic=false",
            "patch.patch_size=16,32,48",
            "preprocess.clip=[-79, 304]",
            "preprocess.target_spacing=none",
            "data.data_dir=/tmp/x",
            "seed=7",
        ]
    )
    assert config.train.epochs == 5
    assert config.train.learning_rate == 1e-4
    assert config.train.deterministic is False
    assert config.patch.patch_size == (16, 32, 48)
    assert config.preprocess.clip == (-79.0, 304.0)
    assert config.preprocess.target_spacing is None
    assert config.data.data_dir == "/tmp/x"
    assert config.seed == 7
    # a string option of a str | tuple field stays a string
    assert Config().with_overrides({"preprocess.clip": "none"}).preprocess.clip == "none"


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'; did you mean 'train.epochs'"):
        Config().with_overrides(["train.epoch=3"])
    with pytest.raises(ConfigError, match="unknown config key 'nosuch.key'"):
        Config().with_overrides({"nosuch.key": 1})
    with pytest.raises(ConfigError, match="unknown config key 'model.fliters'"):
        Config.from_dict({"model": {"fliters": 3}})


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match=r"'train.epochs': expected an integer, got 'many'"):
        Config().with_overrides(["train.epochs=many"])
    with pytest.raises(ConfigError, match=r"'patch.patch_size': expected 3 values"):
        Config().with_overrides(["patch.patch_size=16,32"])
    with pytest.raises(ConfigError, match="not of the form"):
        Config().with_overrides(["epochs"])


def test_round_trips_through_dict_json_and_files(tmp_path):
    config = Config().with_overrides(["train.epochs=3", "patch.patch_size=8,16,16"])
    assert Config.from_dict(config.to_dict()) == config
    path = tmp_path / "c.json"
    config.save(path)
    assert Config.from_file(path) == config
    toml = tmp_path / "c.toml"
    toml.write_text("seed = 3\n[train]\nepochs = 4\n[patch]\npatch_size = [8, 16, 16]\n")
    loaded = Config.from_file(toml)
    assert (loaded.seed, loaded.train.epochs, loaded.patch.patch_size) == (3, 4, (8, 16, 16))


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Config.from_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=f"config file {bad} is not valid"):
        Config.from_file(bad)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"train": {"epoks": 1}}))
    with pytest.raises(ConfigError, match=f"config file {unknown}: unknown config key 'train.epoks'"):
        Config.from_file(unknown)


def test_flat_dict_has_every_leaf_once():
    flat = Config().to_flat_dict()
    assert flat["train.epochs"] == Config().train.epochs
    assert flat["seed"] == 42
    nested = Config().to_dict()
    n_leaves = sum(len(v) if isinstance(v, dict) else 1 for v in nested.values())
    assert len(flat) == n_leaves
