"""Epoch checkpoints a killed run resumes from: same epoch, weights and optimizer state.

A checkpoint is a directory ``epoch-NNNN`` (NNNN epochs done) holding the model weights
(``model.weights.h5``), every optimizer variable (``optimizer.npz``: step count, learning
rate, moments, loss scale) and ``state.json`` (epoch, history so far, the state of the
stopping and plateau callbacks). It is written into a temporary directory and renamed
into place, so a kill leaves either the whole checkpoint or none of it.

Under MultiWorkerMirroredStrategy only rank 0 writes (the weights are the same on every
worker) and every worker resumes from the directory, which must therefore be storage all
workers see.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import keras
import numpy as np

from medseg.training.strategy import is_chief

PATTERN = re.compile(r"^epoch-(\d{4,})$")
# attributes of Keras's EarlyStopping / ReduceLROnPlateau that carry across epochs
CALLBACK_STATE = ("wait", "best", "cooldown_counter", "stopped_epoch", "best_epoch")


def latest_checkpoint(directory: str | Path | None) -> Path | None:
    """The most recent complete checkpoint in ``directory`` (None when there is none)."""
    if directory is None or not Path(directory).is_dir():
        return None
    found = [
        (int(m.group(1)), p) for p in Path(directory).iterdir() if (m := PATTERN.match(p.name))
    ]
    return max(found)[1] if found else None


def save_checkpoint(
    directory: str | Path,
    model: keras.Model,
    epoch: int,
    history: dict[str, list[float]],
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write the checkpoint of ``epoch`` completed epochs atomically; keep the last ``keep``.

    Parameters
    ----------
    directory : path
        The run's checkpoint directory (created if needed).
    model : keras.Model
        A compiled model; its optimizer's variables are saved too.
    epoch : int
        Number of epochs completed.
    history : dict
        Per-epoch logs so far, restored with the checkpoint.
    extra : dict, optional
        More JSON-able state (e.g. callbacks').
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"epoch-{epoch:04d}"
    tmp = directory / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_weights(tmp / "model.weights.h5")
    variables = model.optimizer.variables
    np.savez(
        tmp / "optimizer.npz",
        **{f"v{i:04d}": np.asarray(v.numpy()) for i, v in enumerate(variables)},
    )
    state = {
        "epoch": epoch,
        "history": history,
        "optimizer_variables": [v.path for v in variables],
        **(extra or {}),
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for path in tmp.iterdir():  # the rename below publishes only what is on disk
        with path.open("rb") as f:
            os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    older = sorted(
        (int(m.group(1)), p) for p in directory.iterdir() if (m := PATTERN.match(p.name))
    )
    for _, path in older[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def restore_checkpoint(path: str | Path, model: keras.Model) -> dict[str, Any]:
    """Load weights and optimizer state from ``path`` into ``model``; return ``state.json``.

    The optimizer is built first, so its variables exist to be assigned.

    Raises
    ------
    ValueError
        When the checkpoint's optimizer variables do not match the model's optimizer.
    """
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    optimizer = model.optimizer
    if not optimizer.built:
        with model.distribute_strategy.scope():
            optimizer.build(model.trainable_variables)
    model.load_weights(path / "model.weights.h5")
    saved = np.load(path / "optimizer.npz")
    variables = optimizer.variables
    if len(saved.files) != len(variables):
        raise ValueError(
            f"checkpoint {path}: {len(saved.files)} optimizer variables saved, the optimizer "
            f"has {len(variables)} (another optimizer or model than the checkpoint's?)"
        )
    for i, variable in enumerate(variables):
        value = saved[f"v{i:04d}"]
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"checkpoint {path}: optimizer variable {state['optimizer_variables'][i]} has "
                f"shape {value.shape}, the optimizer's {variable.path} {tuple(variable.shape)}"
            )
        variable.assign(value)
    return state


class EpochCheckpoint(keras.callbacks.Callback):
    """Save a checkpoint after every epoch (rank 0 only) and hold the state to resume.

    Put it after the callbacks whose state it records (``watched``): on resume their state
    is restored in ``on_train_begin``, after they have reset themselves.

    Parameters
    ----------
    directory : path or None
        Where checkpoints go; None records the history only.
    history : dict
        The history so far (restored from a checkpoint, or empty); extended every epoch.
    watched : sequence of callbacks
        Callbacks (early stopping, plateau) whose counters are saved and restored.
    restored : dict, optional
        Callback state from the checkpoint being resumed.
    meta : dict, optional
        JSON-able facts saved with every checkpoint (e.g. ``steps_per_epoch``).
    """

    def __init__(self, directory, history, watched=(), restored=None, meta=None):
        super().__init__()
        self.meta = dict(meta or {})
        self.directory = None if directory is None else Path(directory)
        self.history = history
        self.watched = list(watched)
        self.restored = restored or {}

    def on_train_begin(self, logs=None):
        for i, callback in enumerate(self.watched):
            for key, value in self.restored.get(str(i), {}).items():
                setattr(callback, key, value)

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        if self.directory is None or not is_chief():
            return
        state = {
            str(i): {
                k: _jsonable(getattr(cb, k)) for k in CALLBACK_STATE if hasattr(cb, k)
            }
            for i, cb in enumerate(self.watched)
        }
        save_checkpoint(
            self.directory, self.model, epoch + 1, self.history, {**self.meta, "callbacks": state}
        )


def _jsonable(value):
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)  # "inf" / "-inf"; float("inf") reads it back
    return value


def restore_callback_state(state: dict) -> dict:
    """``state.json``'s callback state with infinities turned back into floats."""
    out = {}
    for index, values in state.get("callbacks", {}).items():
        out[index] = {
            k: float(v) if isinstance(v, str) and v in ("inf", "-inf", "nan") else v
            for k, v in values.items()
        }
    return out
