import dataclasses
import json
import typing

import pytest

from medseg.cli import main
from medseg.config import Config, ConfigError, _literal_choices


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


# -- choices and ranges, checked when a config is made ---------------------------------

CHOICE_KEYS = {
    f"{section}.{f.name}": choices
    for section, hint in typing.get_type_hints(Config).items()
    if dataclasses.is_dataclass(hint)
    for f in dataclasses.fields(hint)
    if (choices := _literal_choices(typing.get_type_hints(hint)[f.name])) is not None
}


def test_every_choice_key_is_a_literal():
    # the keys whose misspelling used to fail only when used (after training, some)
    assert {
        "preprocess.normalize", "preprocess.clip", "patch.mode", "model.name",
        "model.normalization", "model.activation", "train.lr_schedule", "train.optimizer",
        "train.precision", "train.loop", "train.strategy", "loss.name", "inference.weighting",
        "evaluation.protocol", "tune.direction", "tune.pruner", "plan.device", "plan.preset",
        "augment.device", "inference.uncertainty", "tune.sampler",
    } == set(CHOICE_KEYS)


@pytest.mark.parametrize("key", sorted(CHOICE_KEYS))
def test_an_invalid_choice_fails_before_any_dataset_is_read(key, tmp_path, capsys):
    choices = CHOICE_KEYS[key]
    with pytest.raises(ConfigError) as err:
        Config().with_overrides({key: "bogus"})
    message = str(err.value)
    assert f"config key {key!r}: 'bogus' is not one of" in message
    assert all(repr(c) in message for c in choices)
    # a near miss is named
    near = choices[0][:-1] + choices[0][-1].upper()
    with pytest.raises(ConfigError, match=f"did you mean {choices[0]!r}"):
        Config().with_overrides([f"{key}={near}"])
    # the CLI refuses it before it reads or builds a dataset
    data_dir = tmp_path / "tfds"
    assert main(["train", f"{key}=bogus", f"data.data_dir={data_dir}"]) == 2
    assert f"config key {key!r}: 'bogus' is not one of" in capsys.readouterr().err
    assert not data_dir.exists()
    # and so does a section made directly in Python
    section, name = key.split(".")
    section_type = typing.get_type_hints(Config)[section]
    with pytest.raises(ConfigError, match=f"config key {key!r}"):
        section_type(**{name: "bogus"})


def test_config_choices_are_the_ones_the_modules_implement():
    from medseg.evaluation.protocols import PROTOCOLS
    from medseg.models import MODELS
    from medseg.models.blocks import ACTIVATIONS
    from medseg.models.blocks import NORMALIZATIONS as LAYER_NORMS
    from medseg.models.losses import LOSSES
    from medseg.pipeline.batched import AUGMENT_DEVICES
    from medseg.pipeline.dataset import PATCH_MODES
    from medseg.pipeline.preprocess import NORMALIZATIONS
    from medseg.planning.planner import DEVICES, PRESETS
    from medseg.training.optimization import OPTIMIZERS, SCHEDULES
    from medseg.training.strategy import STRATEGIES
    from medseg.training.trainer import LOOPS, PRECISIONS

    implemented = {
        "evaluation.protocol": PROTOCOLS, "model.name": tuple(MODELS),
        "model.activation": ACTIVATIONS, "model.normalization": LAYER_NORMS,
        "loss.name": tuple(LOSSES), "patch.mode": PATCH_MODES,
        "preprocess.normalize": NORMALIZATIONS, "plan.device": DEVICES,
        "plan.preset": tuple(PRESETS), "train.optimizer": OPTIMIZERS,
        "train.lr_schedule": SCHEDULES, "train.strategy": STRATEGIES, "train.loop": LOOPS,
        "train.precision": PRECISIONS, "augment.device": AUGMENT_DEVICES,
    }
    for key, values in implemented.items():
        assert set(CHOICE_KEYS[key]) == set(values), key


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.learning_rate=nan", "'train.learning_rate': nan is not a finite number > 0"),
        ("train.learning_rate=-1e-3", "'train.learning_rate': -0.001 is not a finite number > 0"),
        ("train.epochs=0", "'train.epochs': 0 is not ≥ 1"),
        ("inference.overlap=1", "'inference.overlap': 1.0 is not in [0, 0.95)"),
        ("inference.overlap=0.97", "'inference.overlap': 0.97 is not in [0, 0.95)"),
        ("data.validation_fraction=1.5", "'data.validation_fraction': 1.5 is not in [0, 1)"),
        ("augment.noise_probability=1.2", "'augment.noise_probability': 1.2 is not a probability"),
        ("evaluation.folds=1", "'evaluation.folds': 1 is not ≥ 2"),
        ("patch.patch_size=0,64,64", "'patch.patch_size': (0, 64, 64) is not positive sizes"),
        ("plan.time_budget=ten", "'plan.time_budget': time budget 'ten'"),
    ],
)
def test_out_of_range_values_are_named(override, message):
    with pytest.raises(ConfigError) as err:
        Config().with_overrides([override])
    assert message in str(err.value)


def test_optional_choices_take_none_and_unions_keep_their_other_types():
    config = Config().with_overrides(["model.activation=none", "preprocess.clip=-100,200"])
    assert config.model.activation is None and config.preprocess.clip == (-100.0, 200.0)
    with pytest.raises(ConfigError, match=r"'fingerprint', 'none' or 2 numbers"):
        Config().with_overrides(["preprocess.clip=fingerprnt"])


def test_sections_are_frozen_so_a_config_changes_only_through_overrides():
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.epochs = 5
    changed = config.with_overrides({"train.epochs": 5})
    assert (config.train.epochs, changed.train.epochs) == (12, 5)
    assert "train.epochs" in changed.explicit_keys


def test_a_renamed_key_is_read_under_its_new_name_with_a_warning(tmp_path):
    with pytest.warns(DeprecationWarning, match="'patch.cache_dir' is now 'preprocess.cache_dir'"):
        config = Config().with_overrides([f"patch.cache_dir={tmp_path}"])
    assert config.preprocess.cache_dir == str(tmp_path)
    assert "preprocess.cache_dir" in config.explicit_keys
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"patch": {"cache_dir": "/data/cache", "batch_size": 4}}))
    with pytest.warns(DeprecationWarning):
        old = Config.from_file(path)
    assert (old.preprocess.cache_dir, old.patch.batch_size) == ("/data/cache", 4)
