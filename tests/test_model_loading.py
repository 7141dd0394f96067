"""Models loaded back from MLflow safely: a .keras file in Keras' safe mode, never an exported
SavedModel, and only the file that was logged (its SHA-256 recorded in the tracking store)."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import keras
import mlflow
import numpy as np
import pytest
import yaml

from medseg.models import build_unet
from medseg.tracking.model import SHA256_TAG, load_model, load_plan, log_model, source_run_id

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

X = np.random.default_rng(0).normal(size=(1, 8, 16, 16, 1)).astype(np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlruns")
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("safe", artifact_location=(root / "a").as_uri())
    return uri, experiment


@pytest.fixture(scope="module")
def unet():
    keras.utils.set_random_seed(0)
    return build_unet(3, depth=2, filters=4)


def logged(store, model, register_as=None):
    """Log ``model`` with medseg's log_model into a fresh run: (run id, ModelInfo)."""
    uri, experiment = store
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=experiment) as run:
        info = log_model(model, register_as)
    return run.info.run_id, info


def model_folder(info) -> Path:
    """The logged model's folder in the (local) artifact store."""
    location = mlflow.get_logged_model(info.model_id).artifact_location
    return Path(urlparse(location).path) if location.startswith("file:") else Path(location)


def test_a_logged_model_loads_in_safe_mode_and_predicts_identically(store, unet):
    run_id, info = logged(store, unet, register_as="safe_unet")
    digest = hashlib.sha256((model_folder(info) / "data" / "model.keras").read_bytes()).hexdigest()
    # recorded in the tracking store: on the run and on the logged model
    assert mlflow.get_run(run_id).data.tags[SHA256_TAG] == digest
    assert mlflow.get_logged_model(info.model_id).tags[SHA256_TAG] == digest
    want = unet.predict(X, verbose=0)
    for uri in (f"runs:/{run_id}/model", info.model_uri, "models:/safe_unet/1"):
        model = load_model(uri, store[0])
        np.testing.assert_allclose(model.predict(X, verbose=0), want, atol=1e-6)
        # the run comes from the tracking store and the registry, not the MLmodel file
        assert source_run_id(uri, store[0]) == run_id


def test_an_exported_savedmodel_is_refused(store, unet):
    run_id, info = logged(store, unet)
    mlmodel = model_folder(info) / "MLmodel"
    spec = yaml.safe_load(mlmodel.read_text())
    spec["flavors"]["keras"]["save_exported_model"] = True  # tf.saved_model.load would run it
    mlmodel.write_text(yaml.safe_dump(spec))
    for uri in (f"runs:/{run_id}/model", info.model_uri):
        with pytest.raises(ValueError, match="save_exported_model: true") as err:
            load_model(uri, store[0])
        assert uri in str(err.value) and "medseg loads .keras models only" in str(err.value)


def test_a_changed_model_file_fails_the_hash_check(store, unet):
    run_id, info = logged(store, unet)
    # another valid Keras model in its place: what whoever writes the artifact store could do
    keras.utils.set_random_seed(1)
    build_unet(3, depth=2, filters=4).save(model_folder(info) / "data" / "model.keras")
    for uri in (f"runs:/{run_id}/model", info.model_uri):
        with pytest.raises(ValueError, match="has SHA-256") as err:
            load_model(uri, store[0])
        message = str(err.value)
        assert uri in message and "data/model.keras" in message and "changed" in message
        assert mlflow.get_run(run_id).data.tags[SHA256_TAG] in message


def test_a_lambda_layer_is_refused_by_keras_safe_mode(store):
    inputs = keras.Input((None, None, None, 1))
    outputs = keras.layers.Lambda(lambda x: x * 2.0)(inputs)  # arbitrary code in the file
    run_id, _ = logged(store, keras.Model(inputs, outputs))
    with pytest.raises(ValueError, match="safe_mode") as err:
        load_model(f"runs:/{run_id}/model", store[0])
    assert f"runs:/{run_id}/model cannot be loaded" in str(err.value)


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda spec: spec["flavors"].pop("keras"), "has no keras flavour"),
        (lambda spec: spec["flavors"]["keras"].update(data="../../elsewhere"),
         "points outside the model folder"),
        (lambda spec: spec["flavors"]["keras"].update(data="nothing"), "no .keras file"),
    ],
)
def test_a_broken_mlmodel_is_a_clear_error(store, unet, edit, fragment):
    run_id, info = logged(store, unet)
    mlmodel = model_folder(info) / "MLmodel"
    spec = yaml.safe_load(mlmodel.read_text())
    edit(spec)
    mlmodel.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=fragment) as err:
        load_model(f"runs:/{run_id}/model", store[0])
    assert f"runs:/{run_id}/model" in str(err.value)


def test_a_model_logged_without_a_hash_loads_with_a_warning(store, unet, caplog):
    uri, experiment = store
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.keras.log_model(unet, name="model", pip_requirements=["keras"])
    with caplog.at_level(logging.WARNING, logger="medseg.tracking.model"):
        model = load_model(f"runs:/{run.info.run_id}/model", uri)
    assert "recorded no SHA-256" in caplog.text
    np.testing.assert_allclose(model.predict(X, verbose=0), unet.predict(X, verbose=0), atol=1e-6)


def test_unknown_runs_and_models_are_clear_errors(store):
    uri, _ = store
    with pytest.raises(ValueError, match="the tracking store does not know it"):
        load_model("runs:/0123456789abcdef0123456789abcdef/model", uri)
    with pytest.raises(ValueError, match="the tracking store does not know it"):
        load_model("models:/no_such_model/3", uri)
    with pytest.raises(ValueError, match="the tracking store does not know it"):
        load_plan("models:/no_such_model/3", uri)
