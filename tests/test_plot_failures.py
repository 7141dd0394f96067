"""No run lost to a plot: the model is logged before any plot is drawn, and a plot that
fails is recorded (a warning, a ``medseg.plot_failed.*`` tag) while the run finishes."""

from __future__ import annotations

import logging

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from medseg.evaluation import summarize
from medseg.models import build_unet
from medseg.tracking import MlflowObserver, artifacts
from medseg.tracking.model import SHA256_TAG
from medseg.workflows import CaseResult, ExperimentResult, prepare_data


@pytest.fixture
def store_config(tiny_config, tmp_path):
    store = tmp_path / "mlruns"
    return tiny_config(
        **{
            "tracking.tracking_uri": f"sqlite:///{store}/mlflow.db",
            "tracking.artifact_root": str(store),
            "tracking.experiment": "plots",
        }
    )


class Interrupted:
    """A volume whose reading is interrupted (Ctrl-C, or the kernel's OOM killer)."""

    shape = (6, 12, 12)

    def __array__(self, dtype=None, copy=None):
        raise KeyboardInterrupt


def observed_result(config, image, truth, pred):
    """An observer past planning and a hand-made result with this overlay example."""
    setup = prepare_data(config)
    observer = MlflowObserver()
    observer.run_started(config)
    observer.planned(config, setup)
    case_id = setup.val_ids[0]
    cases = [CaseResult(case_id, {"dice_kidney": 0.8}, {})]
    result = ExperimentResult(
        config=config,
        data=setup,
        model=build_unet(3, depth=config.model.depth, filters=config.model.filters),
        history={"loss": [1.0, 0.5]},
        cases=cases,
        summary=summarize([c.scores for c in cases]),
        example={"case_id": case_id, "image": image, "truth": truth, "pred": pred,
                 "spacing": (2.0, 1.0, 1.0)},
    )
    return observer, result, case_id


def logged_models(run):
    return [m for m in mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list")
        if m.source_run_id == run.info.run_id]


def test_a_failing_overlay_is_recorded_and_the_run_finishes(store_config, caplog):
    truth = np.zeros((6, 12, 12), np.uint8)
    truth[2:4, 3:8, 3:8] = 1
    image = np.random.default_rng(0).normal(size=truth.shape).astype(np.float32)
    # a prediction of another shape: both the GIF and the montage fail
    observer, result, case_id = observed_result(store_config, image, truth, truth[:, :10])
    with caplog.at_level(logging.WARNING, logger="medseg.tracking.artifacts"):
        observer.run_finished(result)

    run = MlflowClient(store_config.tracking.tracking_uri).get_run(observer.run_id)
    assert run.info.status == "FINISHED"
    for name in (f"overlay_{case_id}", f"montage_{case_id}"):
        reason = run.data.tags[f"{artifacts.PLOT_FAILED_TAG}.{name}"]
        assert reason.startswith("ValueError: label shape (6, 10, 12) differs from image shape")
        assert f"plot {name}" in caplog.text
    plots = {a.path for a in MlflowClient().list_artifacts(observer.run_id, "plots")}
    assert plots == {"plots/learning_curve.png", "plots/metrics_boxplot.png"}
    assert len(logged_models(run)) == 1 and SHA256_TAG in run.data.tags


def test_the_model_is_logged_before_any_plot_is_drawn(store_config):
    truth = np.zeros(Interrupted.shape, np.uint8)
    observer, result, _ = observed_result(store_config, Interrupted(), truth, truth)
    with pytest.raises(KeyboardInterrupt):  # not a plot failure: it stops the run
        observer.run_finished(result)

    run = MlflowClient(store_config.tracking.tracking_uri).get_run(observer.run_id)
    assert run.info.status == "FAILED" and mlflow.active_run() is None
    # killed while drawing the overlay: the model (and its hash) made it into the run
    (model,) = logged_models(run)
    assert model.tags[SHA256_TAG] == run.data.tags[SHA256_TAG]


def test_log_plot_records_an_out_of_memory_plot(tmp_path, store_config, caplog):
    mlflow.set_tracking_uri(store_config.tracking.tracking_uri)

    def draw(path):
        np.empty(1 << 62, np.uint8)  # far beyond any machine's memory: MemoryError

    with mlflow.start_run() as run, caplog.at_level(logging.WARNING):
        assert not artifacts.log_plot(tmp_path / "huge case.png", draw)
        assert artifacts.log_plot(tmp_path / "fine.txt", lambda p: p.write_text("ok"))
    tags = mlflow.get_run(run.info.run_id).data.tags
    assert tags[f"{artifacts.PLOT_FAILED_TAG}.huge case"].startswith("MemoryError")
    assert "plot huge case.png could not be drawn" in caplog.text
    assert [a.path for a in MlflowClient().list_artifacts(run.info.run_id, "plots")] == [
        "plots/fine.txt"
    ]
