"""Choosing the ``tf.distribute`` strategy a run trains under."""

from __future__ import annotations

import tensorflow as tf

STRATEGIES = ("auto", "default", "mirrored")


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """The distribution strategy called ``name``.

    Parameters
    ----------
    name : {"auto", "default", "mirrored"}
        "auto": MirroredStrategy over all GPUs when there are several, the default
        strategy otherwise. "mirrored": MirroredStrategy over all GPUs, or over all
        logical CPU devices when there is no GPU (how it is tested on one machine).
        "default": no distribution.
    """
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if gpus:
            return tf.distribute.MirroredStrategy(devices=[d.name for d in gpus])
        # CPU replicas: reduce through one device rather than collective ops, whose
        # instance keys clash when several strategies live in one process
        cpus = tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy(
            devices=[d.name for d in cpus],
            cross_device_ops=tf.distribute.ReductionToOneDevice(),
        )
    raise ValueError(f"train.strategy={name!r}: use one of {', '.join(STRATEGIES)}")


def describe_devices() -> list[str]:
    """Names and types of the logical devices, for the run's lineage."""
    return [f"{d.name} ({d.device_type})" for d in tf.config.list_logical_devices()]
