"""Shared test set-up.

TensorFlow's logical devices can only be configured before the runtime starts, so the
split of the CPU into two logical devices (for MirroredStrategy tests) happens here, at
collection time, for the whole session.
"""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """A TFDS data dir holding ``kits_phantom/tiny``, built once per test session."""
    from medseg import datasets

    data_dir = tmp_path_factory.mktemp("tfds")
    datasets.prepare("kits_phantom", "tiny", str(data_dir))
    return str(data_dir)
