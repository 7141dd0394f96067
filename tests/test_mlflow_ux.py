"""What MLflow users expect of a medseg run, read back from a real sqlite store: source tags,
the experiment's kind, per-epoch lr and time, system metrics, per-case tables, the model's
size, and registry aliases."""

import math
import os
import sys
import time

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from medseg.config import TrackingConfig
from medseg.tracking import git_state, run_training
from medseg.tracking.lineage import JOB_VARIABLES, source_tags
from medseg.tracking.observer import MODEL_SUMMARY, MlflowObserver
from medseg.tracking.registry import CHALLENGER, CHAMPION, SCORE_TAG, assign_alias, validation_score
from medseg.tracking.store import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, configure
from medseg.training.optimization import total_steps

MODEL_NAME = "ux_unet"


@pytest.fixture(scope="module")
def ux_run(tiny_config, tmp_path_factory):
    store = tmp_path_factory.mktemp("mlruns")
    config = tiny_config(
        **{
            "tracking.tracking_uri": f"sqlite:///{store}/mlflow.db",
            "tracking.artifact_root": str(store),
            "tracking.experiment": "ux",
            "tracking.register_model": MODEL_NAME,
            "train.lr_schedule": "poly",
        }
    )
    result, run_id = run_training(config)
    return config, result, run_id


def test_run_carries_mlflow_source_tags(ux_run):
    config, _, run_id = ux_run
    tags = MlflowClient(config.tracking.tracking_uri).get_run(run_id).data.tags
    assert tags["mlflow.source.name"] == sys.argv[0]  # pytest's script: neither CLI nor notebook
    kind = "JOB" if any(os.environ.get(v) for v in JOB_VARIABLES) else "LOCAL"
    assert tags["mlflow.source.type"] == kind
    commit = git_state()["git.commit"]
    if commit != "unknown":
        assert tags["mlflow.source.git.commit"] == commit
        assert len(commit) == 40


def test_source_tags_name_the_cli_subcommand_and_a_job(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/medseg", "--verbose", "train", "--config", "c.yaml"])
    for variable in JOB_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    tags = source_tags()
    assert tags["mlflow.source.name"] == "medseg train"
    assert tags["mlflow.source.type"] == "LOCAL"
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    assert source_tags()["mlflow.source.type"] == "JOB"
    monkeypatch.setattr(sys, "argv", ["/venv/lib/ipykernel_launcher.py", "-f", "kernel.json"])
    monkeypatch.setenv("JPY_SESSION_NAME", "/home/me/notebooks/train.ipynb")
    tags = source_tags()
    assert tags == {**tags, "mlflow.source.name": "/home/me/notebooks/train.ipynb",
                    "mlflow.source.type": "NOTEBOOK"}


def test_experiment_is_a_model_training_experiment(ux_run, tmp_path):
    config, _, _ = ux_run
    client = MlflowClient(config.tracking.tracking_uri)
    experiment = client.get_experiment_by_name("ux")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    # an experiment created before medseg set the kind gets it; a kind a user chose stays
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    old = MlflowClient(uri).create_experiment("old", artifact_location=tmp_path.as_uri())
    chosen = MlflowClient(uri).create_experiment(
        "chosen", artifact_location=tmp_path.as_uri(), tags={EXPERIMENT_KIND_TAG: "genai_development"}
    )
    assert configure(TrackingConfig(tracking_uri=uri, experiment="old")) == old
    assert configure(TrackingConfig(tracking_uri=uri, experiment="chosen")) == chosen
    client = MlflowClient(uri)
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_lr_and_epoch_time_logged_per_epoch(ux_run):
    config, result, run_id = ux_run
    client = MlflowClient(config.tracking.tracking_uri)
    epochs = config.train.epochs
    lr = client.get_metric_history(run_id, "lr")
    assert [m.step for m in lr] == list(range(epochs))
    # poly schedule, evaluated at the optimizer's step count after each epoch
    steps = np.arange(1, epochs + 1) * config.train.steps_per_epoch
    expected = config.train.learning_rate * (1 - steps / total_steps(config.train)) ** 0.9
    np.testing.assert_allclose([m.value for m in lr], expected, rtol=1e-5, atol=1e-9)
    times = client.get_metric_history(run_id, "epoch_time_s")
    assert [m.step for m in times] == list(range(epochs))
    assert all(0 < m.value < result.timings.get("train_s", math.inf) + 1 for m in times)


def test_system_metrics_logged_during_training(ux_run):
    config, _, run_id = ux_run
    metrics = MlflowClient(config.tracking.tracking_uri).get_run(run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100 * os.cpu_count()
    assert "system/system_memory_usage_megabytes" in metrics


def test_system_metrics_off_by_config(tmp_path):
    from medseg.config import Config

    config = Config().with_overrides(
        {"tracking.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
         "tracking.artifact_root": str(tmp_path), "tracking.system_metrics": False}
    )
    observer = MlflowObserver()
    observer.run_started(config)
    time.sleep(3)  # longer than the sampling interval
    mlflow.end_run()
    metrics = MlflowClient(config.tracking.tracking_uri).get_run(observer.run_id).data.metrics
    assert not any(k.startswith("system/") for k in metrics)


def test_per_case_scores_logged_as_a_table(ux_run):
    config, result, run_id = ux_run
    mlflow.set_tracking_uri(config.tracking.tracking_uri)
    # load_table searches the active experiment's runs
    mlflow.set_experiment(config.tracking.experiment)
    table = mlflow.load_table("evaluation/validation_cases.json", run_ids=[run_id])
    assert list(table["case_id"]) == [c.case_id for c in result.cases]
    keys = sorted({k for c in result.cases for k in c.scores})
    assert any(k.startswith("dice_") for k in keys)
    assert list(table.columns) == ["case_id", *keys]
    for key in keys:
        expected = [c.scores.get(key, np.nan) for c in result.cases]
        np.testing.assert_allclose(table[key].astype(float), expected, equal_nan=True)
    # the TSV stays for medseg's own readers
    files = {a.path for a in MlflowClient().list_artifacts(run_id, "evaluation")}
    assert {"evaluation/validation_cases.tsv", "evaluation/validation_cases.json"} <= files


def test_model_parameter_count_and_summary(ux_run):
    config, result, run_id = ux_run
    metrics = MlflowClient(config.tracking.tracking_uri).get_run(run_id).data.metrics
    assert metrics["model_parameters"] == result.model.count_params()
    mlflow.set_tracking_uri(config.tracking.tracking_uri)
    text = mlflow.artifacts.load_text(f"runs:/{run_id}/{MODEL_SUMMARY}")
    assert result.model.name in text
    assert f"{result.model.count_params():,}" in text


def test_registered_version_is_champion_with_its_score(ux_run):
    config, result, run_id = ux_run
    client = MlflowClient(config.tracking.tracking_uri)
    version = client.get_model_version_by_alias(MODEL_NAME, CHAMPION)
    assert version.run_id == run_id
    means = [s["mean"] for k, s in result.summary.items() if k.startswith("dice_")]
    assert float(version.tags[SCORE_TAG]) == pytest.approx(np.nanmean(means))
    assert validation_score(result.summary) == pytest.approx(np.nanmean(means))


def test_aliases_follow_the_validation_score(ux_run):
    config, _, run_id = ux_run
    client = MlflowClient(config.tracking.tracking_uri)
    name = "alias_demo"
    client.create_registered_model(name)
    source = f"runs:/{run_id}/model"

    def new_version(score):
        version = client.create_model_version(name, source, run_id=run_id).version
        return version, assign_alias(client, name, version, score)

    v1, a1 = new_version(0.5)
    v2, a2 = new_version(0.4)  # worse: challenger, the champion stays
    assert (a1, a2) == (CHAMPION, CHALLENGER)
    assert client.get_model_version_by_alias(name, CHAMPION).version == v1
    assert client.get_model_version_by_alias(name, CHALLENGER).version == v2
    v3, a3 = new_version(0.7)  # better: the champion moves
    assert a3 == CHAMPION
    assert client.get_model_version_by_alias(name, CHAMPION).version == v3
    v4, a4 = new_version(math.nan)  # no score: never the champion while one has a score
    assert a4 == CHALLENGER
    assert client.get_model_version_by_alias(name, CHALLENGER).version == v4


def test_notebook_run_names_the_notebook_as_its_source(tmp_path):
    import nbformat

    from medseg.tracking.notebook import run_notebook

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("run_id = None\ntracking_uri = None")
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell("x = 1")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "source.ipynb"
    nbformat.write(nb, path)
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path))
    _, run_id = run_notebook(path, {}, tracking, output=tmp_path / "source.out.ipynb")
    tags = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id).data.tags
    assert tags["mlflow.source.name"] == str(path.resolve())
    assert tags["mlflow.source.type"] == "NOTEBOOK"


@pytest.mark.slow
def test_a_cross_validation_ensemble_is_one_registered_model(tiny_config, tmp_path):
    """medseg evaluate with tracking.register_model: the folds are not registered one by
    one; their ensemble is one version (@champion), whose pyfunc segments a NIfTI file as
    medseg predict --ensemble does."""
    import mlflow
    import nibabel as nib

    from medseg.cli import main
    from medseg.tracking.evaluation import run_evaluation

    store = tmp_path / "mlruns"
    config = tiny_config(**{
        "evaluation.protocol": "kfold",
        "evaluation.folds": 2,
        "evaluation.splits_file": str(tmp_path / "splits.json"),
        "train.epochs": 1,
        "train.steps_per_epoch": 1,
        "tracking.tracking_uri": f"sqlite:///{store}/mlflow.db",
        "tracking.artifact_root": str(store),
        "tracking.experiment": "cv-registry",
        "tracking.register_model": "cv_ensemble",
    })
    _, parent_id = run_evaluation(config)
    client = MlflowClient(config.tracking.tracking_uri)
    versions = client.search_model_versions("name='cv_ensemble'")
    assert len(versions) == 1 and versions[0].run_id == parent_id
    champion = client.get_model_version_by_alias("cv_ensemble", "champion")
    assert champion.version == versions[0].version
    image = np.random.default_rng(0).normal(size=(24, 24, 12)).astype(np.float32) * 100
    case = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(image, np.diag([2.0, 2.0, 4.0, 1.0])), case)
    mlflow.set_tracking_uri(config.tracking.tracking_uri)
    ensemble = mlflow.artifacts.download_artifacts(run_id=parent_id,
                                                   artifact_path="ensemble.json",
                                                   dst_path=str(tmp_path))
    assert main(["predict", str(case), "--ensemble", ensemble, "--output", str(tmp_path / "p"),
                 "--tracking-uri", config.tracking.tracking_uri]) == 0
    expected = np.asarray(nib.load(tmp_path / "p" / "case_seg.nii.gz").dataobj)
    seg = mlflow.pyfunc.load_model("models:/cv_ensemble@champion").predict(str(case))
    np.testing.assert_array_equal(seg, expected)
