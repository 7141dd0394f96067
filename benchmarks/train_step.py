"""Training step time of the default 3D U-Net on this machine's CPU.

    python benchmarks/train_step.py [--steps 8] [--warmup 2] [--sizes 32,64,64 64,128,128]

Builds the model of the default config (``model.*``, ``train.*`` defaults: U-Net, 16
filters, depth 3, instance norm, Adam, Dice + CE) for 3 classes and 1 channel, and times
the steps of medseg's training loop (``custom_fit``, default strategy) on synthetic
batches of ``patch.batch_size`` (2): the median over ``--steps`` steps after ``--warmup``
(tracing and compilation) steps, per patch size. Prints a table and the peak RSS.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from medseg.config import Config  # noqa: E402
from medseg.training import (  # noqa: E402
    build_compiled_model,
    custom_fit,
    make_strategy,
    seed_everything,
)

CLASSES = ["background", "kidney", "tumour"]


class StepTimer(keras.callbacks.Callback):
    """Wall time of every training step (the loop's step function returns when done)."""

    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def synthetic(patch_size, batch_size, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch_size, *patch_size, 1)).astype(np.float32)
    labels = rng.integers(0, len(CLASSES), size=(batch_size, *patch_size))
    y = np.eye(len(CLASSES), dtype=np.float32)[labels]
    return tf.data.Dataset.from_tensors((x, y)).repeat()


def time_steps(config: Config, patch_size, steps: int, warmup: int) -> list[float]:
    seed_everything(config.seed, config.train.deterministic)
    strategy = make_strategy("default")
    model = build_compiled_model(
        config.model, config.train, CLASSES, 1, strategy, loss_config=config.loss
    )
    timer = StepTimer()
    custom_fit(
        model,
        synthetic(patch_size, config.patch.batch_size),
        None,
        epochs=1,
        steps_per_epoch=warmup + steps,
        callbacks=[timer],
        verbose=0,
    )
    return timer.times[warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sizes", nargs="+", default=["32,64,64", "64,128,128"])
    parser.add_argument(
        "--nondeterministic", action="store_true", help="without TF op determinism"
    )
    args = parser.parse_args()
    config = Config().with_overrides({"train.deterministic": not args.nondeterministic})
    print(
        f"model {config.model.name}, filters {config.model.filters}, depth {config.model.depth}, "
        f"{config.model.normalization} norm, batch {config.patch.batch_size}, "
        f"optimizer {config.train.optimizer}, op determinism {config.train.deterministic}; "
        f"CPU threads: {os.cpu_count()}"
    )
    print(f"{'patch':>14} | {'median s/step':>13} | {'min':>6} | {'max':>6} | {'voxels/s':>10}")
    for text in args.sizes:
        patch = tuple(int(v) for v in text.split(","))
        times = time_steps(config, patch, args.steps, args.warmup)
        median = statistics.median(times)
        voxels = config.patch.batch_size * int(np.prod(patch))
        print(
            f"{'×'.join(map(str, patch)):>14} | {median:13.3f} | {min(times):6.3f} | "
            f"{max(times):6.3f} | {voxels / median:10.3g}"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
