"""Training step time with augmentation in tf.data or in the compiled step.

    python benchmarks/gpu_step.py [--dry-run] [--steps 20] [--warmup 3] [--patch 32,64,64]

For ``augment.device`` ``cpu`` (each patch augmented in the ``tf.data`` map) and
``accelerator`` (tf.data only crops and batches; :class:`medseg.pipeline.batched.
BatchAugmentation` augments the batch inside the compiled step), trains the default-config
model on a synthetic case table with the default augmentation and reports per step:

- the median wall time of a step (waiting for the batch + the compiled step),
- the device busy share: time inside the compiled step / wall time (1.0: the input
  pipeline keeps the device fed),
- patches per second.

The step is medseg's (forward, ``compute_loss``, gradients, ``optimizer.apply``) under the
model's dtype policy (``train.precision="auto"``: mixed_float16 on a GPU, float32 on CPU);
augmentation always computes in float32. ``--dry-run`` uses a tiny model and patch and a
few steps (< 60 s on a 2-core CPU) to check that both paths run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from medseg.config import Config  # noqa: E402
from medseg.pipeline import CaseTable, training_dataset  # noqa: E402
from medseg.pipeline.batched import BatchAugmentation  # noqa: E402
from medseg.training import build_compiled_model, make_strategy, seed_everything  # noqa: E402
from medseg.training.trainer import precision_policy  # noqa: E402

CLASSES = ["background", "kidney", "tumour"]


def synthetic_table(shape, cases: int = 2, seed: int = 0) -> CaseTable:
    """Random smooth images and labels, no foreground index (uniform patch sampling)."""
    rng = np.random.default_rng(seed)
    images = [np.cumsum(rng.normal(size=(*shape, 1)), 0).astype(np.float32) for _ in range(cases)]
    labels = [rng.integers(0, len(CLASSES), size=shape).astype(np.int32) for _ in range(cases)]
    return CaseTable(
        case_ids=tuple(f"case{i}" for i in range(cases)),
        images=tuple(tf.constant(x) for x in images),
        labels=tuple(tf.constant(y) for y in labels),
        coords=(tf.zeros([0, 3], tf.int32),) * cases,
        classes=(tf.zeros([0], tf.int32),) * cases,
    )


def time_device(config: Config, table: CaseTable, device: str, steps: int, warmup: int) -> dict:
    """Median step wall time, busy share and patches/s of ``augment.device=device``."""
    seed_everything(config.seed, config.train.deterministic)
    on_step = device == "accelerator"
    stream = dataclasses.replace(config.augment, enabled=False) if on_step else config.augment
    batch_size = config.patch.batch_size
    ds = training_dataset(
        table, len(table), config.patch, len(CLASSES), config.seed, augment=stream
    )
    model = build_compiled_model(
        config.model, config.train, CLASSES, 1, make_strategy("default"), loss_config=config.loss
    )
    augment = BatchAugmentation(config.augment, config.seed, batch_size) if on_step else None
    model._symbolic_build(data_batch=ds.element_spec)
    model.optimizer.build(model.trainable_variables)

    @tf.function
    def train_step(x, y, step):
        if augment is not None:
            x, y = augment(x, y, step)
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
            scaled = model.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, model.trainable_variables)
        model.optimizer.apply(grads, model.trainable_variables)
        return loss

    iterator = iter(ds)
    walls, busy = [], []
    for step in range(warmup + steps):
        start = time.perf_counter()
        x, y = next(iterator)
        fed = time.perf_counter()
        float(train_step(x, y, tf.constant(step, tf.int64)))  # float(): wait for the device
        end = time.perf_counter()
        if step >= warmup:
            walls.append(end - start)
            busy.append(end - fed)
    median = statistics.median(walls)
    return {
        "device": device,
        "step": median,
        "busy": sum(busy) / sum(walls),
        "patches": batch_size / median,
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny model, patch and steps")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--patch", default="32,64,64")
    args = parser.parse_args(argv)
    overrides = {"patch.patch_size": tuple(int(v) for v in args.patch.split(","))}
    steps, warmup = args.steps, args.warmup
    if args.dry_run:
        overrides = {"patch.patch_size": (8, 16, 16), "model.filters": 4, "model.depth": 2}
        steps, warmup = 4, 1
    config = Config().with_overrides({**overrides, "patch.foreground_share": 0.0})
    patch = config.patch.patch_size
    table = synthetic_table(tuple(2 * s for s in patch))
    print(
        f"patch {'×'.join(map(str, patch))}, batch {config.patch.batch_size}, model "
        f"{config.model.name} ({config.model.filters} filters, depth {config.model.depth}), "
        f"policy {precision_policy(config.train)}, GPUs "
        f"{len(tf.config.list_physical_devices('GPU'))}, {steps} steps after {warmup}"
    )
    print(f"{'augment.device':>14} | {'s/step':>8} | {'busy share':>10} | {'patches/s':>9}")
    rows = []
    for device in ("cpu", "accelerator"):
        row = time_device(config, table, device, steps, warmup)
        rows.append(row)
        print(
            f"{device:>14} | {row['step']:8.3f} | {row['busy']:10.2f} | {row['patches']:9.1f}",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
