"""MlflowObserver without training: a hand-made experiment result logged into a temporary
sqlite store and every artifact read back; a cross-validation parent, its fold, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import imageio.v3 as iio
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from medseg.config import Config
from medseg.evaluation import summarize, wide_scores
from medseg.evaluation.protocols import Fold
from medseg.inference import PredictionPlan
from medseg.inference.postprocess import component_tables, decide_postprocessing
from medseg.models import build_unet
from medseg.tracking import MlflowObserver, artifacts
from medseg.workflows import (
    CaseResult,
    ExperimentResult,
    Observer,
    combine_folds,
    prepare_data,
    run_experiment,
)


@pytest.fixture
def store_config(tiny_config, tmp_path):
    store = tmp_path / "mlruns"
    return tiny_config(
        **{
            "tracking.tracking_uri": f"sqlite:///{store}/mlflow.db",
            "tracking.artifact_root": str(store),
            "tracking.experiment": "observer",
        }
    )


def hand_made_result(config: Config, setup, case_ids) -> ExperimentResult:
    """Scores, component tables and an overlay example made up from the labels."""
    rng = np.random.default_rng(0)
    truth = np.zeros((6, 12, 12), np.uint8)
    truth[1:5, 2:9, 2:9] = 1
    truth[2:4, 3:6, 3:6] = 2
    pred = truth.copy()
    pred[5, 10:12, 10:12] = 2  # a small false tumour
    cases = []
    for i, case_id in enumerate(case_ids):
        scores = {"dice_kidney": 0.9 - 0.1 * i, "dice_tumour": float("nan") if i else 0.5}
        cases.append(CaseResult(case_id, scores, component_tables(pred, truth, [1, 2])))
    model = build_unet(3, depth=config.model.depth, filters=config.model.filters)
    return ExperimentResult(
        config=config,
        data=setup,
        model=model,
        history={"loss": [1.0, 0.5], "val_loss": [1.2, 0.7]},
        cases=cases,
        summary=summarize([c.scores for c in cases]),
        example={
            "case_id": case_ids[0],
            "image": rng.normal(size=truth.shape).astype(np.float32),
            "truth": truth,
            "pred": pred,
            "spacing": (2.0, 1.0, 1.0),
        },
        timings={"train_s": 1.5},
        postprocessing=decide_postprocessing([c.postprocessing for c in cases], setup.class_names),
    )


def download(run_id, name, tmp_path):
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name,
                                                    dst_path=str(tmp_path)))


def test_a_hand_made_result_is_logged_and_read_back(store_config, tmp_path):
    config = store_config
    setup = prepare_data(config)  # reads the dataset; nothing is trained
    observer = MlflowObserver(extra_tags={"purpose": "unit"})
    observer.run_started(config)
    observer.planned(config, setup)
    (callback,) = observer.callbacks()
    for epoch, loss in enumerate([1.0, 0.5]):
        callback.on_epoch_end(epoch, {"loss": loss, "val_loss": float("nan")})
    result = hand_made_result(config, setup, setup.val_ids)
    observer.run_finished(result)

    client = MlflowClient(config.tracking.tracking_uri)
    run = client.get_run(observer.run_id)
    assert run.info.status == "FINISHED" and observer.recorded
    assert mlflow.active_run() is None
    # params: the config; tags: lineage, dataset, extra
    assert run.data.params["model.filters"] == "4"
    assert json.loads(run.data.params["patch.patch_size"]) == [8, 16, 16]
    assert run.data.tags["purpose"] == "unit"
    assert run.data.tags["dataset.fingerprint_hash"] == setup.fingerprint_hash
    assert {"git.commit", "version.tensorflow", "medseg.strategy"} <= set(run.data.tags)
    # metrics: epochs (NaN dropped), summary, timings
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [1.0, 0.5]
    assert client.get_metric_history(run.info.run_id, "val_loss") == []
    assert run.data.metrics["val_case_dice_kidney_mean"] == pytest.approx(
        np.mean([c.scores["dice_kidney"] for c in result.cases])
    )
    assert run.data.metrics["time_train_s"] == 1.5
    # every artifact, read back
    assert Config.from_dict(json.loads(download(run.info.run_id, artifacts.CONFIG, tmp_path)
                                       .read_text())).to_dict() == config.to_dict()
    plan = PredictionPlan.from_file(download(run.info.run_id, artifacts.PLAN, tmp_path))
    assert plan.class_names == tuple(setup.class_names) and plan.patch_size == (8, 16, 16)
    assert plan.postprocessing == json.loads(json.dumps(result.postprocessing))
    assert plan.postprocessing["min_component_mm3"]  # the false tumour is dropped by volume
    decision = json.loads(download(run.info.run_id, "evaluation/postprocessing.json",
                                   tmp_path).read_text())
    assert decision == plan.postprocessing
    fingerprint = json.loads(download(run.info.run_id, artifacts.FINGERPRINT, tmp_path).read_text())
    assert fingerprint == json.loads(json.dumps(setup.fingerprint))
    split = json.loads(download(run.info.run_id, artifacts.SPLIT, tmp_path).read_text())
    assert split == {"train": setup.train_ids, "validation": setup.val_ids}
    with download(run.info.run_id, artifacts.HISTORY, tmp_path).open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [float(r["loss"]) for r in rows] == [1.0, 0.5]
    with download(run.info.run_id, artifacts.VALIDATION_CASES, tmp_path).open() as f:
        rows = {r["case_id"]: r for r in csv.DictReader(f, delimiter="\t")}
    assert sorted(rows) == sorted(setup.val_ids)
    for case in result.cases:
        for key, value in case.scores.items():
            np.testing.assert_equal(float(rows[case.case_id][key]), value)
    rows = artifacts.read_scores(download(run.info.run_id, artifacts.SCORES, tmp_path))
    np.testing.assert_equal(wide_scores(rows), {c.case_id: c.scores for c in result.cases})
    assert {(r.structure, r.metric) for r in rows} == {("kidney", "dice"), ("tumour", "dice")}
    summary = json.loads(download(run.info.run_id, "evaluation/validation_summary.json",
                                  tmp_path).read_text())
    assert summary["dice_kidney"]["n"] == len(result.cases)
    gif = download(run.info.run_id, f"plots/overlay_{setup.val_ids[0]}.gif", tmp_path)
    assert iio.imread(gif, index=None).shape[0] == 6  # one frame per slice
    for name in ("learning_curve.png", "metrics_boxplot.png", f"montage_{setup.val_ids[0]}.png"):
        assert iio.imread(download(run.info.run_id, f"plots/{name}", tmp_path)).ndim == 3
    (logged,) = [m for m in mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list")
        if m.source_run_id == run.info.run_id]
    x = np.random.default_rng(1).normal(size=(1, 8, 16, 16, 1)).astype(np.float32)
    np.testing.assert_allclose(mlflow.keras.load_model(logged.model_uri).predict(x, verbose=0),
                               result.model.predict(x, verbose=0), atol=1e-5)


def test_a_failing_workflow_marks_its_run_failed(store_config):
    class Boom(Observer):
        def planned(self, config, setup):
            raise RuntimeError("boom")

    class Both(MlflowObserver):
        def planned(self, config, setup):
            super().planned(config, setup)
            Boom().planned(config, setup)

    observer = Both()
    with pytest.raises(RuntimeError, match="boom"):
        run_experiment(store_config, observer)
    run = MlflowClient(store_config.tracking.tracking_uri).get_run(observer.run_id)
    assert run.info.status == "FAILED" and mlflow.active_run() is None


def test_a_cross_validation_parent_nests_its_folds_and_resumes_them(store_config, tmp_path):
    config = store_config.with_overrides({"tracking.log_model": False})
    setup = prepare_data(config)
    ids = setup.train_ids + setup.val_ids
    folds = [Fold("fold_0", ids[2:], ids[:2]), Fold("fold_1", ids[:2], ids[2:])]
    parent = MlflowObserver(cross_validation=True)
    parent.run_started(config)
    parent.planned(config, setup)
    results = []
    for index, fold in enumerate(folds):
        child = parent.fold_started(fold, index)
        assert child.finished_result(config, setup, fold) is None  # nothing to resume
        child.run_started(config)
        child.planned(config, setup)
        results.append(hand_made_result(config, setup, fold.test_ids))
        child.run_finished(results[-1])
    cv = combine_folds(config, setup, folds, results)
    parent.run_finished(cv)

    client = MlflowClient(config.tracking.tracking_uri)
    run = client.get_run(parent.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["medseg.protocol"] == "split" and run.data.tags["medseg.folds"] == "2"
    assert run.info.run_name == "split kits_phantom/tiny"
    children = {client.get_run(i).data.tags["medseg.fold"]: client.get_run(i)
                for i in parent.child_run_ids}
    assert sorted(children) == ["fold_0", "fold_1"]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.run_id for c in children.values())
    ensemble = json.loads(download(parent.run_id, artifacts.ENSEMBLE, tmp_path).read_text())
    assert ensemble["models"] == [f"runs:/{i}/model" for i in parent.child_run_ids]
    with download(parent.run_id, artifacts.CASES, tmp_path).open() as f:
        assert sorted(r["case_id"] for r in csv.DictReader(f, delimiter="\t")) == sorted(ids)
    assert download(parent.run_id, "plots/dataset_overview.png", tmp_path).exists()

    # resume: the finished folds come back from their runs, tables and scores exactly
    resumed = MlflowObserver(run_id=parent.run_id, cross_validation=True, resume=True)
    resumed.run_started(config)
    resumed.planned(config, setup)
    for index, fold in enumerate(folds):
        again = resumed.fold_started(fold, index).finished_result(config, setup, fold)
        for before, after in zip(results[index].cases, again.cases, strict=True):
            assert after.postprocessing == before.postprocessing
            np.testing.assert_equal(after.scores, before.scores)
    assert resumed.child_run_ids == parent.child_run_ids
    mlflow.end_run()
    with pytest.raises(ValueError, match=r"config differs in model.filters \('4' -> '8'\)"):
        other = MlflowObserver(run_id=parent.run_id, cross_validation=True, resume=True)
        changed = config.with_overrides({"model.filters": 8})
        other.run_started(changed)
        try:
            other.planned(changed, setup)
        finally:
            mlflow.end_run()
