"""Compiling and fitting a model under a ``tf.distribute`` strategy."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

from medseg.config import ModelConfig, TrainConfig
from medseg.models import DiceCrossEntropyLoss, build_model, class_dice_metrics

OPTIMIZERS = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}


def make_learning_rate(config: TrainConfig):
    """The learning rate or schedule ``config`` asks for (schedules step per batch)."""
    if config.lr_schedule == "constant":
        return config.learning_rate
    if config.lr_schedule == "poly":
        return keras.optimizers.schedules.PolynomialDecay(
            config.learning_rate,
            decay_steps=max(config.epochs * config.steps_per_epoch, 1),
            end_learning_rate=0.0,
            power=0.9,
        )
    raise ValueError(f"train.lr_schedule={config.lr_schedule!r}: use 'poly' or 'constant'")


def make_optimizer(config: TrainConfig) -> keras.optimizers.Optimizer:
    try:
        optimizer = OPTIMIZERS[config.optimizer]
    except KeyError:
        raise ValueError(
            f"train.optimizer={config.optimizer!r}: use one of {', '.join(OPTIMIZERS)}"
        ) from None
    learning_rate = make_learning_rate(config)
    if config.optimizer == "sgd":
        return optimizer(learning_rate=learning_rate, momentum=0.99, nesterov=True)
    return optimizer(learning_rate=learning_rate)


def build_compiled_model(
    model_config: ModelConfig,
    train_config: TrainConfig,
    class_names: Sequence[str],
    in_channels: int,
    strategy: tf.distribute.Strategy,
) -> keras.Model:
    """Build and compile the model inside ``strategy``'s scope (variables get mirrored)."""
    with strategy.scope():
        model = build_model(
            model_config.name,
            num_classes=len(class_names),
            in_channels=in_channels,
            ndim=3,
            depth=model_config.depth,
            filters=model_config.filters,
            normalization=model_config.normalization,
            dropout=model_config.dropout,
        )
        model.compile(
            optimizer=make_optimizer(train_config),
            loss=DiceCrossEntropyLoss(),
            metrics=class_dice_metrics(list(class_names)),
        )
    return model


def fit(
    model: keras.Model,
    train: tf.data.Dataset,
    validation: tf.data.Dataset | None,
    config: TrainConfig,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int = 2,
) -> dict[str, list[float]]:
    """Train ``model`` for ``config.epochs`` × ``config.steps_per_epoch`` steps.

    Returns
    -------
    dict
        The Keras history: metric name → one value per epoch.
    """
    history = model.fit(
        train,
        epochs=config.epochs,
        steps_per_epoch=config.steps_per_epoch,
        validation_data=validation,
        callbacks=list(callbacks),
        shuffle=False,  # the tf.data pipeline shuffles, seeded
        verbose=verbose,
    )
    return {k: [float(v) for v in values] for k, values in history.history.items()}
