"""Choosing the ``tf.distribute`` strategy a run trains under, and where this process sits
in a multi-worker cluster (from ``TF_CONFIG``, without starting TensorFlow)."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import warnings

import tensorflow as tf

STRATEGIES = ("auto", "default", "mirrored", "multiworker")

# One strategy object per name and process: several MirroredStrategy objects with collective
# ops clash in one process, and MultiWorkerMirroredStrategy can be created only once.
_CACHE: dict[str, tf.distribute.Strategy] = {}


def cluster_spec() -> dict:
    """``TF_CONFIG``'s ``cluster`` and ``task`` ({} when unset).

    Raises
    ------
    ValueError
        When ``TF_CONFIG`` is not valid JSON.
    """
    text = os.environ.get("TF_CONFIG", "").strip()
    if not text:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"TF_CONFIG is not valid JSON: {err}") from err


def worker_count() -> int:
    """Number of training processes ``TF_CONFIG`` declares (chief + workers; 1 without it)."""
    cluster = cluster_spec().get("cluster", {})
    return max(len(cluster.get("chief", [])) + len(cluster.get("worker", [])), 1)


def worker_rank() -> int:
    """This process's rank: 0 for the chief (or worker 0 when there is no chief)."""
    spec = cluster_spec()
    task = spec.get("task", {})
    kind, index = task.get("type", "worker"), int(task.get("index", 0))
    if kind == "chief":
        return 0
    has_chief = bool(spec.get("cluster", {}).get("chief"))
    return index + 1 if has_chief else index


def is_chief() -> bool:
    """Whether this process logs and writes checkpoints (rank 0)."""
    return worker_rank() == 0


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """The distribution strategy called ``name``, created once per process.

    Parameters
    ----------
    name : {"auto", "default", "mirrored", "multiworker"}
        "auto": MultiWorkerMirroredStrategy when ``TF_CONFIG`` lists several workers,
        MirroredStrategy over all GPUs when there are several, the default strategy
        otherwise. "mirrored": MirroredStrategy over all GPUs, or over all logical CPU
        devices when there is no GPU (how it is tested on one machine). "multiworker":
        MultiWorkerMirroredStrategy over the cluster in ``TF_CONFIG`` (one process per
        machine; each process's GPUs, or its CPU). "default": no distribution.

    Notes
    -----
    MultiWorkerMirroredStrategy must be created before TensorFlow runs its first op in the
    process (its collective ops are configured at start-up), so call this first thing; the
    same object is returned on later calls.
    """
    if name not in STRATEGIES:
        raise ValueError(f"train.strategy={name!r}: use one of {', '.join(STRATEGIES)}")
    if name == "auto":
        if worker_count() > 1:
            name = "multiworker"
        elif len(tf.config.list_physical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name not in _CACHE:
        _CACHE[name] = _mirrored() if name == "mirrored" else _multiworker()
    return _CACHE[name]


def _mirrored() -> tf.distribute.Strategy:
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return tf.distribute.MirroredStrategy(devices=[d.name for d in gpus])
    # CPU replicas: reduce through one device rather than collective ops, whose
    # instance keys clash when several strategies live in one process
    cpus = tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy(
        devices=[d.name for d in cpus],
        cross_device_ops=tf.distribute.ReductionToOneDevice(),
    )


def public_hosts(spec: dict | None = None) -> list[str]:
    """The ``host:port`` entries of ``TF_CONFIG``'s cluster that are neither loopback nor in
    a private range (RFC 1918, link-local, unique-local IPv6), resolved where they are names.

    TensorFlow's gRPC workers listen on every interface without authentication (its
    design): anyone who can reach the port can run ops in the worker. A name that does not
    resolve counts as public (it cannot be shown to be private).
    """
    cluster = (cluster_spec() if spec is None else spec).get("cluster", {})
    exposed = []
    for entries in cluster.values():
        for entry in entries:
            host = str(entry).rsplit(":", 1)[0].strip("[]")
            try:
                addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
            except (socket.gaierror, UnicodeError):
                addresses = set()
            private = addresses and all(
                ipaddress.ip_address(a.split("%")[0]).is_private
                or ipaddress.ip_address(a.split("%")[0]).is_loopback
                for a in addresses
            )
            if not private:
                exposed.append(str(entry))
    return exposed


def _multiworker() -> tf.distribute.Strategy:
    exposed = public_hosts()
    if exposed:
        warnings.warn(
            f"TF_CONFIG names workers on public addresses ({', '.join(exposed)}): "
            "TensorFlow's gRPC workers accept unauthenticated connections from anyone who "
            "can reach their port; keep the cluster on a private network or behind a "
            "firewall (README, Training)",
            RuntimeWarning,
            stacklevel=3,
        )
    if worker_count() < 2:
        raise ValueError(
            "train.strategy='multiworker' needs TF_CONFIG listing the cluster's workers "
            "(e.g. {\"cluster\": {\"worker\": [\"host1:port\", \"host2:port\"]}, "
            "\"task\": {\"type\": \"worker\", \"index\": 0}})"
        )
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as err:
        raise RuntimeError(
            "MultiWorkerMirroredStrategy must be created before TensorFlow runs any op: call "
            "medseg.training.make_strategy('multiworker') at the start of the program "
            f"({err})"
        ) from err


def describe_devices() -> list[str]:
    """Names and types of the logical devices, for the run's lineage."""
    return [f"{d.name} ({d.device_type})" for d in tf.config.list_logical_devices()]


def describe_strategy(strategy: tf.distribute.Strategy) -> dict[str, str]:
    """The strategy's class, replica count and this process's place in the cluster."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        name = "MultiWorkerMirroredStrategy"  # its class is CollectiveAllReduceStrategy
    elif isinstance(strategy, tf.distribute.MirroredStrategy):
        name = "MirroredStrategy"
    else:
        name = "default"
    return {
        "strategy": name,
        "replicas": str(strategy.num_replicas_in_sync),
        "workers": str(worker_count()),
        "rank": str(worker_rank()),
    }
