"""The one typed configuration of a medseg experiment.

The CLI reads it (a JSON/TOML file plus ``section.key=value`` overrides), notebooks
parameterize it, and tracking logs it flattened as MLflow params. Every phase takes
the section it needs and nothing else.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import re
import tomllib
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration key or value that medseg cannot use."""


# The choice keys. Each value set is checked when a config is made (a file, a dict, an
# override, a notebook parameter, a section built in Python), so a misspelt choice fails
# before any dataset is read; the modules that act on a choice list the same values
# (tests/test_config.py keeps them in step).
Normalize = Literal["fingerprint", "image", "minmax", "ct", "none"]
PatchMode = Literal["patch", "slice", "full"]
ModelName = Literal[
    "unet",
    "plain_unet",
    "residual_unet",
    "dense_unet",
    "multires_unet",
    "attention_unet",
    "attention_residual_unet",
    "compact_unet",
    "resenc_unet",
]
Normalization = Literal["instance", "batch", "none"]
Activation = Literal["relu", "leaky_relu", "elu", "gelu", "silu"]
Schedule = Literal["poly", "cosine", "plateau", "constant"]
Optimizer = Literal["adam", "sgd", "adamw"]
Precision = Literal["auto", "float32", "mixed_float16"]
Loop = Literal["custom", "fit"]
Strategy = Literal["auto", "default", "mirrored", "multiworker"]
LossName = Literal[
    "dice_ce", "dice", "classwise_dice", "jaccard", "tversky", "focal_tversky", "focal", "combo"
]
Weighting = Literal["gaussian", "mean"]
Protocol = Literal["split", "kfold", "loo", "holdout", "lists"]
Direction = Literal["maximize", "minimize"]
Pruner = Literal["median", "percentile", "hyperband", "none"]
Sampler = Literal["tpe", "random"]  # cmaes needs the cmaes package: not offered
Device = Literal["auto", "cpu", "gpu"]
Preset = Literal["default", "resenc_m", "resenc_l"]
AugmentDevice = Literal["cpu", "accelerator"]


# a transform named in the config: "package.module:attribute"
TRANSFORM_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")

# -- secrets -----------------------------------------------------------------------------

REDACTED = "***"
# the password of a URL's user info (scheme://user:password@host), and credential-like
# query parameters (?password=..., &token=...)
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^@/\s]+(?=@)")
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&](?:password|passwd|pwd|token|secret|access_key|api_key)=)[^&#\s\"']+",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with every URL password and credential query value replaced by ``***``.

    ``postgresql://user:secret@host/db`` becomes ``postgresql://user:***@host/db``. Used
    wherever a config leaves the process (MLflow params and artifacts, Optuna attributes,
    exported configs, logged notebooks); the real value stays only in memory.
    """
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED, text)
    return _QUERY_SECRET.sub(lambda m: m.group("head") + REDACTED, text)


def _redact_values(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_values(v) for v in value]
    return value


def parse_duration(text: str | float | int | None) -> float | None:
    """``"10m"``, ``"90s"``, ``"1h30m"``, ``"2.5m"`` or a number of seconds → seconds."""
    if text is None:
        return None
    if isinstance(text, int | float):
        return float(text)
    value = str(text).strip().lower()
    if value in ("", "none", "null"):
        return None
    try:
        return float(value)
    except ValueError:
        pass
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", value)
    if not parts or not any(parts.groups()):
        raise ConfigError(f"time budget {text!r}: use e.g. 10m, 90s, 1h30m or seconds")
    h, m, s = (float(g) if g else 0.0 for g in parts.groups())
    return h * 3600 + m * 60 + s


class _Section:
    """Checks a section's values when it is made, however it is made."""

    def __post_init__(self):
        _check_section(self)


@dataclass(frozen=True)
class DataConfig(_Section):
    """Which dataset to read, and how its cases split into training and validation."""

    dataset: str = "kits_phantom"
    config: str = "small"
    split: str = "train"
    data_dir: str | None = None  # TFDS data dir; None means TFDS's default
    validation_fraction: float = 0.25
    build_if_missing: bool = True


@dataclass(frozen=True)
class PreprocessConfig(_Section):
    """Deterministic per-case preprocessing, done once and cached."""

    target_spacing: tuple[float, float, float] | None = (3.0, 1.5, 1.5)
    # "fingerprint": the dataset's foreground 0.5/99.5 percentiles; "none"; or two numbers
    clip: Literal["fingerprint", "none"] | tuple[float, float] = "fingerprint"
    # "fingerprint": z-score with the dataset's foreground mean/std; "image": per-image z-score;
    # "minmax": per-image rescale to [0, 1]; "ct": nnU-Net's CT scheme (clip to the
    # fingerprint's 0.5/99.5 % foreground percentiles, z-score with its mean/std); "none"
    normalize: Normalize = "fingerprint"
    # crop every case to the bounding box of image != 0 (or > crop_threshold), as nnU-Net
    crop_to_nonzero: bool = False
    crop_threshold: float | None = None
    # nnU-Net: where max/min spacing > this, no interpolation along the one coarse axis
    anisotropy_threshold: float = 3.0
    # preprocessed cases are held in memory; with a directory, also in a file cache there,
    # keyed by the preprocessing plan and the dataset version, so later runs skip preprocessing
    cache_dir: str | None = None
    # the user's own steps, "module:attribute" each: (image, label) -> (image, label) on
    # the resampled case (label None when predicting), cached with the rest and recorded
    # in the plan, so prediction applies them too
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class PatchConfig(_Section):
    """Random patch sampling for training."""

    patch_size: tuple[int, int, int] = (32, 64, 64)
    batch_size: int = 2
    # share of patches centred on a foreground voxel (of a randomly chosen class); nnU-Net: 0.33
    foreground_share: float = 0.5
    # "patch": 3D patches; "slice": (k, H, W) slabs as 2D (H, W, k*C) inputs labelled by their
    # centre slice; "full": whole cases, padded to ≥ patch_size and a multiple of pad_multiple
    mode: PatchMode = "patch"
    # blank-patch skipping: a patch whose foreground fraction is below this is redrawn, at
    # most max_redraws times (then the best draw is kept: no endless loop without foreground)
    min_foreground: float = 0.0
    max_redraws: int = 4
    pad_multiple: int = 8  # "full" mode: the model's total stride
    validation_patches: int = 8  # fixed patches per validation case for per-epoch metrics
    # bounded memory (needs preprocess.cache_dir): at most this many preprocessed training
    # cases resident, the rest in shards on disk; None: every case in memory
    cases_in_memory: int | None = None
    # every replace_every steps the resident window slides: replace_share of its cases are
    # swapped for the next ones of a seeded order (loaded ahead, while training goes on)
    replace_every: int = 50
    replace_share: float = 0.25


@dataclass(frozen=True)
class ModelConfig(_Section):
    """The network: an architecture of medseg.models.MODELS and its size."""

    name: ModelName = "unet"
    depth: int = 3  # resolution levels; patch sizes must be multiples of 2**(depth-1)
    filters: int = 16  # of the first level, doubled per level, capped at 320
    # nnU-Net's choice: batch statistics of 2 patches are too noisy for BatchNorm
    normalization: Normalization = "instance"
    dropout: float = 0.0
    # None: the architecture's own (leaky_relu for plain_unet, relu for the others)
    activation: Activation | None = None
    # extra softmax outputs at 1/2, 1/4, ... resolution (needs depth >= 3), nnU-Net weights
    deep_supervision: bool = False


@dataclass(frozen=True)
class TrainConfig(_Section):
    """Optimization, schedule, stopping, checkpoints and the distribution strategy."""

    epochs: int = 12
    steps_per_epoch: int = 25
    learning_rate: float = 3e-3
    # "poly": nnU-Net's lr · (1 - step/total)^0.9, ending near 0; "cosine": lr · (1 + cos(π
    # step/total)) / 2; "plateau": lr times plateau_factor after plateau_patience epochs
    # without improvement of `monitor`; "constant"
    lr_schedule: Schedule = "poly"
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    optimizer: Optimizer = "adam"  # "sgd": Nesterov, momentum below (nnU-Net)
    momentum: float = 0.99  # sgd
    weight_decay: float | None = None  # decoupled; None: the optimizer's default (adamw 0.004)
    clip_norm: float | None = None  # clip the global gradient norm (over all replicas) to this
    # stop after this many epochs without improvement of `monitor` (by > min_delta); 0: off
    early_stopping_patience: int = 0
    min_delta: float = 0.0
    monitor: str = "val_loss"  # a log key; minimized if it contains "loss", else maximized
    # "auto": mixed_float16 (with loss scaling) when a GPU is present, float32 on CPU;
    # "float32"; "mixed_float16"
    precision: Precision = "auto"
    # checkpoint (model, optimizer, epoch, history) after every epoch into this directory;
    # a run finding one there resumes from it. None: no checkpoints
    checkpoint_dir: str | None = None
    # "custom": a strategy.run training loop (any strategy); "fit": Keras fit (not
    # multi-worker, keras-team/keras#20585; clipping is then per replica)
    loop: Loop = "custom"
    # "auto": MultiWorkerMirroredStrategy when TF_CONFIG lists several workers, else
    # MirroredStrategy over several GPUs, else none; "default" | "mirrored" | "multiworker"
    strategy: Strategy = "auto"
    deterministic: bool = True  # seeded, ordered input; op determinism on CPU


@dataclass(frozen=True)
class AugmentConfig(_Section):
    """Random spatial and intensity augmentation of training patches (labels follow).

    Defaults are nnU-Net's. Each transform has its own probability; ranges are
    ``(low, high)`` of a uniform draw. Axes are spatial axes (0 = first); axes a 2D patch
    does not have are ignored.
    """

    enabled: bool = True
    jit: bool = True  # XLA-compile the resampling: ~6x faster on CPU
    # "cpu": each patch in the tf.data pipeline; "accelerator": the batch inside the compiled
    # training step (medseg.pipeline.batched), same draws per patch; tf.data then only
    # reads, crops and batches (train.loop="custom"; no augment.extra)
    device: AugmentDevice = "cpu"
    # mirroring, a coin per axis
    flip_probability: float = 0.5
    flip_axes: tuple[int, ...] = (0, 1, 2)
    # 90° rotation in the plane of the last two spatial axes (k = 2 only if not square)
    rot90_probability: float = 0.0
    # rotation, scaling and elastic deformation share ONE resampling pass
    rotation_probability: float = 0.2
    rotation_degrees: tuple[float, float] = (-30.0, 30.0)
    rotation_axes: tuple[int, ...] = (0, 1, 2)  # 3D: rotate about these axes; 2D: in-plane
    scale_probability: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.4)  # > 1 enlarges the content
    scale_per_axis: bool = False
    elastic_probability: float = 0.0
    elastic_magnitude: tuple[float, float] = (0.0, 4.0)  # displacement std in voxels
    elastic_grid_spacing: int = 16  # voxels between the displacement's control points
    # intensity
    noise_probability: float = 0.1
    noise_std: tuple[float, float] = (0.0, 0.316)  # nnU-Net's variance (0, 0.1)
    blur_probability: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    brightness_probability: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)  # multiplicative
    contrast_probability: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    lowres_probability: float = 0.25
    lowres_zoom: tuple[float, float] = (0.5, 1.0)
    gamma_probability: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    gamma_invert_probability: float = 0.1  # gamma of the inverted image
    # a smooth multiplicative field (MR's coil inhomogeneity; TorchIO's RandomBiasField):
    # exp(a · f), f a random 2nd-order polynomial over the patch scaled to [-1, 1], a drawn
    # from the magnitude range; about the patch's darkest value (air has no bias). Off by
    # default (nnU-Net has none); plans for MR switch it on
    bias_field_probability: float = 0.0
    bias_field_magnitude: tuple[float, float] = (0.05, 0.25)
    # the field's pivot below the darkest value, as a share of the patch's range: a
    # scanner's signal pedestal (an offset under the signal) is scaled by the coil field
    # too, and per-image z-scoring hides the pedestal but not that; (0, 0): about the
    # darkest value. Plans for MR draw up to a pedestal twice the signal's range
    bias_field_pedestal: tuple[float, float] = (0.0, 0.0)
    # the user's own transforms, "module:attribute" each (a callable (image, label, seed)
    # -> (image, label), or a class made without arguments), applied after the above with
    # their own seed streams (medseg.pipeline.transforms)
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class LossConfig(_Section):
    """The training loss (see ``medseg.models.losses``; built by ``loss_from_config``)."""

    name: LossName = "dice_ce"  # "dice_ce": nnU-Net's default
    include_background: bool = False  # whether class 0 enters the overlap (Dice-like) terms
    class_weights: tuple[float, ...] | None = None  # one per class, background first
    batch_dice: bool = True  # overlap sums pooled over the batch (nnU-Net) or per sample
    smooth: float = 1e-5  # added to numerator and denominator of overlap ratios
    dice_weight: float = 1.0  # dice_ce: weight of 1 - Dice
    ce_weight: float = 1.0  # dice_ce: weight of the cross-entropy
    tversky_alpha: float = 0.3  # tversky, focal_tversky: weight of false positives
    tversky_beta: float = 0.7  # tversky, focal_tversky: weight of false negatives
    focal_tversky_gamma: float = 4 / 3  # focal_tversky: loss = (1 - TI) ** (1 / gamma)
    focal_gamma: float = 2.0  # focal: (1 - p_t) ** gamma
    focal_alpha: float | None = None  # focal: foreground weight, background 1 - alpha
    combo_alpha: float = 0.5  # combo: weight of the cross-entropy, Dice gets 1 - alpha
    combo_beta: float = 0.5  # combo: > 0.5 penalizes false negatives more than positives


@dataclass(frozen=True)
class InferenceConfig(_Section):
    """Sliding-window prediction of whole cases."""

    # share of a patch overlapping its neighbour, per axis, in [0, 0.95): from 0.95 every
    # voxel is predicted in thousands of windows (the sliding window refuses it too)
    overlap: float = 0.5
    weighting: Weighting = "gaussian"  # merge of overlapping patches
    # test-time mirroring: average over every combination of flips along these spatial
    # axes (e.g. [0, 1, 2]: 8 predictions per patch); () is off
    mirror_axes: tuple[int, ...] = ()
    batch_size: int = 2  # patches per forward pass
    save_probabilities: bool = False  # also write <case>_prob.nii.gz (softmax, 4D)
    # voxel-wise uncertainty beside each segmentation (<case>_entropy.nii.gz, in nats,
    # <case>_mutual_info.nii.gz, <case>_uncertainty.json and .gif) from several samples:
    # "tta" the mirror_axes flips, "ensemble" the models, "mc-dropout" passes with the
    # model's Dropout layers on (needs model.dropout > 0 in training); "none" is off
    uncertainty: Literal["none", "tta", "ensemble", "mc-dropout"] = "none"
    uncertainty_samples: int = 10  # mc-dropout passes per case, at least 2
    uncertainty_seed: int | None = None  # fixes the mc-dropout masks; None: random


@dataclass(frozen=True)
class EvaluationConfig(_Section):
    """How cases are split for validation and how predictions are scored."""

    # "split": data.validation_fraction of data.split held out (seeded); "kfold"; "loo"
    # (leave-one-out over every case); "holdout": train on data.split, test on test_split;
    # "lists": the explicit train_cases / test_cases of data.split
    protocol: Protocol = "split"
    folds: int = 5
    # k-fold/LOO splits JSON, reused when present; None: <dataset dir>/splits/ (per seed)
    splits_file: str | None = None
    test_split: str = "test"
    train_cases: tuple[str, ...] = ()
    test_cases: tuple[str, ...] = ()
    surface_tolerance_mm: float = 2.0  # surface Dice tolerance (Nikolov et al.)
    hd_percentile: float = 95.0
    postprocess: bool = True  # decide largest-component postprocessing from the CV cases
    overlay_axis: int = 0  # axis the overlay GIF and the montage slice along
    # expected calibration error per structure over the validation voxels (val_ece_*),
    # plots/reliability.png and a temperature fitted on a voxel sample (temperature.json);
    # predicting a case's probabilities costs K floats per voxel of the case being scored
    calibration: bool = True
    calibration_bins: int = 15  # equal-width confidence bins of the ECE
    temperature_samples: int = 20000  # voxels per case drawn (seeded) to fit the temperature


@dataclass(frozen=True)
class TuneConfig(_Section):
    """An Optuna search over this config (``medseg tune``).

    Each ``space`` entry is ``section.key=KIND:ARGS``: ``log:LOW:HIGH`` (log-uniform float),
    ``float:LOW:HIGH[:STEP]``, ``int:LOW:HIGH[:STEP]`` or ``cat:A|B|C`` (choices; ``,``
    separates them too where the entry is not itself in a comma-separated list).
    """

    space: tuple[str, ...] = ("train.learning_rate=log:1e-4:1e-2", "model.filters=int:8:32:8")
    n_trials: int = 20  # in total, over every worker
    timeout: float | None = None  # seconds per worker; None: no limit
    # what a trial returns: "val_case_dice_mean" (mean over foreground classes of the
    # whole-case validation Dice) or any metric the trial's MLflow run logs
    metric: str = "val_case_dice_mean"
    direction: Direction = "maximize"
    # pruning watches this per-epoch value: "val_dice_mean" (mean of the val_dice_* metrics)
    # or any Keras log key
    prune_metric: str = "val_dice_mean"
    # "median"/"percentile": prune a trial below the median / the pruner_percentile-th
    # percentile of the other trials at the same epoch; "hyperband": successive halving
    # over epochs (ignores pruner_startup_trials); "none": every trial runs its epochs
    pruner: Pruner = "median"
    pruner_percentile: float = 25.0  # "percentile": keep the top 25 % of trials (0-100)
    pruner_startup_trials: int = 5  # trials completed before any is pruned
    pruner_warmup_epochs: int = 1  # epochs a trial always gets
    # "tpe" (Optuna's default) or "random"; seeded by the config's seed (+ the worker)
    sampler: Sampler = "tpe"
    storage: str = "sqlite:///mlruns/optuna.db"  # any SQLAlchemy URL (postgresql://...)
    study_name: str = "medseg"
    workers: int = 1  # processes sharing the study (medseg tune --workers)


@dataclass(frozen=True)
class PlanConfig(_Section):
    """Self-configuration (``medseg plan``): which values the experiment plan sets.

    With ``mode="auto"`` the plan fitted to the dataset's fingerprint and this machine
    (cached beside the dataset) sets target spacing, normalisation, patch, batch, network
    and training length; any of those keys given in the config (a file, an override, a
    notebook parameter) wins, and the override is recorded with the run.
    """

    # "auto": plan (or reuse the cached plan); "none": the config's own values; or the
    # path of a plan.json (what medseg reproduce uses: never re-plans)
    mode: str = "auto"
    # training time to fit, e.g. "10m", "90s", "1h"; None: a fixed schedule on a GPU,
    # 10 minutes on a CPU
    time_budget: str | None = None
    device: Device = "auto"
    gpu_memory: float | None = None  # GB; None: the preset's (default 8, resenc_l 24)
    preset: Preset = "default"  # "default": plain U-Net; "resenc_*": residual encoder


@dataclass(frozen=True)
class TrackingConfig(_Section):
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_root: str = "mlruns"
    experiment: str = "medseg"
    run_name: str | None = None
    log_model: bool = True
    # also register the logged model under this name in the MLflow model registry
    register_model: str | None = None
    # MLflow's system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) per run
    system_metrics: bool = True


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
    plan: PlanConfig = field(default_factory=PlanConfig)
    seed: int = 42

    @property
    def explicit_keys(self) -> frozenset[str]:
        """The ``section.key`` names given explicitly (a file, a dict, an override), as
        opposed to left at their defaults: the keys a plan must not change."""
        return getattr(self, "_explicit", frozenset())

    def _with_explicit(self, keys) -> Config:
        object.__setattr__(self, "_explicit", frozenset(keys))
        return self

    # -- construction --------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """Build a config from a nested dict; unknown keys are errors.

        The keys present in ``values`` are its :attr:`explicit_keys`. A key of an earlier
        release (`RENAMED`) is read under its new name, with a warning.
        """
        values = _renamed(values)
        config = _from_dict(cls, values, prefix="")
        return config._with_explicit(_given_keys(values))

    @classmethod
    def from_file(cls, path: str | Path) -> Config:
        """Read a ``.json``, ``.toml``, ``.yaml`` or ``.yml`` config file, or a shipped
        recipe by name (``kits19``: a name without a suffix that is not a file, see
        :mod:`medseg.configs`)."""
        path = Path(path)
        if not path.is_file() and not path.suffix and path.name == str(path):
            from medseg.configs import list_recipes, recipe_path  # a name, e.g. "kits19"

            recipe = recipe_path(path.name)
            if recipe is None:
                raise ConfigError(
                    f"config {path.name!r} is neither a file nor a shipped recipe; give a "
                    ".json, .toml, .yaml or .yml file, or one of the recipes: "
                    + ", ".join(list_recipes())
                )
            path = recipe
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        if path.suffix not in (".json", ".toml", ".yaml", ".yml"):
            raise ConfigError(
                f"config file {path}: expected a .json, .toml, .yaml or .yml file"
            )
        text = path.read_text()
        try:
            if path.suffix == ".toml":
                values = tomllib.loads(text)
            elif path.suffix == ".json":
                values = json.loads(text)
            else:
                values = _load_yaml(text, path)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"config file {path} is not valid: {err}") from err
        if not isinstance(values, dict):
            raise ConfigError(
                f"config file {path}: expected sections (e.g. train: epochs: 5), "
                f"got a {type(values).__name__}"
            )
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
        overrides = {RENAMED.get(k, k): v for k, v in _warn_renamed(overrides).items()}
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
        return Config.from_dict(values)._with_explicit(self.explicit_keys | set(overrides))

    # -- export --------------------------------------------------------------------
    def to_dict(self, redacted: bool = False) -> dict[str, Any]:
        """The config as a nested dict of JSON values; ``redacted``: URL passwords and
        credential query values as ``***`` (:func:`redact`), for anything written or logged."""
        values = json.loads(json.dumps(dataclasses.asdict(self)))
        return _redact_values(values) if redacted else values

    def to_flat_dict(self, redacted: bool = False) -> dict[str, Any]:
        """``{"train.epochs": 20, ...}``: the form MLflow params and papermill take."""
        flat: dict[str, Any] = {}
        for key, value in self.to_dict(redacted).items():
            if isinstance(value, dict):
                for sub, v in value.items():
                    flat[f"{key}.{sub}"] = v
            else:
                flat[key] = value
        return flat

    def to_json(self, redacted: bool = False) -> str:
        return json.dumps(self.to_dict(redacted), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        """Write the config as JSON, its secrets redacted: a file is shared, the secret
        belongs to the process that was given it."""
        Path(path).write_text(self.to_json(redacted=True) + "\n")


# -- helpers -------------------------------------------------------------------------


def _load_yaml(text: str, path: Path) -> Any:
    """Parse a YAML config (``safe_load``: no Python objects); errors name file and line."""
    import yaml  # PyYAML; only a YAML config needs it

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(
            f"config file {path}{where} is not valid YAML: {problem}; fix that line "
            "(sections are mappings, e.g. 'train:' then '  epochs: 5')"
        ) from err

# keys of earlier releases and where they went: still read (old files, logged runs)
RENAMED = {"patch.cache_dir": "preprocess.cache_dir"}


def _warn_renamed(keys):
    for old in set(keys) & set(RENAMED):
        warnings.warn(
            f"config key {old!r} is now {RENAMED[old]!r}", DeprecationWarning, stacklevel=3
        )
    return keys


def _renamed(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (nested) with the keys of `RENAMED` moved to their new place."""
    if not isinstance(values, dict):
        return values
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for old, new in RENAMED.items():
        section, name = old.split(".")
        if isinstance(values.get(section), dict) and name in values[section]:
            _warn_renamed([old])
            value = values[section].pop(name)
            target, key = new.split(".")
            values.setdefault(target, {})
            if isinstance(values[target], dict):
                values[target].setdefault(key, value)
    return values


def _unit(closed_high: bool = False):
    if closed_high:
        return (lambda v: 0 <= v <= 1, "in [0, 1]")
    return (lambda v: 0 <= v < 1, "in [0, 1)")


_POSITIVE = (lambda v: v > 0 and math.isfinite(v), "a finite number > 0")
_AT_LEAST_1 = (lambda v: v >= 1, "≥ 1")
_NON_NEGATIVE = (lambda v: v >= 0 and math.isfinite(v), "a finite number ≥ 0")

# value ranges, checked with the choices: (test, what is allowed); None values pass
_RANGES: dict[str, tuple[Any, str]] = {
    "data.validation_fraction": _unit(),
    "preprocess.anisotropy_threshold": (lambda v: v >= 1, "≥ 1"),
    "patch.patch_size": (lambda v: all(p >= 1 for p in v), "positive sizes"),
    "patch.batch_size": _AT_LEAST_1,
    "patch.foreground_share": _unit(True),
    "patch.min_foreground": _unit(True),
    "patch.max_redraws": (lambda v: v >= 0, "≥ 0"),
    "patch.pad_multiple": _AT_LEAST_1,
    "patch.validation_patches": (lambda v: v >= 0, "≥ 0"),
    "model.depth": _AT_LEAST_1,
    "model.filters": _AT_LEAST_1,
    "model.dropout": _unit(),
    "train.epochs": _AT_LEAST_1,
    "train.steps_per_epoch": _AT_LEAST_1,
    "train.learning_rate": _POSITIVE,
    "train.plateau_factor": (lambda v: 0 < v < 1, "in (0, 1)"),
    "train.plateau_patience": (lambda v: v >= 0, "≥ 0"),
    "train.momentum": _unit(),
    "train.weight_decay": _NON_NEGATIVE,
    "train.clip_norm": _POSITIVE,
    "train.early_stopping_patience": (lambda v: v >= 0, "≥ 0"),
    "train.min_delta": _NON_NEGATIVE,
    "loss.smooth": _NON_NEGATIVE,
    "inference.overlap": (lambda v: 0 <= v < 0.95, "in [0, 0.95)"),
    "inference.batch_size": _AT_LEAST_1,
    "evaluation.folds": (lambda v: v >= 2, "≥ 2"),
    "evaluation.surface_tolerance_mm": _NON_NEGATIVE,
    "evaluation.hd_percentile": (lambda v: 0 < v <= 100, "in (0, 100]"),
    "tune.n_trials": _AT_LEAST_1,
    "tune.timeout": _POSITIVE,
    "tune.workers": _AT_LEAST_1,
    "tune.pruner_percentile": (lambda v: 0 <= v <= 100, "in [0, 100]"),
    "plan.gpu_memory": _POSITIVE,
}
_SECTION_NAMES: dict[type, str] = {}  # filled once Config is defined


def _literal_choices(hint: Any) -> tuple[str, ...] | None:
    """The values of a Literal field (alone or in a union), else None."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            if typing.get_origin(option) is Literal:
                return typing.get_args(option)
    return None


def _choice_error(key: str, value: Any, choices: Sequence[str], also: str = "") -> str:
    """``config key 'k': 'x' is not one of 'a', 'b'[ or ALSO]; did you mean 'a'?``"""
    text = str(value)
    same_case = [c for c in choices if c.lower() == text.lower()]
    close = same_case or difflib.get_close_matches(text, list(choices), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    listed = ", ".join(repr(c) for c in choices) + (f" or {also}" if also else "")
    return f"config key {key!r}: {value!r} is not one of {listed}{hint}"


def _describe(hint: Any) -> str:
    """How a non-choice type reads in an error: ``none``, ``2 numbers``, ``a number``."""
    if hint is type(None):
        return "none"
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        return "a list" if len(args) == 2 and args[1] is Ellipsis else f"{len(args)} numbers"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        hint, str(hint)
    )


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # resolves the string annotations: once per class


def _finite(value: Any) -> bool:
    """Whether a number, or every number in a tuple/list, is finite (others pass)."""
    if isinstance(value, bool):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, tuple | list):
        return all(_finite(v) for v in value)
    return True


def _check_section(section: Any) -> None:
    name = _SECTION_NAMES.get(type(section), type(section).__name__)
    hints = _hints(type(section))
    for f in dataclasses.fields(section):
        key, value = f"{name}.{f.name}", getattr(section, f.name)
        choices = _literal_choices(hints[f.name])
        if choices is not None and isinstance(value, str | type(None)):
            optional = type(None) in typing.get_args(hints[f.name])
            allowed = value in choices or (value is None and optional)
            if not allowed:
                raise ConfigError(_choice_error(key, value, choices))
        rule = _RANGES.get(key)
        if rule is not None and value is not None:
            test, allowed = rule
            try:
                ok = bool(test(value))
            except TypeError:
                ok = False
            if not ok:
                raise ConfigError(f"config key {key!r}: {value!r} is not {allowed}")
        if not _finite(value):  # NaN fails no comparison of its own: refuse it by name
            raise ConfigError(f"config key {key!r}: {value!r} is not a finite number")
        probability = f.name.endswith("_probability")
        if probability and not (isinstance(value, int | float) and 0 <= value <= 1):
            raise ConfigError(f"config key {key!r}: {value!r} is not a probability in [0, 1]")
    if name in ("augment", "preprocess"):
        for entry in section.extra:
            if not TRANSFORM_SPEC.match(entry):
                raise ConfigError(
                    f"config key '{name}.extra': {entry!r} is not of the form module:attribute"
                )
    if name == "plan":
        try:
            parse_duration(section.time_budget)
        except ConfigError as err:
            raise ConfigError(f"config key 'plan.time_budget': {err}") from None


def _given_keys(values: dict[str, Any]) -> set[str]:
    keys = set()
    for key, value in values.items() if isinstance(values, dict) else ():
        if isinstance(value, dict):
            keys |= {f"{key}.{sub}" for sub in value}
        else:
            keys.add(key)
    return keys


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
        choices = _literal_choices(hint)
        if choices is not None and isinstance(value, str):
            others = [_describe(o) for o in options if typing.get_origin(o) is not Literal]
            raise ConfigError(_choice_error(key, value, choices, " or ".join(others)))
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
    if origin is Literal:
        choices = typing.get_args(hint)
        if isinstance(value, str) and value in choices:
            return value
        raise ConfigError(_choice_error(key, value, choices))
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


_SECTION_NAMES.update(
    {hint: name for name, hint in typing.get_type_hints(Config).items() if name != "seed"}
)


# -- notebooks -----------------------------------------------------------------------

# The papermill parameters medseg's notebooks share, and the config key each one sets.
# A notebook's parameter left at None leaves its key to the config's default (or, for
# the keys the experiment plan sets, to the plan), so notebook defaults cannot drift.
NOTEBOOK_PARAMETERS: dict[str, str] = {
    "dataset": "data.dataset",
    "config_name": "data.config",
    "data_dir": "data.data_dir",
    "split": "data.split",
    "patch_size": "patch.patch_size",
    "batch_size": "patch.batch_size",
    "filters": "model.filters",
    "depth": "model.depth",
    "epochs": "train.epochs",
    "steps_per_epoch": "train.steps_per_epoch",
    "learning_rate": "train.learning_rate",
    "overlap": "inference.overlap",
    "protocol": "evaluation.protocol",
    "folds": "evaluation.folds",
    "space": "tune.space",
    "n_trials": "tune.n_trials",
    "timeout": "tune.timeout",
    "metric": "tune.metric",
    "pruner": "tune.pruner",
    "pruner_startup_trials": "tune.pruner_startup_trials",
    "storage": "tune.storage",
    "study_name": "tune.study_name",
    "workers": "tune.workers",
    "plan": "plan.mode",
    "time_budget": "plan.time_budget",
    "tracking_uri": "tracking.tracking_uri",
    "experiment": "tracking.experiment",
    "seed": "seed",
}


def from_parameters(
    namespace: Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    base: Config | None = None,
) -> Config:
    """The config a notebook's parameters describe.

    Parameters
    ----------
    namespace : mapping
        The notebook's variables (``globals()``): of them, the names in
        `NOTEBOOK_PARAMETERS` that are not None set their config keys. ``space`` may be
        a dict ``{key: "KIND:ARGS"}`` (papermill cannot pass ``=`` inside strings).
    overrides : mapping, optional
        Any other ``section.key`` values; they win over the named parameters.
    base : Config, optional
        Start from this config instead of the defaults.

    Raises
    ------
    ConfigError
        Naming the key (and the notebook parameter that set it) of a value the config
        refuses.
    """
    values = {}
    for name, key in NOTEBOOK_PARAMETERS.items():
        value = namespace.get(name)
        if value is None:
            continue
        if key == "tune.space" and isinstance(value, Mapping):
            value = [f"{k}={v}" for k, v in value.items()]
        values[key] = value
    config = base or Config()
    try:
        config = config.with_overrides(values)
    except ConfigError as err:
        names = [n for n, k in NOTEBOOK_PARAMETERS.items() if k in str(err)]
        where = f" (notebook parameter {names[0]!r})" if names else ""
        raise ConfigError(f"{err}{where}") from None
    return config.with_overrides(dict(overrides or {}))
