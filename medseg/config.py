"""The one typed configuration of a medseg experiment.

The CLI reads it (a JSON/TOML file plus ``section.key=value`` overrides), notebooks
parameterize it, and tracking logs it flattened as MLflow params. Every phase takes
the section it needs and nothing else.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration key or value that medseg cannot use."""


@dataclass
class DataConfig:
    """Which dataset to read, and how its cases split into training and validation."""

    dataset: str = "kits_phantom"
    config: str = "small"
    split: str = "train"
    data_dir: str | None = None  # TFDS data dir; None means TFDS's default
    validation_fraction: float = 0.25
    build_if_missing: bool = True


@dataclass
class PreprocessConfig:
    """Deterministic per-case preprocessing, done once and cached."""

    target_spacing: tuple[float, float, float] | None = (3.0, 1.5, 1.5)
    # "fingerprint": the dataset's foreground 0.5/99.5 percentiles; "none"; or two numbers
    clip: str | tuple[float, float] = "fingerprint"
    # "fingerprint": z-score with the dataset's foreground mean/std; "image": per-image z-score
    normalize: str = "fingerprint"


@dataclass
class PatchConfig:
    """Random patch sampling for training."""

    patch_size: tuple[int, int, int] = (32, 64, 64)
    batch_size: int = 2
    # share of patches centred on a foreground voxel (of a randomly chosen class)
    foreground_share: float = 0.5
    validation_patches: int = 8  # fixed patches per validation case for per-epoch metrics


@dataclass
class ModelConfig:
    name: str = "unet"
    depth: int = 3
    filters: int = 16
    # nnU-Net's choice: batch statistics of 2 patches are too noisy for BatchNorm
    normalization: str = "instance"  # "instance" | "batch" | "none"
    dropout: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 12
    steps_per_epoch: int = 25
    learning_rate: float = 3e-3
    # "poly": nnU-Net's lr · (1 - step/total)^0.9, ending near 0; "constant"
    lr_schedule: str = "poly"
    optimizer: str = "adam"
    strategy: str = "auto"  # "auto" | "default" | "mirrored"
    deterministic: bool = True
    sliding_window_overlap: float = 0.5


@dataclass
class AugmentConfig:
    """Random spatial and intensity augmentation of training patches (labels follow)."""


@dataclass
class LossConfig:
    """The training loss."""


@dataclass
class InferenceConfig:
    """Sliding-window prediction of whole cases."""


@dataclass
class EvaluationConfig:
    """How cases are split for validation and how predictions are scored."""


@dataclass
class TuneConfig:
    """An Optuna search over this config."""


@dataclass
class TrackingConfig:
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_root: str = "mlruns"
    experiment: str = "medseg"
    run_name: str | None = None
    log_model: bool = True


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    patch: PatchConfig = field(default_factory=PatchConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 42

    # -- construction --------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """Build a config from a nested dict; unknown keys are errors."""
        return _from_dict(cls, values, prefix="")

    @classmethod
    def from_file(cls, path: str | Path) -> Config:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text()
        try:
            if path.suffix == ".toml":
                values = tomllib.loads(text)
            elif path.suffix == ".json":
                values = json.loads(text)
            else:
                raise ConfigError(f"config file {path}: expected a .json or .toml file")
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"config file {path} is not valid: {err}") from err
        try:
            return cls.from_dict(values)
        except ConfigError as err:
            raise ConfigError(f"config file {path}: {err}") from err

    def with_overrides(self, overrides: dict[str, Any] | list[str]) -> Config:
        """Return a copy with ``section.key`` values replaced.

        ``overrides`` is a dict ``{"train.epochs": 5}`` or CLI strings ``["train.epochs=5"]``;
        string values are parsed according to the field's type.
        """
        if isinstance(overrides, list | tuple):
            pairs = {}
            for item in overrides:
                if "=" not in item:
                    raise ConfigError(f"override {item!r} is not of the form section.key=value")
                key, value = item.split("=", 1)
                pairs[key.strip()] = value.strip()
            overrides = pairs
        values = self.to_dict()
        for key, value in overrides.items():
            section, _, name = key.rpartition(".")
            target = values
            if section:
                if section not in values or not isinstance(values[section], dict):
                    raise ConfigError(_unknown(key, _flat_keys(Config)))
                target = values[section]
            if name not in target:
                raise ConfigError(_unknown(key, _flat_keys(Config)))
            target[name] = value
        return Config.from_dict(values)

    # -- export --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_flat_dict(self) -> dict[str, Any]:
        """``{"train.epochs": 20, ...}``: the form MLflow params and papermill take."""
        flat: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                for sub, v in value.items():
                    flat[f"{key}.{sub}"] = v
            else:
                flat[key] = value
        return flat

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")


# -- helpers -------------------------------------------------------------------------


def _flat_keys(cls: type) -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or (
            isinstance(f.type, str) and f.type.endswith("Config")
        ):
            sub = typing.get_type_hints(cls)[f.name]
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(sub)]
        else:
            keys.append(f.name)
    return keys


def _unknown(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
    return f"unknown config key {key!r}{hint}"


def _from_dict(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table of keys")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(_unknown(prefix + key, _flat_keys(Config)))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _from_dict(hint, value, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, prefix + key)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert ``value`` (possibly a CLI string) to the field type ``hint``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in options:
                return None
        errors = []
        # try the most specific types first so "3" stays an int where an int is allowed
        for option in sorted(options, key=lambda t: t is str):
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"config key {key!r}: cannot use {value!r} ({'; '.join(errors)})")
    if origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, str):
            text = value.strip()
            try:
                value = json.loads(text) if text.startswith("[") else text.split(",")
            except json.JSONDecodeError as err:
                raise ConfigError(f"config key {key!r}: {value!r} is not a list") from err
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key {key!r}: expected {len(args)} values, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"config key {key!r}: expected {len(args)} values, got {list(value)}")
        return tuple(_coerce(v, t, key) for v, t in zip(value, args, strict=True))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key {key!r}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
    raise ConfigError(f"config key {key!r}: unsupported type {hint}")
