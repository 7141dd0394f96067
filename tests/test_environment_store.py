"""MLFLOW_TRACKING_URI in the environment is the store of every command that reads or
writes runs (train, evaluate, predict, export, reproduce), and an explicit config or
``--tracking-uri`` wins over it (issue 15)."""

from __future__ import annotations

import json
import zipfile

import nibabel as nib
import numpy as np
import pytest
from conftest import TINY_OVERRIDES
from mlflow.tracking import MlflowClient

from medseg.cli import main


def _overrides(tiny_data_dir, **extra) -> list[str]:
    values = {**TINY_OVERRIDES, "data.data_dir": tiny_data_dir, "train.epochs": 1, **extra}
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]


def _run_ids(uri: str) -> list[str]:
    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return [r.info.run_id for r in client.search_runs(ids)] if ids else []


@pytest.mark.slow
def test_every_command_uses_the_environments_store_unless_told_otherwise(
    tiny_data_dir, tmp_path, monkeypatch, capsys
):
    env_store = f"sqlite:///{tmp_path}/team/mlflow.db"
    (tmp_path / "team").mkdir()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the default store would be work/mlruns/mlflow.db
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_store)
    artifacts = f"tracking.artifact_root={tmp_path / 'team'}"

    assert main(["train", *_overrides(tiny_data_dir), artifacts]) == 0
    runs = _run_ids(env_store)
    assert len(runs) == 1
    run_id = runs[0]
    assert not (work / "mlruns").exists()

    # predict finds runs:/ in the environment's store (the --tracking-uri default stands
    # for it), and so do export and reproduce
    image = np.random.default_rng(0).normal(size=(24, 24, 12)).astype(np.float32) * 100
    nib.save(nib.Nifti1Image(image, np.diag([2.0, 2.0, 4.0, 1.0])), tmp_path / "case.nii.gz")
    assert main(["predict", str(tmp_path / "case.nii.gz"), "--model", f"runs:/{run_id}/model",
                 "--output", str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / "case_seg.nii.gz").is_file()
    assert main(["export", run_id, "--output", str(tmp_path / "model.zip")]) == 0
    assert "plan.json" in zipfile.ZipFile(tmp_path / "model.zip").namelist()
    assert main(["reproduce", run_id, artifacts]) in (0, 1)  # 1: metrics differ (CPU)
    assert len(_run_ids(env_store)) == 2
    assert not (work / "mlruns").exists()

    # explicit wins: a config's tracking.tracking_uri and --tracking-uri
    own_store = f"sqlite:///{tmp_path}/own/mlflow.db"
    (tmp_path / "own").mkdir()
    assert main(["train", *_overrides(tiny_data_dir), artifacts,
                 f"tracking.tracking_uri={own_store}"]) == 0
    assert len(_run_ids(own_store)) == 1 and len(_run_ids(env_store)) == 2
    capsys.readouterr()
    assert main(["export", run_id, "--output", str(tmp_path / "other.zip"),
                 "--tracking-uri", own_store]) == 2
    assert run_id in capsys.readouterr().err
    assert not (tmp_path / "other.zip").exists()
