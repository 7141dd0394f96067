"""A training process for the multi-process tests (not a test module).

    python tests/train_worker.py CONFIG.json WEIGHTS.npz [--track] [--epoch-pause SECONDS]

Trains the experiment of CONFIG.json (``train_model``, or ``run_training`` with
``--track``), in its own TensorFlow runtime with one CPU device, and saves the trained
weights to WEIGHTS.npz (``w0000``, ... in ``model.weights`` order) and the history to
WEIGHTS.json. ``TF_CONFIG`` in the environment makes it one worker of a cluster.
``--epoch-pause`` sleeps after every epoch, so that a test can kill the process between
two epochs' checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("weights")
    parser.add_argument("--track", action="store_true")
    parser.add_argument("--epoch-pause", type=float, default=0.0)
    args = parser.parse_args()

    from medseg.config import Config
    from medseg.training import make_strategy

    config = Config.from_file(args.config)
    make_strategy(config.train.strategy)  # first, before TensorFlow runs any op

    import keras
    import numpy as np

    class Pause(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            time.sleep(args.epoch_pause)

    callbacks = [Pause()] if args.epoch_pause else []
    if args.track:
        from medseg.tracking import run_training

        result, run_id = run_training(config, callbacks=callbacks)
        model, history = result.model, result.history
    else:
        from medseg.workflows.experiment import prepare_data, train_model

        model, history = train_model(config, prepare_data(config), callbacks)
    np.savez(args.weights, **{f"w{i:04d}": w for i, w in enumerate(model.get_weights())})
    with open(os.path.splitext(args.weights)[0] + ".json", "w") as f:
        json.dump(history, f)


if __name__ == "__main__":
    main()
