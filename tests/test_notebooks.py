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


def test_train_notebook_defaults_are_the_config_defaults():
    """The notebook's parameters must not drift from the library's defaults."""
    from medseg.config import Config

    nb = nbformat.read(Path(__file__).parents[1] / "notebooks" / "train.ipynb", as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    params: dict = {}
    exec(cell.source, {}, params)
    flat = Config().to_flat_dict()
    mapping = {
        "dataset": "data.dataset",
        "config_name": "data.config",
        "data_dir": "data.data_dir",
        "epochs": "train.epochs",
        "steps_per_epoch": "train.steps_per_epoch",
        "patch_size": "patch.patch_size",
        "batch_size": "patch.batch_size",
        "filters": "model.filters",
        "depth": "model.depth",
        "learning_rate": "train.learning_rate",
        "seed": "seed",
        "tracking_uri": "tracking.tracking_uri",
    }
    for name, key in mapping.items():
        assert params[name] == flat[key], (name, params[name], flat[key])
