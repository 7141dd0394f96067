"""An experiment logged to an sqlite MLflow store, read back."""

import json
from pathlib import Path

import imageio.v3 as iio
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from medseg.inference.postprocess import decide_postprocessing
from medseg.tracking import resolve_tracking_uri, run_training
from medseg.tracking.model import load_plan


@pytest.fixture(scope="module")
def logged_run(tiny_config, tmp_path_factory):
    store = tmp_path_factory.mktemp("mlruns")
    config = tiny_config(
        **{
            "tracking.tracking_uri": f"sqlite:///{store}/mlflow.db",
            "tracking.artifact_root": str(store),
            "tracking.experiment": "test",
        }
    )
    result, run_id = run_training(config)
    return config, result, run_id, store


def test_run_records_params_metrics_tags_and_lineage(logged_run):
    config, result, run_id, _ = logged_run
    client = MlflowClient(config.tracking.tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2"
    assert json.loads(run.data.params["patch.patch_size"]) == [8, 16, 16]
    # the whole config, plus the experiment plan's own numbers (topology, estimates)
    plan_keys = {k for k in run.data.params if k.startswith("plan.") and k not in config.to_flat_dict()}
    assert {"plan.strides", "plan.kernels", "plan.widths", "plan.memory_gb"} <= plan_keys
    assert set(config.to_flat_dict()) | plan_keys == set(run.data.params)
    assert json.loads(run.data.params["plan.strides"]) == [[1, 1, 1], [2, 2, 2]]
    assert run.data.tags["dataset.name"] == "kits_phantom/tiny/1.1.0"
    assert run.data.tags["dataset.fingerprint_hash"] == result.data.fingerprint_hash
    assert run.data.tags["medseg.seed"] == "42"
    assert "git.commit" in run.data.tags and "version.tensorflow" in run.data.tags
    # per-epoch metrics, one step per epoch
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == [0, 1]
    np.testing.assert_allclose([m.value for m in history], result.history["loss"], rtol=1e-6)
    assert "val_case_dice_kidney_mean" in run.data.metrics
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "kits_phantom/tiny/1.1.0"
    assert dataset_input.dataset.digest == result.data.fingerprint_hash


def test_run_artifacts_read_back(logged_run):
    config, result, run_id, store = logged_run
    mlflow.set_tracking_uri(config.tracking.tracking_uri)
    files = {a.path for a in MlflowClient().list_artifacts(run_id, "plots")}
    assert "plots/learning_curve.png" in files
    gif = [f for f in files if f.endswith(".gif")]
    assert len(gif) == 1
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=gif[0])
    frames = iio.imread(local, index=None)
    assert frames.shape[0] == result.example["image"].shape[0]  # one frame per axial slice
    table = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="evaluation/validation_cases.tsv"
    )
    lines = Path(table).read_text().splitlines()
    assert lines[0].split("\t")[0] == "case_id" and len(lines) == 1 + len(result.cases)
    history = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="training/history.tsv")
    assert len(Path(history).read_text().splitlines()) == 3  # header + 2 epochs
    # artifacts live under the configured store folder
    assert any(Path(store, "artifacts").rglob("learning_curve.png"))


def test_postprocessing_decided_on_validation_travels_in_the_plan(logged_run):
    config, result, run_id, _ = logged_run
    mlflow.set_tracking_uri(config.tracking.tracking_uri)
    decision = decide_postprocessing([c.postprocessing for c in result.cases], result.data.class_names)
    assert sorted(decision["classes"]) == [1, 2] and len(result.cases) > 0
    expected = json.loads(json.dumps(decision))
    for name in ("plan.json", "evaluation/postprocessing.json"):
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name)
        logged = json.loads(Path(path).read_text())
        assert (logged["postprocessing"] if name == "plan.json" else logged) == expected
    # medseg predict --model runs:/... reads it with the plan
    plan = load_plan(f"runs:/{run_id}/model", config.tracking.tracking_uri)
    assert plan.postprocessing == expected


def test_logged_model_loads_from_the_sqlite_store_and_predicts(logged_run):
    config, result, run_id, _ = logged_run
    mlflow.set_tracking_uri(config.tracking.tracking_uri)
    models = mlflow.search_logged_models(
        experiment_ids=[mlflow.get_experiment_by_name("test").experiment_id], output_format="list"
    )
    model_info = [m for m in models if m.source_run_id == run_id]
    assert len(model_info) == 1
    model = mlflow.keras.load_model(model_info[0].model_uri)
    x = np.random.default_rng(0).normal(size=(1, 8, 16, 16, 1)).astype(np.float32)
    np.testing.assert_allclose(model.predict(x, verbose=0), result.model.predict(x, verbose=0), atol=1e-5)
    # the pyfunc flavour segments a whole image (no tensor signature: it takes paths or an
    # image with its spacing) with the plan carried inside the model
    pyfunc = mlflow.pyfunc.load_model(model_info[0].model_uri)
    assert pyfunc.metadata.signature is None
    image = np.random.default_rng(1).normal(size=(12, 20, 20)).astype(np.float32)
    seg = pyfunc.predict({"image": image, "spacing": [3.0, 1.5, 1.5]})
    assert seg.shape == image.shape and seg.dtype == np.uint8
    assert set(np.unique(seg)) <= set(range(len(result.data.class_names)))


def test_relative_sqlite_uri_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///mlruns/mlflow.db") == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert resolve_tracking_uri("postgresql://h/db") == "postgresql://h/db"
