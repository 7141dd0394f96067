"""Non-finite numbers: refused in the config, and a training whose loss stops being finite
ends its MLflow run FAILED with the reason, with no model logged or registered."""

from __future__ import annotations

import math

import mlflow
import pytest
import tensorflow as tf
from mlflow.tracking import MlflowClient

from medseg.cli import main
from medseg.config import Config, ConfigError
from medseg.errors import TrainingDiverged
from medseg.tracking import MlflowObserver
from medseg.workflows import run_experiment


@pytest.mark.parametrize(
    "override",
    [
        "train.learning_rate=nan",
        "train.learning_rate=inf",
        "preprocess.crop_threshold=nan",
        "loss.tversky_alpha=nan",
        "augment.flip_probability=nan",
    ],
)
def test_non_finite_numbers_are_refused_naming_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"config key '{key}': (nan|inf) is not"):
        Config().with_overrides([override])


def test_cli_refuses_a_nan_learning_rate_before_training(capsys):
    assert main(["train", "train.learning_rate=nan"]) == 2
    err = capsys.readouterr().err
    assert "config key 'train.learning_rate': nan is not a finite number" in err


def poison(image, label, seed):
    """A patch transform that makes every image NaN: the loss cannot stay finite."""
    return image * tf.constant(math.nan, image.dtype), label


def test_a_diverging_run_ends_failed_and_registers_nothing(tiny_config, tmp_path):
    store = tmp_path / "mlruns"
    uri = f"sqlite:///{store}/mlflow.db"
    config = tiny_config(
        **{
            "tracking.tracking_uri": uri,
            "tracking.artifact_root": str(store),
            "tracking.experiment": "divergence",
            "tracking.register_model": "diverged-model",
            "train.epochs": 3,
        }
    )
    observer = MlflowObserver()
    with pytest.raises(TrainingDiverged, match=r"training diverged: the loss is nan at epoch 1"):
        run_experiment(config, observer=observer, transforms=[poison])

    client = MlflowClient(uri)
    run = client.get_run(observer.run_id)
    assert run.info.status == "FAILED"
    assert "training diverged" in run.data.tags["medseg.error"]
    assert "train.learning_rate" in run.data.tags["medseg.error"]
    # no model anywhere: not among the run's artifacts, not in the registry
    assert "model" not in {a.path for a in client.list_artifacts(observer.run_id)}
    assert client.search_logged_models([run.info.experiment_id]) == []
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_registered_model("diverged-model")
    # the epoch was not recorded as if it were a result
    assert client.get_metric_history(observer.run_id, "loss") == []
