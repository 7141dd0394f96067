"""Optuna searches: the search space, pruning from validation Dice, and a shared study
run by two worker processes with every trial a nested MLflow run."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from medseg.config import Config, ConfigError
from medseg.tuning import (
    DicePruningCallback,
    objective_value,
    parse_param,
    parse_space,
    suggest_overrides,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


# -- search space --------------------------------------------------------------------------


def test_space_entries_become_optuna_distributions_over_config_keys():
    params = parse_space(
        [
            "train.learning_rate=log:1e-4:1e-2",
            "model.filters=int:8:32:8",
            "model.dropout=float:0:0.3:0.1",
            "model.normalization=cat:instance|batch",
            "train.epochs=cat:2,4",
        ]
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = []
    for _ in range(30):
        trial = study.ask()
        values = suggest_overrides(trial, params)
        study.tell(trial, 0.0)
        assert 1e-4 <= values["train.learning_rate"] <= 1e-2
        assert values["model.filters"] in (8, 16, 24, 32)
        assert min(abs(values["model.dropout"] - v) for v in (0.0, 0.1, 0.2, 0.3)) < 1e-9
        assert values["model.normalization"] in ("instance", "batch")
        assert values["train.epochs"] in (2, 4) and isinstance(values["train.epochs"], int)
        # the drawn values are valid overrides of the config, typed as its fields
        config = Config().with_overrides(values)
        assert config.model.filters == values["model.filters"]
        seen.append(values["model.filters"])
    assert set(seen) == {8, 16, 24, 32}
    dist = study.trials[0].distributions
    assert dist["train.learning_rate"] == optuna.distributions.FloatDistribution(
        1e-4, 1e-2, log=True
    )
    assert dist["model.filters"] == optuna.distributions.IntDistribution(8, 32, step=8)
    assert dist["model.normalization"] == optuna.distributions.CategoricalDistribution(
        ["instance", "batch"]
    )


def test_space_from_the_command_line_form():
    config = Config().with_overrides(
        ["tune.space=model.name=cat:unet|plain_unet,train.learning_rate=log:1e-4:1e-2"]
    )
    assert config.tune.space == ("model.name=cat:unet|plain_unet", "train.learning_rate=log:1e-4:1e-2")
    (name, lr) = parse_space(config.tune.space)
    assert name.choices == ("unet", "plain_unet")
    assert (lr.kind, lr.low, lr.high) == ("log", 1e-4, 1e-2)
    assert parse_param("train.learning_rate=cat:0.001|0.03").choices == (0.001, 0.03)


@pytest.mark.parametrize(
    "entry, message",
    [
        ("train.learnig_rate=log:1e-4:1e-2", "did you mean 'train.learning_rate'"),
        ("train.learning_rate=uniform:0:1", "kind 'uniform' is not one of"),
        ("train.learning_rate", "is not of the form section.key=KIND:ARGS"),
        ("train.learning_rate=log:1e-2:1e-4", "LOW must be below HIGH"),
        ("train.learning_rate=log:0:1e-2", "log ranges need LOW > 0"),
        ("train.learning_rate=float:a:1", "'a' is not a number"),
        ("model.filters=int:8.5:32", "int bounds must be integers"),
        ("model.filters=cat:eight|sixteen", "expected an integer"),
        ("tune.n_trials=int:1:5", "cannot be searched"),
    ],
)
def test_bad_space_entries_are_errors_naming_the_entry(entry, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_param(entry)
    assert entry.split("=")[0] in str(err.value)


def test_a_key_searched_twice_is_an_error():
    with pytest.raises(ConfigError, match="model.filters appear more than once"):
        parse_space(["model.filters=int:8:16", "model.filters=cat:8|16"])


# -- pruning -------------------------------------------------------------------------------


def test_pruning_callback_reports_mean_validation_dice_and_prunes_below_the_median():
    study = optuna.create_study(
        direction="maximize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0),
    )
    first = study.ask()
    DicePruningCallback(first).on_epoch_end(0, {"val_dice_kidney": 0.6, "val_dice_tumour": 0.2})
    study.tell(first, 0.4)
    assert study.trials[0].intermediate_values == {0: pytest.approx(0.4)}

    good = study.ask()
    logs = {"loss": 0.3, "val_dice_kidney": 0.9, "val_dice_tumour": 0.5, "val_dice_cyst": math.nan}
    DicePruningCallback(good).on_epoch_end(0, logs)  # 0.7 > 0.4: goes on
    assert logs["val_dice_mean"] == pytest.approx(np.mean([0.9, 0.5]))  # NaN left out

    bad = study.ask()
    with pytest.raises(optuna.TrialPruned, match="epoch 0"):
        DicePruningCallback(bad).on_epoch_end(0, {"val_dice_kidney": 0.1, "val_dice_tumour": 0.0})
    assert study._storage.get_trial(bad._trial_id).intermediate_values == {
        0: pytest.approx(0.05)
    }


def test_pruning_on_a_missing_metric_is_an_error():
    trial = optuna.create_study().ask()
    with pytest.raises(KeyError, match="no val_dice_\\* metric in the epoch logs"):
        DicePruningCallback(trial).on_epoch_end(0, {"loss": 1.0})
    with pytest.raises(KeyError, match="tune.prune_metric='val_iou'"):
        DicePruningCallback(trial, "val_iou").on_epoch_end(0, {"loss": 1.0})


def test_objective_is_the_mean_over_foreground_classes_or_a_run_metric():
    result = SimpleNamespace(
        data=SimpleNamespace(class_names=["background", "kidney", "tumour", "cyst"]),
        summary={
            "dice_kidney": {"mean": 0.9},
            "dice_tumour": {"mean": 0.5},
            "dice_cyst": {"mean": math.nan},  # absent everywhere: left out
            "dice_kidney_and_tumour": {"mean": 0.1},  # a region, not a class
        },
    )
    assert objective_value(result, {}, "val_case_dice_mean") == pytest.approx(0.7)
    assert objective_value(result, {"val_loss": 0.25}, "val_loss") == 0.25
    with pytest.raises(KeyError, match="tune.metric='val_iou' is not a metric of the run"):
        objective_value(result, {"val_loss": 0.25}, "val_iou")


# -- a study shared by two worker processes ------------------------------------------------


@pytest.mark.slow
def test_two_workers_share_one_study_every_trial_a_nested_run(tiny_config, tmp_path, capsys):
    from medseg.cli import main
    from medseg.tuning import open_study, tune

    config = tiny_config(
        **{
            "tracking.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
            "tracking.artifact_root": str(tmp_path),
            "tracking.log_model": False,
            "tune.storage": f"sqlite:///{tmp_path}/optuna.db",
            "tune.study_name": "shared",
            # lr 1e-9 never learns (0 is refused): such trials fall below any completed
            # trial and are pruned;
            # depth 5 does not fit 8x16x16 patches: such trials fail
            "tune.space": ["train.learning_rate=cat:1e-9|0.03", "model.depth=cat:2|5"],
            "tune.n_trials": 6,
            "tune.pruner_startup_trials": 1,
            "tune.pruner_warmup_epochs": 0,
        }
    )
    study = open_study(config)
    # the first five trials are fixed; the workers take queued trials in order, so trials
    # 2 and 3 start only once trial 0 or 1 has completed
    for lr, depth in [(0.03, 2), (0.03, 2), (1e-9, 2), (1e-9, 2), (0.03, 5)]:
        study.enqueue_trial({"train.learning_rate": lr, "model.depth": depth})
    best_path = tmp_path / "best.json"
    result = tune(config, workers=2, best_config=best_path)

    trials = {t.number: t for t in optuna.load_study(
        study_name="shared", storage=f"sqlite:///{tmp_path}/optuna.db"
    ).trials}
    assert len(trials) >= 6
    assert sorted(trials) == list(range(len(trials)))
    states = {n: t.state.name for n, t in trials.items()}
    assert states[2] == states[3] == "PRUNED"
    assert states[4] == "FAIL"
    assert "divisible by 2**(depth-1)=16" in trials[4].user_attrs["error"]
    assert "COMPLETE" in states.values()
    assert "RUNNING" not in states.values()

    # every trial is exactly one nested run of the study's run, with its params and outcome
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("medseg")
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result.study_run_id}'",
        max_results=1000,
    )
    numbers = sorted(int(r.data.tags["optuna.trial_number"]) for r in runs)
    assert numbers == sorted(trials)  # none lost, none duplicated
    status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
    for run in runs:
        trial = trials[int(run.data.tags["optuna.trial_number"])]
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.tags["optuna.state"] == trial.state.name
        assert run.info.status == status[trial.state.name]
        if trial.state.name != "FAIL":
            assert float(run.data.params["train.learning_rate"]) == trial.params[
                "train.learning_rate"
            ]
            history = client.get_metric_history(run.info.run_id, "val_dice_mean")
            assert {m.step: m.value for m in history} == pytest.approx(
                trial.intermediate_values
            )
        if trial.state.name == "COMPLETE":
            assert run.data.metrics["val_case_dice_mean"] == pytest.approx(trial.value)
    assert "divisible" in next(
        r for r in runs if r.data.tags["optuna.trial_number"] == "4"
    ).data.tags["optuna.error"]
    workers = {r.data.tags["optuna.worker"] for r in runs}
    assert len({w.split()[0] for w in workers}) == 2  # both processes ran trials

    # the study's run: the trial table and the best config
    rows = client.download_artifacts(result.study_run_id, "tuning/trials.tsv", str(tmp_path))
    lines = open(rows).read().splitlines()
    assert len(lines) == 1 + len(trials)
    complete = [t for t in trials.values() if t.state.name == "COMPLETE"]
    best = max(complete, key=lambda t: t.value)
    assert result.best_trial == best.number and result.best_value == best.value
    exported = Config.from_file(best_path)
    assert exported.train.learning_rate == best.params["train.learning_rate"]
    assert exported.model.depth == best.params["model.depth"]
    assert main(["train", "--config", str(best_path), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out) == exported.to_dict()

    # rerunning a study that holds its n_trials runs no further trial
    again = tune(config, workers=1, best_config=best_path)
    assert [t["number"] for t in again.trials] == sorted(trials)
    assert again.study_run_id == result.study_run_id
