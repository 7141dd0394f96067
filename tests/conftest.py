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


# A config small enough to train in seconds on the tiny phantom.
TINY_OVERRIDES = {
    "data.config": "tiny",
    "preprocess.target_spacing": [4.0, 2.0, 2.0],
    "patch.patch_size": [8, 16, 16],
    "patch.validation_patches": 1,
    "model.filters": 4,
    "model.depth": 2,
    "train.epochs": 2,
    "train.steps_per_epoch": 2,
    # augmentation stays on, without XLA: compiling it costs seconds per test process
    "augment.jit": False,
    # these tests exercise the phases with the config's own values; planning (and its
    # probe of this machine) is tested in test_planning.py
    "plan.mode": "none",
}


@pytest.fixture(scope="session")
def tiny_config(tiny_data_dir):
    """``tiny_config(**overrides)``: a Config on the tiny phantom with ``overrides`` applied."""
    from medseg.config import Config

    def make(**overrides):
        values = {**TINY_OVERRIDES, "data.data_dir": tiny_data_dir, **overrides}
        return Config().with_overrides(values)

    return make
