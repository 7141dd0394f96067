"""Reproducing a logged run from its MLflow record."""

from __future__ import annotations

import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from medseg import datasets
from medseg.config import Config, ConfigError, TrackingConfig
from medseg.tracking import git_state
from medseg.tracking.lineage import package_versions
from medseg.tracking.reproduce import lineage_differences, recorded_config
from medseg.tracking.store import configure


def _store(tmp_path) -> tuple[str, str]:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment_id = configure(TrackingConfig(tracking_uri=uri, artifact_root=str(tmp_path)))
    return uri, experiment_id


def _log_params(config: Config) -> None:
    # as run_training logs them: lists as JSON, the rest as MLflow's strings
    mlflow.log_params(
        {k: json.dumps(v) if isinstance(v, list) else v for k, v in config.to_flat_dict().items()}
    )


def test_recorded_config_prefers_the_config_artifact_and_falls_back_to_params(tmp_path):
    uri, experiment_id = _store(tmp_path)
    from_params = Config().with_overrides(
        {"patch.patch_size": [8, 16, 16], "preprocess.target_spacing": None, "seed": 7,
         "tune.space": ["model.filters=int:4:8"], "data.data_dir": "/data/tfds"}
    )
    with mlflow.start_run(experiment_id=experiment_id) as only_params:
        _log_params(from_params)
    assert recorded_config(only_params.info.run_id, uri) == from_params

    from_artifact = from_params.with_overrides({"model.filters": 5})
    with mlflow.start_run(experiment_id=experiment_id) as both:
        _log_params(from_params)
        mlflow.log_text(from_artifact.to_json(), "config.json")
    assert recorded_config(both.info.run_id, uri) == from_artifact

    with mlflow.start_run(experiment_id=experiment_id) as bare:
        mlflow.log_param("unrelated", 1)
    with pytest.raises(ConfigError, match=f"run {bare.info.run_id} recorded no medseg config"):
        recorded_config(bare.info.run_id, uri)


def test_lineage_differences_name_code_packages_and_dataset(tiny_config):
    config = tiny_config()
    builder = datasets.get_builder("kits_phantom", "tiny", config.data.data_dir)
    real_hash = datasets.fingerprint_hash(datasets.read_fingerprint(builder))
    same = {
        **git_state(),
        **{f"version.{k}": v for k, v in package_versions().items()},
        "dataset.version": str(builder.info.version),
        "dataset.fingerprint_hash": real_hash,
    }
    # identical lineage: nothing but the working tree's own uncommitted changes
    notes = lineage_differences(same, config)
    assert all("uncommitted changes" in n for n in notes)

    changed = {
        **same,
        "git.commit": "0" * 40,
        "git.dirty": "true",
        "version.numpy": "0.0.1",
        "dataset.version": "0.9.0",
        "dataset.fingerprint_hash": "f" * 16,
    }
    notes = lineage_differences(changed, config)
    assert f"code differs: the run used commit {'0' * 40}, now {git_state()['git.commit']}" in notes
    assert "code differs: the run's working tree had uncommitted changes" in notes
    assert f"package numpy differs: the run used 0.0.1, now {package_versions()['numpy']}" in notes
    assert f"dataset version differs: the run used 0.9.0, now {builder.info.version}" in notes
    assert f"dataset fingerprint differs: the run used {'f' * 16}, now {real_hash}" in notes


def test_reproducing_an_unknown_run_is_an_error(tmp_path):
    from medseg.tracking.reproduce import reproduce

    uri, _ = _store(tmp_path)
    with pytest.raises(ValueError, match="run 0123abcd is not in"):
        reproduce("0123abcd", uri)


@pytest.mark.slow
def test_a_tiny_cpu_run_reproduces_from_its_run_id(tiny_config, tmp_path, capsys):
    from medseg.cli import main
    from medseg.tracking import run_training

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = tiny_config(
        **{
            "tracking.tracking_uri": uri,
            "tracking.artifact_root": str(tmp_path),
            "tracking.log_model": False,
            "train.strategy": "default",
            "seed": 3,
        }
    )
    _, original_id = run_training(config)
    client = MlflowClient(uri)
    # the dataset is said to have changed since: the rerun must warn, and still run
    client.set_tag(original_id, "dataset.fingerprint_hash", "0" * 16)
    capsys.readouterr()

    assert main(["reproduce", original_id, "--tracking-uri", uri]) == 0
    out, err = capsys.readouterr()
    assert "warning: dataset fingerprint differs: the run used 0000000000000000" in err

    experiment = client.get_experiment_by_name(config.tracking.experiment)
    (rerun,) = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`medseg.reproduces` = '{original_id}'"
    )
    assert f"MLflow run {rerun.info.run_id} reproduces {original_id}" in out
    original = client.get_run(original_id)
    assert rerun.data.params == original.data.params  # the same config, seed included
    for key in ("val_case_dice_kidney_mean", "val_dice_kidney", "loss"):
        a, b = original.data.metrics[key], rerun.data.metrics[key]
        assert abs(a - b) <= 1e-3, (key, a, b)
        (line,) = [x for x in out.splitlines() if x.split()[:1] == [key]]
        assert float(line.split()[1]) == pytest.approx(a, abs=1e-4)
        assert float(line.split()[2]) == pytest.approx(b, abs=1e-4)
