"""Building a compiled model under a strategy, and training it with checkpoints and resume.

:func:`fit` runs the custom ``strategy.run`` loop of :mod:`medseg.training.loop` (any
strategy, MultiWorkerMirroredStrategy included) or Keras ``fit``; both take the same Keras
callbacks, report the same metrics and return the same history dict.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence

import keras
import tensorflow as tf

from medseg import models
from medseg.config import LossConfig, ModelConfig, TrainConfig
from medseg.progress import keras_verbose
from medseg.training.checkpoint import (
    EpochCheckpoint,
    latest_checkpoint,
    restore_callback_state,
    restore_checkpoint,
)
from medseg.training.loop import custom_fit
from medseg.training.optimization import StopOnNonFiniteLoss, make_optimizer, training_callbacks

PRECISIONS = ("auto", "float32", "mixed_float16")
LOOPS = ("custom", "fit")


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy, TensorFlow and Keras; on CPU also make TF's ops deterministic.

    Op determinism is switched on only where there is no GPU: on this project's CPU its cost
    is below the noise of step times (``benchmarks/train_step.py --nondeterministic``),
    while on a GPU some kernels lack a deterministic version (they would raise
    ``UnimplementedError``) and others are slower. The ``tf.data`` pipelines draw
    stateless random numbers from (seed, index), so they stay parallel under it.
    """
    keras.utils.set_random_seed(seed)
    if deterministic and not tf.config.list_physical_devices("GPU"):
        tf.config.experimental.enable_op_determinism()


def precision_policy(config: TrainConfig) -> str:
    """The Keras dtype policy: mixed_float16 only on a GPU unless asked for explicitly."""
    if config.precision not in PRECISIONS:
        raise ValueError(
            f"train.precision={config.precision!r}: use one of {', '.join(PRECISIONS)}"
        )
    if config.precision == "auto":
        return "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"
    return config.precision


@contextlib.contextmanager
def _dtype_policy(name: str):
    """Layers built inside take policy ``name``; the global policy is restored after."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _build_network(model_config, num_classes, in_channels, ndim, topology, widths):
    return models.model_from_config(
        model_config, num_classes, in_channels, ndim, topology=topology, widths=widths
    )


def _loss(loss_config: LossConfig | None, num_classes: int) -> keras.losses.Loss:
    if loss_config is None:
        return models.DiceCrossEntropyLoss()
    return models.loss_from_config(loss_config, num_classes)


def _metrics(class_names: Sequence[str], regions: dict | None) -> list:
    return models.metrics_from_config(list(class_names), regions or {})


def build_compiled_model(
    model_config: ModelConfig,
    train_config: TrainConfig,
    class_names: Sequence[str],
    in_channels: int,
    strategy: tf.distribute.Strategy,
    loss_config: LossConfig | None = None,
    regions: dict[str, list[int]] | None = None,
    ndim: int = 3,
    topology=None,
    widths=None,
) -> keras.Model:
    """Build and compile the model inside ``strategy``'s scope (variables get mirrored).

    The loss is ``loss_config``'s (Dice + cross-entropy without one); with deep
    supervision every output gets it, weighted as nnU-Net does, and the metrics (per-class
    Dice, and region metrics where available) watch the full-resolution output only. A
    plan's ``topology`` (per-stage strides and kernels) and ``widths`` shape the network
    (:func:`medseg.models.model_from_config`). Under
    the mixed_float16 policy Keras wraps the optimizer in a ``LossScaleOptimizer``.
    """
    num_classes = len(class_names)
    with strategy.scope(), _dtype_policy(precision_policy(train_config)):
        model = _build_network(model_config, num_classes, in_channels, ndim, topology, widths)
        loss = _loss(loss_config, num_classes)
        metrics = _metrics(class_names, regions)
        n_outputs = len(model.outputs)
        if n_outputs > 1:
            model.compile(
                optimizer=make_optimizer(train_config),
                loss=[loss] * n_outputs,
                loss_weights=models.deep_supervision_weights(n_outputs),
                metrics=[metrics] + [[] for _ in range(n_outputs - 1)],
            )
        else:
            model.compile(optimizer=make_optimizer(train_config), loss=loss, metrics=metrics)
    return model


def fit(
    model: keras.Model,
    train: tf.data.Dataset,
    validation: tf.data.Dataset | None,
    config: TrainConfig,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int | None = None,
    checkpoint_dir: str | None = None,
    train_start_step: int = 0,
    augment=None,
) -> dict[str, list[float]]:
    """Train ``model`` for ``config.epochs`` × ``config.steps_per_epoch`` steps.

    Parameters
    ----------
    model : keras.Model
        Compiled by :func:`build_compiled_model` under the strategy to train with.
    train : tf.data.Dataset
        Endless training batches, starting at global step ``train_start_step`` (build it
        with ``start_step=`` :func:`resume_step` to resume without reading skipped batches;
        otherwise it is skipped forward to the checkpoint's step).
    validation : tf.data.Dataset, optional
        Finite validation batches, evaluated after every epoch (``val_`` logs).
    config : TrainConfig
        Epochs, loop, stopping, clipping.
    callbacks : sequence of keras.callbacks.Callback
        Called by either loop, as Keras ``fit`` calls them.
    verbose : int, optional
        Keras's: 1 a progress bar of the epoch's steps with ETA, 2 one line per epoch, 0
        nothing; default :func:`medseg.progress.keras_verbose` (1 on a terminal, 2
        otherwise, 0 with ``--quiet`` / ``MEDSEG_QUIET=1``), for either loop.
    checkpoint_dir : str, optional
        Overrides ``config.checkpoint_dir``: where a checkpoint is written after every
        epoch and from whose latest checkpoint training resumes.
    augment : callable, optional
        Batch augmentation inside the compiled step (``augment.device="accelerator"``,
        :class:`medseg.pipeline.batched.BatchAugmentation`); ``train.loop="custom"`` only.

    Returns
    -------
    dict
        Metric name → one value per epoch, the epochs before a resume included.
    """
    if config.loop not in LOOPS:
        raise ValueError(f"train.loop={config.loop!r}: use one of {', '.join(LOOPS)}")
    if augment is not None and config.loop != "custom":
        raise ValueError(
            f"augment.device='accelerator' augments inside medseg's training step, which "
            f"train.loop={config.loop!r} does not run: set train.loop='custom' or "
            "augment.device='cpu'"
        )
    strategy = model.distribute_strategy
    if config.loop == "fit" and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        raise ValueError(
            "train.loop='fit' cannot train under MultiWorkerMirroredStrategy (Keras 3's fit "
            "fails there, keras-team/keras#20585): use train.loop='custom'"
        )
    directory = checkpoint_dir or config.checkpoint_dir
    controls = training_callbacks(config, validation is not None)
    initial_epoch, history, restored = 0, {}, {}
    latest = latest_checkpoint(directory)
    if latest is not None:
        state = restore_checkpoint(latest, model)
        _check_resumable(state, config, latest)
        initial_epoch, history = int(state["epoch"]), state["history"]
        restored = restore_callback_state(state)
    checkpoint = EpochCheckpoint(
        directory, history, controls, restored, {"steps_per_epoch": config.steps_per_epoch}
    )
    every = [StopOnNonFiniteLoss(config), *controls, *callbacks, checkpoint]
    if len(model.outputs) > 1:
        every.insert(0, FullResolutionNames(model.output_names[0]))
    if initial_epoch >= config.epochs or _stopped(restored):
        return history
    skip = initial_epoch * config.steps_per_epoch - train_start_step
    if skip < 0:
        raise ValueError(
            f"the training data starts at step {train_start_step}, after the step the "
            f"checkpoint in {directory} resumes from ({initial_epoch * config.steps_per_epoch})"
        )
    dataset = train.skip(skip) if skip else train
    if verbose is None:
        verbose = keras_verbose()
    if config.loop == "fit":
        model.fit(
            dataset,
            epochs=config.epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=config.steps_per_epoch,
            validation_data=validation,
            callbacks=every,
            shuffle=False,  # the tf.data pipeline shuffles, seeded
            verbose=verbose,
        )
    else:
        custom_fit(
            model,
            dataset,
            validation,
            epochs=config.epochs,
            steps_per_epoch=config.steps_per_epoch,
            initial_epoch=initial_epoch,
            callbacks=every,
            clip_norm=config.clip_norm,
            verbose=verbose,
            augment=augment,
        )
    return checkpoint.history


class FullResolutionNames(keras.callbacks.Callback):
    """Log the full-resolution output's metrics under the names a single-output model uses.

    Keras prefixes the metrics of a multi-output (deep-supervised) model with the output
    name (``probabilities_dice_kidney``); renaming them in place, before any other callback
    reads the logs, keeps monitors, MLflow metric names and pruning keys the same with and
    without deep supervision. Per-output losses keep their names.
    """

    def __init__(self, output_name: str):
        super().__init__()
        self.prefix = f"{output_name}_"

    def on_epoch_end(self, epoch, logs=None):
        if not logs:
            return
        for key in list(logs):
            bare = key.removeprefix("val_")
            if bare.startswith(self.prefix) and not bare.endswith("_loss"):
                new = key.replace(self.prefix, "", 1)
                logs[new] = logs.pop(key)


def resume_step(config: TrainConfig, checkpoint_dir: str | None = None) -> int:
    """The global step a run resumes from: its latest checkpoint's epochs × steps (or 0)."""
    latest = latest_checkpoint(checkpoint_dir or config.checkpoint_dir)
    if latest is None:
        return 0
    state = json.loads((latest / "state.json").read_text())
    return int(state["epoch"]) * config.steps_per_epoch


def _stopped(restored: dict) -> bool:
    """Whether early stopping had already ended the checkpointed run."""
    return any(int(s.get("stopped_epoch", 0) or 0) > 0 for s in restored.values())


def _check_resumable(state: dict, config: TrainConfig, path) -> None:
    saved = state.get("steps_per_epoch")
    if saved is not None and saved != config.steps_per_epoch:
        raise ValueError(
            f"checkpoint {path} was written with train.steps_per_epoch={saved}, this run has "
            f"{config.steps_per_epoch}: resume with the same value or another checkpoint_dir"
        )
