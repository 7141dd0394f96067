"""A training process killed mid-run resumes from its checkpoint to the uninterrupted result."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from medseg.training import latest_checkpoint
from medseg.workflows.experiment import checkpoint_directory

WORKER = Path(__file__).with_name("train_worker.py")
TIMEOUT = 240  # seconds a worker may take before the test fails instead of hanging


def launch(config, path, *args, env=None):
    config_file = Path(path).with_suffix(".config.json")
    config.save(config_file)
    env = {**{k: v for k, v in os.environ.items() if k != "TF_CONFIG"}, **(env or {})}
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(config_file), str(path), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process):
    try:
        _, err = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail(f"training process {process.args} did not finish in {TIMEOUT} s")
    assert process.returncode == 0, err[-3000:]


def training_folder(root):
    """The one per-training checkpoint folder under ``train.checkpoint_dir`` (None before)."""
    folders = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    assert len(folders) <= 1, folders
    return folders[0] if folders else None


def saved_weights(path):
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files)]


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_weights_as_an_uninterrupted_run(
    tiny_config, tmp_path
):
    config = tiny_config(
        **{
            "train.strategy": "default",
            "augment.enabled": False,
            "train.epochs": 4,
            "train.steps_per_epoch": 2,
        }
    )
    reference = launch(
        config.with_overrides({"train.checkpoint_dir": str(tmp_path / "ref")}),
        tmp_path / "reference.npz",
    )
    checkpoints = tmp_path / "checkpoints"
    resumable = config.with_overrides({"train.checkpoint_dir": str(checkpoints)})
    # a pause after every epoch leaves time to kill the process between two checkpoints
    victim = launch(resumable, tmp_path / "run.npz", "--epoch-pause", "1.0")
    deadline = time.monotonic() + TIMEOUT
    while (latest := latest_checkpoint(training_folder(checkpoints))) is None or latest.name < "epoch-0002":
        if victim.poll() is not None or time.monotonic() > deadline:
            victim.kill()
            pytest.fail(f"no checkpoint of epoch 2: {victim.communicate()[1][-3000:]}")
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    killed_at = json.loads((latest_checkpoint(training_folder(checkpoints)) / "state.json").read_text())["epoch"]
    assert 2 <= killed_at < 4 and not (tmp_path / "run.npz").exists()  # truly mid-run

    finish(launch(resumable, tmp_path / "run.npz"))
    finish(reference)
    # same stream from the checkpoint's step, same optimizer state: bit-identical on CPU
    for resumed, straight in zip(
        saved_weights(tmp_path / "run.npz"), saved_weights(tmp_path / "reference.npz"), strict=True
    ):
        np.testing.assert_array_equal(resumed, straight)
    history = json.loads((tmp_path / "run.json").read_text())
    expected = json.loads((tmp_path / "reference.json").read_text())
    assert set(history) == set(expected)
    for key in expected:  # NaN equals NaN here
        np.testing.assert_array_equal(history[key], expected[key], err_msg=key)
    assert len(history["loss"]) == 4


def test_checkpoint_folder_is_one_per_training(tiny_config, tmp_path):
    """Folds sharing train.checkpoint_dir never resume from one another (tuning trials get
    folders of their own: tests/test_tuning_faults.py)."""
    config = tiny_config(**{"train.checkpoint_dir": str(tmp_path)})
    folder = checkpoint_directory(config, ["c1", "c2"])
    assert Path(folder).parent == tmp_path
    # what does not shape training does not change the folder: a rerun resumes
    unrelated = {"tracking.experiment": "other", "evaluation.folds": 3, "inference.overlap": 0.25}
    assert checkpoint_directory(config.with_overrides(unrelated), ["c2", "c1"]) == folder
    # other training cases (another fold) or another config (another trial) do
    assert checkpoint_directory(config, ["c1", "c3"]) != folder
    assert checkpoint_directory(config.with_overrides({"train.learning_rate": 0.1}), ["c1", "c2"]) != folder
    assert checkpoint_directory(tiny_config(), ["c1"]) is None
