"""Optuna pictures of a study logged to its MLflow run; selectable pruners and samplers,
seeded; Optuna's own trial lines on or off (``quiet``)."""

from __future__ import annotations

import logging
import os
import sys

import matplotlib.image
import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from medseg.config import Config, ConfigError, TuneConfig
from medseg.tuning import (
    PLOTS,
    log_study_plots,
    make_pruner,
    make_sampler,
    open_study,
    parse_space,
    skip_reason,
    suggest_overrides,
)
from medseg.tuning.study import _show_progress

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
optuna.logging.set_verbosity(optuna.logging.WARNING)


# -- pruners and samplers ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, cls",
    [
        ("median", optuna.pruners.MedianPruner),
        ("percentile", optuna.pruners.PercentilePruner),
        ("hyperband", optuna.pruners.HyperbandPruner),
        ("none", optuna.pruners.NopPruner),
    ],
)
def test_each_pruner_name_makes_its_optuna_pruner(name, cls):
    tune = Config().with_overrides(
        {"tune.pruner": name, "tune.pruner_startup_trials": 1, "tune.pruner_warmup_epochs": 0}
    ).tune
    pruner = make_pruner(tune)
    assert type(pruner) is cls  # exact: MedianPruner is itself a PercentilePruner

    def objective(trial):  # a bad x stays bad every epoch: the pruners should stop some
        x = trial.suggest_float("x", 0.0, 1.0)
        for epoch in range(9):
            trial.report(x * (epoch + 1), epoch)
            if trial.should_prune():
                raise optuna.TrialPruned
        return x * 9

    study = optuna.create_study(
        direction="maximize", sampler=make_sampler(tune, 0), pruner=pruner
    )
    study.optimize(objective, n_trials=12)
    states = [t.state.name for t in study.trials]
    assert set(states) <= {"COMPLETE", "PRUNED"}
    assert ("PRUNED" in states) is (name != "none")


def _prunes(pruner_values, value):
    """Whether ``value`` at epoch 0 is pruned, after ten trials of 0.1 ... 1.0 (maximized)."""
    tune = Config().with_overrides(
        {**pruner_values, "tune.pruner_startup_trials": 1, "tune.pruner_warmup_epochs": 0}
    ).tune
    study = optuna.create_study(direction="maximize", pruner=make_pruner(tune))
    for v in np.linspace(0.1, 1.0, 10):
        trial = study.ask()
        trial.report(float(v), 0)
        study.tell(trial, float(v))
    trial = study.ask()
    trial.report(value, 0)
    return bool(trial.should_prune())


def test_the_percentile_pruner_keeps_the_top_percentile_of_trials():
    values = np.linspace(0.1, 1.0, 10)
    # tune.pruner_percentile=10 keeps the top 10 %: below numpy's 90th percentile is pruned
    cut = float(np.percentile(values, 90))
    percentile = {"tune.pruner": "percentile", "tune.pruner_percentile": "10"}
    assert _prunes(percentile, cut - 0.02) is True
    assert _prunes(percentile, cut + 0.02) is False
    # the median pruner keeps that same value (above the median, 0.55)
    assert cut - 0.02 > np.median(values)
    assert _prunes({"tune.pruner": "median"}, cut - 0.02) is False


@pytest.mark.parametrize(
    "name, cls", [("tpe", optuna.samplers.TPESampler), ("random", optuna.samplers.RandomSampler)]
)
def test_each_sampler_name_makes_its_optuna_sampler(name, cls):
    assert type(make_sampler(Config().with_overrides({"tune.sampler": name}).tune, 0)) is cls


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("tune.sampler", "cmaes", "config key 'tune.sampler': 'cmaes' is not one of 'tpe', 'random'"),
        ("tune.sampler", "TPE", "did you mean 'tpe'"),
        ("tune.pruner", "sha", "config key 'tune.pruner': 'sha' is not one of 'median', "
         "'percentile', 'hyperband', 'none'"),
        ("tune.pruner_percentile", 150, "config key 'tune.pruner_percentile': 150.0 is not in [0, 100]"),
    ],
)
def test_bad_pruner_or_sampler_names_the_key_and_the_allowed_values(key, value, fragment):
    with pytest.raises(ConfigError) as err:
        Config().with_overrides({key: value})
    assert fragment in str(err.value)
    section, _, field = key.partition(".")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        TuneConfig(**{field: value})
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Config.from_dict({section: {field: value}})


def _draws(tmp_path, name, sampler, seed, n=4):
    config = Config().with_overrides(
        {
            "tune.storage": f"sqlite:///{tmp_path}/{name}.db",
            "tune.study_name": name,
            "tune.sampler": sampler,
            "tune.space": ["train.learning_rate=log:1e-4:1e-2", "model.filters=int:8:32:8"],
            "seed": seed,
        }
    )
    study, params = open_study(config), parse_space(config.tune.space)
    draws = []
    for _ in range(n):
        trial = study.ask()
        draws.append(suggest_overrides(trial, params))
        study.tell(trial, draws[-1]["train.learning_rate"])
    return draws


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_seeded_study_draws_the_same_params_twice(tmp_path, sampler):
    first = _draws(tmp_path, "a", sampler, seed=7)
    assert _draws(tmp_path, "b", sampler, seed=7) == first  # another storage, same draws
    assert _draws(tmp_path, "c", sampler, seed=8) != first  # the seed decides them
    assert len({d["train.learning_rate"] for d in first}) == len(first)


def test_the_progress_bar_only_on_a_terminal_and_never_quiet(monkeypatch):
    class Terminal:
        def isatty(self):
            return True

        def write(self, text):
            return len(text)

        def flush(self):
            pass

    assert _show_progress(quiet=False, progress=True) is sys.stderr.isatty()
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert _show_progress(quiet=False, progress=True) is True
    assert _show_progress(quiet=True, progress=True) is False
    assert _show_progress(quiet=False, progress=False) is False  # several workers


# -- plots of a study ----------------------------------------------------------------------


def _study(n_complete, vary=True, reports=True, directions=None):
    study = optuna.create_study(
        directions=directions or ["maximize"], sampler=optuna.samplers.RandomSampler(seed=0)
    )
    for _ in range(n_complete):
        trial = study.ask()
        x = trial.suggest_float("x", 0.0, 1.0) if vary else trial.suggest_float("x", 0.5, 0.5)
        trial.suggest_categorical("c", ["a", "b"] if vary else ["a"])
        if reports:
            for epoch in range(3):
                trial.report(x * (epoch + 1) / 3, epoch)
        study.tell(trial, [x] * len(study.directions) if directions else x)
    return study


def _run(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("plots", artifact_location=str(tmp_path / "art"))
    return client, client.create_run(experiment).info.run_id


def _png(client, run_id, tmp_path):
    """The run's ``plots/*.png``, downloaded: {name: image array}."""
    names = [a.path for a in client.list_artifacts(run_id, "plots")]
    out = tmp_path / "down"
    out.mkdir(exist_ok=True)
    return {
        os.path.basename(p)[: -len(".png")]: matplotlib.image.imread(
            client.download_artifacts(run_id, p, str(out))
        )
        for p in names
    }


def test_a_study_logs_its_four_plots_as_images(tmp_path):
    client, run_id = _run(tmp_path)
    outcome = log_study_plots(client, run_id, _study(4))
    assert outcome == dict.fromkeys(PLOTS, "logged")
    images = _png(client, run_id, tmp_path)
    assert sorted(images) == sorted(PLOTS)
    for image in images.values():
        assert image.shape[0] >= 300 and image.shape[1] >= 500  # 8x5 in at 100 dpi
        assert image[..., :3].std() > 0.05  # drawn, not a blank canvas
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # every figure closed


def test_plots_that_would_tell_nothing_are_skipped_with_their_reason(tmp_path):
    assert skip_reason("optimization_history", _study(0)) == "no trial of the study completed yet"
    one = _study(1)
    assert "at least 2 completed trials, the study has 1" in skip_reason("param_importances", one)
    assert skip_reason("optimization_history", one) is None
    assert "a parameter that varies" in skip_reason("param_importances", _study(3, vary=False))
    assert "no trial reported intermediate values" in skip_reason(
        "intermediate_values", _study(3, reports=False)
    )
    client, run_id = _run(tmp_path)
    outcome = log_study_plots(client, run_id, one)
    assert outcome["param_importances"].startswith("importances need at least 2")
    assert sorted(_png(client, run_id, tmp_path)) == sorted(
        {"optimization_history", "parallel_coordinate", "intermediate_values"}
    )
    tags = client.get_run(run_id).data.tags
    assert tags["medseg.plot_skipped.param_importances"] == outcome["param_importances"]


def test_a_plot_that_fails_leaves_a_warning_and_a_tag_not_an_error(tmp_path, caplog):
    # Optuna cannot draw the history of a two-objective study without a target
    study = _study(3, reports=False, directions=["maximize", "minimize"])
    client, run_id = _run(tmp_path)
    with caplog.at_level(logging.WARNING, logger="medseg.tuning.plots"):
        outcome = log_study_plots(client, run_id, study)
    assert outcome["optimization_history"].startswith("ValueError")
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "plot optimization_history of study" in warning
    assert "could not be logged, the study goes on without it: ValueError" in warning
    tags = client.get_run(run_id).data.tags
    assert tags["medseg.plot_failed.optimization_history"] == outcome["optimization_history"]
    assert client.get_run(run_id).info.status == "RUNNING"  # the run goes on


# -- a real tiny study ---------------------------------------------------------------------


@pytest.mark.slow
def test_a_tiny_study_logs_plots_to_its_run_and_quiet_silences_optuna(
    tiny_config, tmp_path, caplog
):
    from medseg.cli import main
    from medseg.tuning import tune

    overrides = {
        "tracking.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
        "tracking.artifact_root": str(tmp_path),
        "tracking.log_model": False,
        "tune.storage": f"sqlite:///{tmp_path}/optuna.db",
        "tune.study_name": "pictures",
        "tune.space": ["train.learning_rate=cat:0.01|0.03"],
        "tune.sampler": "random",
        "tune.n_trials": 2,
        "tune.pruner_startup_trials": 5,  # report, never prune: both trials complete
    }
    config = tiny_config(**overrides)
    study = open_study(config)
    for lr in (0.01, 0.03):  # two values: importances have a varying parameter
        study.enqueue_trial({"train.learning_rate": lr})
    optuna.logging.enable_propagation()  # Optuna's own logger, seen by caplog
    try:
        with caplog.at_level(logging.INFO, logger="optuna"):
            result = tune(config, workers=1, best_config=tmp_path / "best.json")
    finally:
        optuna.logging.disable_propagation()
    assert [t["state"] for t in result.trials] == ["COMPLETE", "COMPLETE"]
    assert "Trial 0 finished with value" in caplog.text
    assert "Trial 1 finished with value" in caplog.text

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    images = _png(client, result.study_run_id, tmp_path)
    assert sorted(images) == sorted(PLOTS)
    for image in images.values():
        assert image.shape[:2] == (500, 800) and image[..., :3].std() > 0.05

    # `medseg tune --quiet` on the finished study: Optuna's INFO lines are off
    config.save(tmp_path / "tune.json")
    assert main(["tune", "--config", str(tmp_path / "tune.json"), "--quiet"]) == 0
    assert optuna.logging.get_verbosity() == optuna.logging.WARNING
