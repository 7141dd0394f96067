"""Protocols on the tiny phantom, and a 2-fold cross-validation logged as nested MLflow runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import imageio.v3 as iio
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from medseg.workflows.cross_validation import make_folds, splits_path
from medseg.workflows.experiment import prepare_data


@pytest.fixture(scope="module")
def setup_and_config(tiny_config):
    config = tiny_config()
    return prepare_data(config), tiny_config


def test_make_folds_for_every_protocol(setup_and_config, tmp_path):
    setup, tiny_config = setup_and_config
    ids = sorted(setup.train_ids + setup.val_ids)
    assert len(ids) == 4

    (split,) = make_folds(tiny_config(), setup)[0]
    assert (split.train_ids, split.test_ids) == (setup.train_ids, setup.val_ids)

    path = tmp_path / "splits.json"
    config = tiny_config(**{"evaluation.protocol": "kfold", "evaluation.folds": 2,
                            "evaluation.splits_file": str(path)})
    folds, written = make_folds(config, setup)
    assert written == path and json.loads(path.read_text())["case_ids"] == ids
    assert sorted(c for f in folds for c in f.test_ids) == ids
    assert make_folds(config, setup)[0] == folds  # reused
    # the default location is per split, protocol, fold count and seed, beside the records
    default = splits_path(tiny_config(**{"evaluation.protocol": "kfold"}), setup)
    assert default.name == "train_kfold5_seed42.json"
    assert default.parent == Path(str(setup.builder.data_dir)) / "splits"

    loo = tiny_config(**{"evaluation.protocol": "loo",
                         "evaluation.splits_file": str(tmp_path / "loo.json")})
    assert [f.test_ids for f in make_folds(loo, setup)[0]] == [[c] for c in ids]

    lists = tiny_config(**{"evaluation.protocol": "lists", "evaluation.train_cases": ids[:2],
                           "evaluation.test_cases": ids[3:]})
    ((fold,), _) = make_folds(lists, setup)
    assert fold.train_ids == ids[:2] and fold.test_ids == ids[3:]

    with pytest.raises(ValueError, match=r"test_split='test': dataset .* has splits \['train'\]"):
        make_folds(tiny_config(**{"evaluation.protocol": "holdout"}), setup)
    with pytest.raises(ValueError, match="is not one of"):
        make_folds(tiny_config(**{"evaluation.protocol": "bootstrap"}), setup)


def test_evaluate_command_checks_the_protocol_first(tmp_path, capsys, monkeypatch):
    from medseg.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--print-config", "evaluation.protocol=loo"]) == 0
    assert json.loads(capsys.readouterr().out)["evaluation"]["protocol"] == "loo"
    assert main(["evaluate", "evaluation.protocol=bootstrap"]) == 2
    assert "config key 'evaluation.protocol': 'bootstrap' is not one of 'split'" in (
        capsys.readouterr().err
    )
    assert list(tmp_path.iterdir()) == []  # no MLflow store was created


@pytest.mark.slow
def test_two_fold_cross_validation_logs_nested_runs(tiny_config, tmp_path, monkeypatch):
    import medseg.workflows.cross_validation as cross_validation
    from medseg.inference import predict_case
    from medseg.pipeline import read_cases
    from medseg.tracking.evaluation import fold_model_uris, load_fold_models, run_evaluation

    store = tmp_path / "mlruns"
    config = tiny_config(
        **{
            "evaluation.protocol": "kfold",
            "evaluation.folds": 2,
            "evaluation.splits_file": str(tmp_path / "splits.json"),
            "train.epochs": 1,
            "train.steps_per_epoch": 1,
            "tracking.tracking_uri": f"sqlite:///{store}/mlflow.db",
            "tracking.artifact_root": str(store),
            "tracking.experiment": "cv",
        }
    )
    cv, parent_id = run_evaluation(config)
    client = MlflowClient(config.tracking.tracking_uri)
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert sorted(c.data.tags["medseg.fold"] for c in children) == ["fold_0", "fold_1"]

    mlflow.set_tracking_uri(config.tracking.tracking_uri)
    models = mlflow.search_logged_models(
        experiment_ids=[parent.info.experiment_id], output_format="list"
    )
    for child in children:
        assert child.info.status == "FINISHED"
        assert "val_case_dice_kidney_mean" in child.data.metrics
        assert "loss" in child.data.metrics  # per-epoch metrics went to the fold's run
        assert [m.source_run_id for m in models].count(child.info.run_id) == 1  # its model
        fold = json.loads(Path(mlflow.artifacts.download_artifacts(
            run_id=child.info.run_id, artifact_path="fold.json")).read_text())
        assert len(fold["test"]) == 2

    # the parent holds the pooled evaluation of all 4 cases
    pooled = np.mean([c.scores["dice_kidney"] for _, c in cv.cases])
    assert parent.data.metrics["cv_dice_kidney_mean"] == pytest.approx(pooled)
    assert "cv_hd95_kidney_median" in parent.data.metrics
    table = Path(mlflow.artifacts.download_artifacts(
        run_id=parent_id, artifact_path="evaluation/cases.tsv")).read_text().splitlines()
    assert table[0].startswith("fold\tcase_id\tasd_kidney") and len(table) == 5
    assert sorted(line.split("\t")[1] for line in table[1:]) == sorted(
        c for f in cv.folds for c in f.test_ids
    )
    files = {a.path for a in client.list_artifacts(parent_id)}
    assert {"postprocessing.json", "ensemble.json", "splits.json", "folds.json"} <= files
    plots = {a.path for a in client.list_artifacts(parent_id, "plots")}
    assert {"plots/metrics_boxplot.png", "plots/dataset_overview.png"} <= plots
    overview = mlflow.artifacts.download_artifacts(
        run_id=parent_id, artifact_path="plots/dataset_overview.png")
    assert iio.imread(overview).ndim == 3
    decision = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=parent_id, artifact_path="postprocessing.json")).read_text())
    assert decision == json.loads(json.dumps(cv.postprocessing))
    for label in decision["keep_largest_component"]:
        entry = decision["classes"][str(label)]
        assert entry["dice_after"] > entry["dice_before"]

    # the fold models, reloaded from MLflow, predict as an ensemble
    uris = fold_model_uris(parent_id, config.tracking.tracking_uri)
    assert uris == [f"runs:/{r.info.run_id}/model" for r in sorted(
        children, key=lambda r: r.data.tags["medseg.fold_index"])]
    ensemble = load_fold_models(parent_id, config.tracking.tracking_uri)
    ex = next(read_cases(cv.data.builder, "train", cv.folds[0].test_ids).as_numpy_iterator())
    labels, probs = predict_case(
        ensemble, ex["image"], ex["spacing"], cv.data.plan, config.patch.patch_size, 3
    )
    assert labels.shape == ex["label"].shape
    single = [predict_case(m, ex["image"], ex["spacing"], cv.data.plan,
                           config.patch.patch_size, 3)[1] for m in ensemble]
    np.testing.assert_allclose(probs, np.mean(single, axis=0), atol=1e-5)
    assert not math.isnan(parent.data.metrics["cv_dice_kidney_std"])

    # an interrupted evaluation resumes: fold_1's run failed, so only fold_1 is trained again
    fold_1 = next(c for c in children if c.data.tags["medseg.fold"] == "fold_1")
    client.set_terminated(fold_1.info.run_id, "FAILED")
    trained, original = [], cross_validation.run_fold

    def run_fold(config, setup, fold, callbacks=()):
        trained.append(fold.name)
        return original(config, setup, fold, callbacks)

    monkeypatch.setattr(cross_validation, "run_fold", run_fold)
    resumed, same_id = run_evaluation(config, resume_run_id=parent_id)
    assert same_id == parent_id and trained == ["fold_1"]
    # fold_0's per-case scores and postprocessing scores read back exactly (NaNs included)
    before = {c.case_id: c for f, c in cv.cases if f == "fold_0"}
    after = {c.case_id: c for f, c in resumed.cases if f == "fold_0"}
    assert sorted(after) == sorted(before) == cv.folds[0].test_ids
    for case_id, case in before.items():
        keys = sorted(case.scores)
        assert sorted(after[case_id].scores) == keys
        np.testing.assert_array_equal(
            [after[case_id].scores[k] for k in keys], [case.scores[k] for k in keys]
        )
        assert sorted(after[case_id].postprocessing) == sorted(case.postprocessing)
        for label, table in case.postprocessing.items():
            assert after[case_id].postprocessing[label] == table
    assert len(resumed.models) == 2
    assert len(fold_model_uris(parent_id, config.tracking.tracking_uri)) == 2
    with pytest.raises(ValueError, match=r"config differs in train.epochs \('1' -> '2'\)"):
        run_evaluation(config.with_overrides({"train.epochs": 2}), resume_run_id=parent_id)
