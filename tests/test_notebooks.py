"""Notebooks executed by papermill, each inside the MLflow run it creates."""

import json
from pathlib import Path

import nbformat
import pytest
from mlflow.tracking import MlflowClient

from medseg.config import TrackingConfig
from medseg.tracking.notebook import run_notebook

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_parameters_cell_and_kernelspec(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert "run_id" in tagged[0].source and "tracking_uri" in tagged[0].source
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow
def test_train_notebook_runs_at_tiny_size_and_logs_its_run(tiny_data_dir, tmp_path):
    tracking = TrackingConfig(
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        artifact_root=str(tmp_path),
        experiment="notebooks",
    )
    params = {
        "config_name": "tiny",
        "data_dir": tiny_data_dir,
        "epochs": 1,
        "steps_per_epoch": 2,
        "patch_size": [8, 16, 16],
        "filters": 4,
        "depth": 2,
        "overrides": {"preprocess.target_spacing": [4.0, 2.0, 2.0]},
    }
    output, run_id = run_notebook(
        Path(__file__).parents[1] / "notebooks" / "train.ipynb",
        params,
        tracking,
        output=tmp_path / "train.out.ipynb",
    )
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.config"] == "tiny"
    assert json.loads(run.data.params["patch.patch_size"]) == [8, 16, 16]
    assert "val_case_dice_kidney_mean" in run.data.metrics
    assert run.data.tags["medseg.notebook"] == "train.ipynb"
    logged = [a.path for a in client.list_artifacts(run_id, "notebooks")]
    assert logged == ["notebooks/train.out.ipynb"]
    executed = nbformat.read(output, as_version=4)
    text = "".join(
        o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs
    )
    assert run_id in text and "dice_kidney" in text
    images = [
        o for c in executed.cells if c.cell_type == "code" for o in c.outputs
        if "image/png" in o.get("data", {}) or "image/gif" in o.get("data", {})
    ]
    assert len(images) >= 2  # learning curve and overlay GIF shown inline


def test_failing_notebook_marks_its_run_failed_and_logs_it(tmp_path):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("run_id = None\ntracking_uri = None")
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell("raise RuntimeError('boom in cell')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "fails.ipynb"
    nbformat.write(nb, path)
    tracking = TrackingConfig(
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path)
    )
    with pytest.raises(Exception, match="boom in cell"):
        run_notebook(path, {}, tracking, output=tmp_path / "fails.out.ipynb")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("medseg").experiment_id])
    assert run.info.status == "FAILED"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "notebooks")] == [
        "notebooks/fails.out.ipynb"
    ]



# -- every notebook at tiny size, each checked through the MLflow runs it leaves -----------

ROOT = Path(__file__).parents[1]


def _tiny(tiny_data_dir: str, **extra) -> dict:
    """Parameters that make any notebook of the phantom run in seconds."""
    return {
        "config_name": "tiny",
        "data_dir": tiny_data_dir,
        "epochs": 1,
        "steps_per_epoch": 2,
        "patch_size": [8, 16, 16],
        "filters": 4,
        "depth": 2,
        "plan": "none",
        "overrides": {
            "preprocess.target_spacing": [4.0, 2.0, 2.0],
            "patch.validation_patches": 1,
            "tracking.log_model": False,
        },
        **extra,
    }


def _store(tmp_path) -> tuple[TrackingConfig, MlflowClient]:
    tracking = TrackingConfig(
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        artifact_root=str(tmp_path),
        experiment="notebooks",
    )
    return tracking, MlflowClient(tracking.tracking_uri)


def _outputs(path) -> tuple[str, list[str]]:
    """Text and the image types shown by an executed notebook's cells."""
    executed = nbformat.read(path, as_version=4)
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    images = [t for o in outputs for t in o.get("data", {}) if t.startswith("image/")]
    return text, images


def _artifacts(client: MlflowClient, run_id: str, path: str = "") -> list[str]:
    found = []
    for info in client.list_artifacts(run_id, path or None):
        found += _artifacts(client, run_id, info.path) if info.is_dir else [info.path]
    return found


@pytest.mark.slow
def test_explore_dataset_notebook_logs_fingerprint_plots_and_samples(tiny_data_dir, tmp_path):
    from medseg import datasets

    tracking, client = _store(tmp_path)
    params = {
        "config_name": "tiny",
        "data_dir": tiny_data_dir,
        "patch_size": [8, 16, 16],
        "sample_cases": 2,
        "overrides": {"preprocess.target_spacing": [4.0, 2.0, 2.0]},
    }
    output, run_id = run_notebook(
        ROOT / "notebooks" / "explore_dataset.ipynb", params, tracking,
        output=tmp_path / "explore.out.ipynb",
    )
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["medseg.notebook"] == "explore_dataset.ipynb"
    builder = datasets.get_builder("kits_phantom", "tiny", tiny_data_dir)
    fingerprint = datasets.read_fingerprint(builder)
    assert run.data.tags["dataset.fingerprint_hash"] == datasets.fingerprint_hash(fingerprint)
    artifacts = _artifacts(client, run_id)
    assert "plots/dataset_overview.png" in artifacts
    samples = [a for a in artifacts if a.startswith("plots/sample_")]
    assert len(samples) == 2
    # image | labels: two panels, not a prediction that is the label again
    import imageio.v3 as iio

    frames = iio.imread(client.download_artifacts(run_id, samples[0], str(tmp_path)), index=None)
    case = next(iter(datasets.get_builder("kits_phantom", "tiny", tiny_data_dir)
                     .as_dataset(split="train").take(1)))
    assert frames.shape[2] < 3 * case["image"].shape[2]
    assert "notebooks/explore.out.ipynb" in artifacts
    logged = Path(client.download_artifacts(run_id, "fingerprint.json", str(tmp_path)))
    assert json.loads(logged.read_text()) == fingerprint
    text, images = _outputs(output)
    assert f"cases: {fingerprint['num_cases']}" in text  # the fingerprint table
    assert images.count("image/png") == 1 and images.count("image/gif") == 2


@pytest.mark.slow
def test_tune_notebook_runs_a_study_nested_under_its_run(tiny_data_dir, tmp_path):
    tracking, client = _store(tmp_path)
    params = _tiny(
        tiny_data_dir,
        space={"train.learning_rate": "log:1e-3:3e-2"},
        n_trials=2,
        storage=f"sqlite:///{tmp_path}/optuna.db",
        study_name="nb",
    )
    output, run_id = run_notebook(
        ROOT / "notebooks" / "tune.ipynb", params, tracking, output=tmp_path / "tune.out.ipynb"
    )
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["optuna.study_name"] == "nb"
    assert run.data.params["tune.n_trials"] == "2"
    trials = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'"
    )
    assert sorted(int(t.data.tags["optuna.trial_number"]) for t in trials) == [0, 1]
    assert {t.data.params["train.epochs"] for t in trials} == {"1"}
    artifacts = _artifacts(client, run_id)
    assert {"tuning/trials.tsv", "tuning/best_config.json", "notebooks/tune.out.ipynb"} <= set(
        artifacts
    )
    text, _ = _outputs(output)
    assert f"study MLflow run: {run_id}" in text and "best trial" in text


@pytest.mark.slow
def test_cross_validate_notebook_runs_nested_folds(tiny_data_dir, tmp_path):
    tracking, client = _store(tmp_path)
    params = _tiny(tiny_data_dir, protocol="kfold", folds=2)
    output, run_id = run_notebook(
        ROOT / "notebooks" / "cross_validate.ipynb", params, tracking,
        output=tmp_path / "cv.out.ipynb",
    )
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert "notebooks/cv.out.ipynb" in _artifacts(client, run_id)
    # the notebook's own run is the folds' parent and holds the pooled evaluation
    folds = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'"
    )
    assert len(folds) == 2
    assert run.data.params["evaluation.protocol"] == "kfold"
    assert "cv_dice_kidney_mean" in run.data.metrics
    assert run.data.tags["medseg.notebook"] == "cross_validate.ipynb"
    text, images = _outputs(output)
    assert f"evaluation run (folds nested): {run_id}" in text
    assert "2 folds, 4 test cases" in text
    assert "image/png" in images


@pytest.mark.slow
def test_predict_notebook_scores_the_newest_model_as_its_training_run_did(
    tiny_config, tmp_path
):
    from medseg.tracking import run_training

    tracking, client = _store(tmp_path)
    config = tiny_config(
        **{"tracking.tracking_uri": tracking.tracking_uri,
           "tracking.artifact_root": str(tmp_path), "tracking.experiment": "notebooks"}
    )
    _, training_id = run_training(config)
    # model_uris = []: the newest logged model of the experiment, i.e. the one just trained
    output, run_id = run_notebook(
        ROOT / "notebooks" / "predict.ipynb", {"experiment": "notebooks"}, tracking,
        output=tmp_path / "predict.out.ipynb",
    )
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["medseg.training_run"] == training_id
    assert run.data.tags["medseg.models"] == f"runs:/{training_id}/model"
    trained = client.get_run(training_id).data.metrics
    # the logged model on the same validation cases: the training run's own evaluation
    for key in ("val_case_dice_kidney_mean", "val_case_dice_tumour_mean"):
        if key in trained:
            assert run.data.metrics[key] == pytest.approx(trained[key], abs=1e-6)
    assert "val_case_dice_kidney_mean" in run.data.metrics
    artifacts = _artifacts(client, run_id)
    assert any(a.startswith("plots/overlay_") and a.endswith(".gif") for a in artifacts)
    _, images = _outputs(output)
    assert "image/gif" in images


# notebook parameters that are not config keys, per notebook
OWN_PARAMETERS = {
    "train": {"run_id", "overrides"},
    "cross_validate": {"run_id", "overrides"},
    "tune": {"run_id", "overrides"},
    "explore_dataset": {"run_id", "overrides", "histogram_cases", "sample_cases"},
    "predict": {"run_id", "model_uris", "case_ids"},
    "compare_models": {"run_id", "overrides", "variants", "baseline"},
}


@pytest.mark.parametrize("name", sorted(OWN_PARAMETERS))
def test_notebook_parameters_are_config_keys_left_to_the_config(name):
    """Each parameter named after a config key reaches the config through
    ``from_parameters``; at None it keeps the config's default, so nothing can drift."""
    from medseg.config import NOTEBOOK_PARAMETERS, Config, from_parameters

    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    params: dict = {}
    exec(cell.source, {}, params)
    config_params = set(params) - OWN_PARAMETERS[name]
    assert config_params <= set(NOTEBOOK_PARAMETERS), config_params - set(NOTEBOOK_PARAMETERS)
    # the defaults a notebook sets itself are the ones it is about; the rest are None
    own_defaults = {"cross_validate": {"protocol"}, "compare_models": {"protocol"},
                    "tune": {"study_name"}}.get(name, set())
    assert {k for k in config_params if params[k] is not None} == own_defaults
    config = from_parameters(params, params.get("overrides"))
    expected = Config().with_overrides(
        {NOTEBOOK_PARAMETERS[k]: params[k] for k in own_defaults}
    )
    assert config.to_dict() == expected.to_dict()
    # every notebook takes its config through the helper
    assert "from_parameters(globals()" in "".join(c.source for c in nb.cells)


def test_from_parameters_maps_names_to_keys_and_names_a_bad_value():
    from medseg.config import ConfigError, from_parameters

    config = from_parameters(
        {"epochs": 3, "patch_size": [8, 16, 16], "space": {"model.filters": "int:8:16:8"},
         "depth": None, "unrelated": "ignored"},
        {"train.epochs": 4},
    )
    assert config.train.epochs == 4  # overrides win
    assert config.patch.patch_size == (8, 16, 16)
    assert config.tune.space == ("model.filters=int:8:16:8",)
    assert config.model.depth == 3 and "train.epochs" in config.explicit_keys
    assert "model.depth" not in config.explicit_keys  # None: left to the config (or plan)
    with pytest.raises(ConfigError, match=r"'tune.pruner': 'meadian' .*\(notebook parameter 'pruner'\)"):
        from_parameters({"pruner": "meadian"})


@pytest.mark.slow
def test_compare_models_notebook_nests_variants_under_its_run(tiny_data_dir, tmp_path):
    tracking, client = _store(tmp_path)
    params = _tiny(tiny_data_dir, folds=2, steps_per_epoch=1,
                   variants={"model.name": ["unet", "plain_unet"]})
    output, run_id = run_notebook(
        ROOT / "notebooks" / "compare_models.ipynb", params, tracking,
        output=tmp_path / "compare.out.ipynb",
    )
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["medseg.notebook"] == "compare_models.ipynb"
    variants = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'"
    )
    assert sorted(v.data.tags["medseg.variant"] for v in variants) == ["plain_unet", "unet"]
    artifacts = _artifacts(client, run_id)
    assert {"comparison/table.csv", "comparison/mean_ranks.png",
            "notebooks/compare.out.ipynb"} <= set(artifacts)
    text, images = _outputs(output)
    assert f"study run (variants nested): {run_id}" in text
    assert "2 variants, 4 paired test cases" in text
    assert images.count("image/png") == 2
