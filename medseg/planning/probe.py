"""Timing this machine: its conv3d throughput and the planned network's training step.

Machines of one kind differ ~9× in conv3d speed, so a CPU plan cannot take its step
count from a table: it measures. :func:`measure_conv_throughput` is the reference figure
(one 3×3×3 convolution, forward and backward); :func:`time_training_step` runs the planned
network's real training step (model, loss, optimizer, medseg's loop) on synthetic batches
after warm-up, the number a time budget is divided by.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import numpy as np

__all__ = ["conv_flops", "measure_conv_throughput", "time_training_step"]

# the reference convolution: 16 → 16 channels, 3×3×3, batch 2 × 32 × 64 × 64
REFERENCE_SHAPE = (2, 32, 64, 64)
REFERENCE_CHANNELS = 16


def conv_flops(voxels: float, kernel: Sequence[int], c_in: int, c_out: int) -> float:
    """FLOPs of one convolution's forward pass: 2 per multiply-add per output voxel."""
    return 2.0 * voxels * float(np.prod(kernel)) * c_in * c_out


def measure_conv_throughput(repeats: int = 10, warmup: int = 2) -> dict[str, float]:
    """Median time and GFLOP/s of the reference conv3d's forward + backward pass.

    The backward pass computes both gradients (input and kernel), each as costly as the
    forward, so a step is 3 × the forward's FLOPs.

    Returns
    -------
    dict
        ``seconds_per_step``, ``gflops`` (forward + backward) and ``repeats``.
    """
    import tensorflow as tf

    rng = np.random.default_rng(0)
    c = REFERENCE_CHANNELS
    x = tf.constant(rng.normal(size=(*REFERENCE_SHAPE, c)).astype(np.float32))
    w = tf.Variable(rng.normal(size=(3, 3, 3, c, c)).astype(np.float32) * 0.1)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.nn.conv3d(x, w, strides=[1] * 5, padding="SAME")
            loss = tf.reduce_sum(y * y)
        gx, gw = tape.gradient(loss, [x, w])
        return tf.reduce_sum(gx) + tf.reduce_sum(gw)

    for _ in range(warmup):
        step().numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step().numpy()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    flops = 3 * conv_flops(np.prod(REFERENCE_SHAPE), (3, 3, 3), c, c)
    return {"seconds_per_step": seconds, "gflops": flops / seconds / 1e9, "repeats": repeats}


def time_training_step(
    model,
    patch_size: Sequence[int],
    batch_size: int,
    steps: int = 3,
    warmup: int = 2,
    max_seconds: float | None = None,
    warmup_seconds: list | None = None,
) -> float:
    """Median seconds of one training step of a compiled ``model`` on synthetic batches.

    The step is medseg's own (:func:`medseg.training.custom_fit`, the model's loss,
    metrics and optimizer), so what is timed is what training will run; the first
    ``warmup`` steps (tracing, oneDNN's kernel selection) are not counted.

    Parameters
    ----------
    model : keras.Model
        Compiled, e.g. by :func:`medseg.training.build_compiled_model`.
    patch_size : sequence of int
        Spatial size of the synthetic patches.
    batch_size : int
    steps, warmup : int
        Timed and untimed steps.
    max_seconds : float, optional
        Stop timing once this much time was spent on timed steps (at least one step is
        always timed): on a slow machine a large candidate's probe stays short.
    warmup_seconds : list, optional
        Receives the warm-up's cost beyond its steps (tracing, compilation), which a
        training run pays once too.
    """
    import keras
    import tensorflow as tf

    from medseg.models import downsample_targets
    from medseg.training.loop import custom_fit

    in_channels = int(model.inputs[0].shape[-1])
    num_classes = int(model.outputs[0].shape[-1])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch_size, *patch_size, in_channels)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=(batch_size, *patch_size))
    y = np.eye(num_classes, dtype=np.float32)[labels]
    data = tf.data.Dataset.from_tensors((x, y)).repeat()
    if len(model.outputs) > 1:
        data = data.map(lambda a, b: (a, downsample_targets(b, model)))

    class Timer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times: list[float] = []

        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self.start)
            timed = self.times[warmup:]
            if max_seconds is not None and timed and sum(timed) >= max_seconds:
                self.model.stop_training = True

    timer = Timer()
    custom_fit(
        model, data, None, epochs=1, steps_per_epoch=warmup + steps,
        callbacks=[timer], verbose=0,
    )
    timed = timer.times[warmup:] or timer.times[-1:]
    median = float(statistics.median(timed))
    if warmup_seconds is not None:
        warmup_seconds.append(max(0.0, sum(timer.times[:warmup]) - warmup * median))
    return median
