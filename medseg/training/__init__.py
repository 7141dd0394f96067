"""Training: strategies, compiled models, the training loops, checkpoints and resume."""

from medseg.errors import TrainingDiverged
from medseg.training.checkpoint import (
    EpochCheckpoint,
    latest_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from medseg.training.loop import custom_fit
from medseg.training.optimization import (
    StopOnNonFiniteLoss,
    make_learning_rate,
    make_optimizer,
    monitor_mode,
    training_callbacks,
)
from medseg.training.strategy import (
    describe_devices,
    describe_strategy,
    is_chief,
    make_strategy,
    worker_count,
    worker_rank,
)
from medseg.training.trainer import (
    build_compiled_model,
    fit,
    precision_policy,
    resume_step,
    seed_everything,
)

__all__ = [
    "EpochCheckpoint",
    "StopOnNonFiniteLoss",
    "TrainingDiverged",
    "build_compiled_model",
    "custom_fit",
    "describe_devices",
    "describe_strategy",
    "fit",
    "is_chief",
    "latest_checkpoint",
    "make_learning_rate",
    "make_optimizer",
    "make_strategy",
    "monitor_mode",
    "precision_policy",
    "restore_checkpoint",
    "resume_step",
    "save_checkpoint",
    "seed_everything",
    "training_callbacks",
    "worker_count",
    "worker_rank",
]
