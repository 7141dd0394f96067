"""Optimizers, learning-rate schedules and the callbacks that stop or slow training."""

from __future__ import annotations

import math

import keras

from medseg.config import TrainConfig
from medseg.errors import TrainingDiverged

OPTIMIZERS = ("adam", "sgd", "adamw")
SCHEDULES = ("poly", "cosine", "plateau", "constant")


def total_steps(config: TrainConfig) -> int:
    return max(config.epochs * config.steps_per_epoch, 1)


def make_learning_rate(config: TrainConfig):
    """The learning rate or schedule ``config`` asks for (schedules step per batch).

    "poly" is nnU-Net's ``lr · (1 - step / total) ** 0.9``; "cosine" is
    ``lr · (1 + cos(π · step / total)) / 2``; both reach 0 after ``epochs ·
    steps_per_epoch`` steps. "plateau" and "constant" give the float ``lr`` (the plateau
    callback of :func:`training_callbacks` lowers it).
    """
    if config.lr_schedule in ("constant", "plateau"):
        return config.learning_rate
    if config.lr_schedule == "poly":
        return keras.optimizers.schedules.PolynomialDecay(
            config.learning_rate, decay_steps=total_steps(config), end_learning_rate=0.0, power=0.9
        )
    if config.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            config.learning_rate, decay_steps=total_steps(config), alpha=0.0
        )
    raise ValueError(
        f"train.lr_schedule={config.lr_schedule!r}: use one of {', '.join(SCHEDULES)}"
    )


def make_optimizer(config: TrainConfig) -> keras.optimizers.Optimizer:
    """Adam, SGD (Nesterov, ``config.momentum``: nnU-Net's 0.99) or AdamW.

    Gradient clipping is set on the optimizer only for the Keras ``fit`` loop, where Keras
    clips each replica's gradient; the custom loop clips the all-reduced gradient itself.
    """
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(
            f"train.optimizer={config.optimizer!r}: use one of {', '.join(OPTIMIZERS)}"
        )
    kwargs = {"learning_rate": make_learning_rate(config)}
    if config.weight_decay is not None:
        kwargs["weight_decay"] = config.weight_decay
    if config.clip_norm is not None:
        if config.clip_norm <= 0:
            raise ValueError(f"train.clip_norm={config.clip_norm} must be positive")
        if config.loop == "fit":
            kwargs["global_clipnorm"] = config.clip_norm
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(momentum=config.momentum, nesterov=True, **kwargs)
    if config.optimizer == "adamw":
        return keras.optimizers.AdamW(**kwargs)
    return keras.optimizers.Adam(**kwargs)


def monitor_mode(monitor: str) -> str:
    """"min" for losses, "max" for everything else (Dice, IoU, ...)."""
    return "min" if "loss" in monitor else "max"


def training_callbacks(config: TrainConfig, has_validation: bool) -> list[keras.callbacks.Callback]:
    """Early stopping and reduce-on-plateau as ``config`` asks, watching ``config.monitor``.

    Raises
    ------
    ValueError
        When a ``val_`` metric is monitored but there is no validation data.
    """
    callbacks: list[keras.callbacks.Callback] = []
    wanted = config.early_stopping_patience > 0 or config.lr_schedule == "plateau"
    if not wanted:
        return callbacks
    if config.monitor.startswith("val_") and not has_validation:
        raise ValueError(
            f"train.monitor={config.monitor!r} needs validation patches: set "
            "data.validation_fraction > 0 and patch.validation_patches > 0, or monitor 'loss'"
        )
    mode = monitor_mode(config.monitor)
    if config.lr_schedule == "plateau":
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor=config.monitor,
                factor=config.plateau_factor,
                patience=config.plateau_patience,
                min_delta=config.min_delta,
                mode=mode,
                verbose=0,
            )
        )
    if config.early_stopping_patience > 0:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=config.monitor,
                patience=config.early_stopping_patience,
                min_delta=config.min_delta,
                mode=mode,
                verbose=0,
            )
        )
    return callbacks


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Raise :class:`TrainingDiverged` at the end of an epoch whose loss is NaN or infinite.

    Raising (not ``stop_training``) is the point: the workflow then ends its run FAILED
    and logs no model, where a stopped run would look finished. Placed before the
    checkpoint callback, so no checkpoint holds the diverged weights.
    """

    def __init__(self, config: TrainConfig):
        super().__init__()
        self.config = config

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(float(loss)):
            return
        c = self.config
        clip = f"train.clip_norm={c.clip_norm}" if c.clip_norm else "no train.clip_norm"
        raise TrainingDiverged(
            f"training diverged: the loss is {float(loss)} at epoch {epoch + 1} "
            f"(train.learning_rate={c.learning_rate}, train.optimizer={c.optimizer!r}, {clip}); "
            "lower train.learning_rate or set train.clip_norm, and check the images for "
            "NaN or extreme values"
        )
