"""``medseg export``: one zip with the weights, plan, postprocessing (and an evaluation's
ensemble), checked member by member when ``medseg predict --model model.zip`` reads it."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import keras
import nibabel as nib
import numpy as np
import pytest

from medseg.cli import main
from medseg.inference import PredictionPlan, predict_case
from medseg.inference.bundle import MANIFEST, read_bundle, write_bundle
from medseg.inference.postprocess import apply_postprocessing
from medseg.io import MedsegIOError, kits19_affine
from medseg.models import build_unet
from medseg.pipeline import PreprocessPlan

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

SPACING = (2.5, 0.8, 0.8)
DECISION = {"keep_largest_component": [1], "min_component_mm3": {}}


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """Two tiny U-Nets logged by medseg's log_model with a plan (training runs), an
    evaluation-like run whose ensemble.json lists them, and a NIfTI case."""
    import mlflow

    from medseg.inference import Ensemble
    from medseg.tracking.model import log_model

    root = tmp_path_factory.mktemp("export")
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("export", artifact_location=(root / "a").as_uri())
    plan = PredictionPlan(
        PreprocessPlan(target_spacing=(3.0, 1.5, 1.5), clip=(-200.0, 300.0), mean=50.0, std=100.0),
        ("background", "kidney", "tumour"), patch_size=(8, 16, 16), stride=2,
    )
    models, run_ids = [], []
    for seed in (0, 1):
        keras.utils.set_random_seed(seed)
        model = build_unet(3, 1, depth=2, filters=4)
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_dict(plan.to_dict(), "plan.json")  # as log_result does
            log_model(model, plan=plan)
        models.append(model)
        run_ids.append(run.info.run_id)
    with mlflow.start_run(experiment_id=experiment) as evaluation:
        ensemble = Ensemble(tuple(f"runs:/{r}/model" for r in run_ids), DECISION)
        ensemble.save(root / "ensemble.json")
        mlflow.log_artifact(str(root / "ensemble.json"))
    image = (np.random.default_rng(0).normal(0, 120, (10, 30, 28)) + 40).astype(np.int16)
    source = root / "case_a.nii.gz"
    nib.save(nib.Nifti1Image(image, kits19_affine(SPACING)), source)
    return uri, run_ids, evaluation.info.run_id, models, plan, image, source, root


def seg_of(folder: Path) -> np.ndarray:
    return np.asarray(nib.load(folder / "case_a_seg.nii.gz").dataobj)


def test_a_training_run_exports_a_zip_with_a_manifest(logged, tmp_path):
    uri, run_ids, _, models, plan, image, source, _ = logged
    bundle = tmp_path / "model.zip"
    assert main(["export", run_ids[0], "--output", str(bundle), "--tracking-uri", uri]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.zip"]  # no temporary left
    with zipfile.ZipFile(bundle) as zf:
        manifest = json.loads(zf.read(MANIFEST))
        assert sorted(zf.namelist()) == sorted([MANIFEST, *manifest["members"]])
        for name, digest in manifest["members"].items():
            assert hashlib.sha256(zf.read(name)).hexdigest() == digest
        assert json.loads(zf.read("plan.json")) == json.loads(json.dumps(plan.to_dict()))
        assert json.loads(zf.read("postprocessing.json")) is None
    assert manifest["format_version"] == 1 and manifest["models"] == ["model.keras"]
    assert manifest["medseg_version"] and manifest["source"]["run_id"] == run_ids[0]
    # predicted with the zip alone: no --plan, no tracking store
    assert main(["predict", "--model", str(bundle), str(source), "--output",
                 str(tmp_path / "out")]) == 0
    expected, _ = predict_case(models[0], image, SPACING, plan.preprocess, plan.patch_size, 3,
                               stride=2)
    assert np.array_equal(seg_of(tmp_path / "out"), expected)


def test_an_evaluation_run_exports_its_ensemble_and_postprocessing(logged, tmp_path, capsys):
    uri, run_ids, evaluation, models, plan, image, source, root = logged
    bundle = tmp_path / "ensemble.zip"
    assert main(["export", evaluation, "--output", str(bundle), "--tracking-uri", uri]) == 0
    with zipfile.ZipFile(bundle) as zf:
        manifest = json.loads(zf.read(MANIFEST))
        assert manifest["models"] == ["models/0.keras", "models/1.keras"]
        assert json.loads(zf.read("postprocessing.json")) == DECISION
        assert json.loads(zf.read("ensemble.json"))["models"] == manifest["models"]
    assert main(["predict", "--model", str(bundle), str(source), "--output",
                 str(tmp_path / "zip")]) == 0
    assert "keep the largest component" in capsys.readouterr().out
    # the same as the evaluation's ensemble.json through the tracking store
    assert main(["predict", "--ensemble", str(root / "ensemble.json"), "--tracking-uri", uri,
                 str(source), "--output", str(tmp_path / "store")]) == 0
    expected, _ = predict_case(models, image, SPACING, plan.preprocess, plan.patch_size, 3,
                               stride=2)
    expected = apply_postprocessing(expected, DECISION, SPACING)
    assert np.array_equal(seg_of(tmp_path / "zip"), expected)
    assert np.array_equal(seg_of(tmp_path / "store"), expected)
    # --postprocessing none still overrides the zip's
    assert main(["predict", "--model", str(bundle), str(source), "--output",
                 str(tmp_path / "raw"), "--postprocessing", "none"]) == 0
    raw, _ = predict_case(models, image, SPACING, plan.preprocess, plan.patch_size, 3, stride=2)
    assert np.array_equal(seg_of(tmp_path / "raw"), raw)


def test_export_errors_name_the_run_or_the_output(logged, tmp_path, capsys):
    uri, run_ids, *_ = logged
    assert main(["export", run_ids[0], "--output", str(tmp_path / "model.tar"),
                 "--tracking-uri", uri]) == 2
    assert "--output" in capsys.readouterr().err
    unknown = "0123456789abcdef0123456789abcdef"
    assert main(["export", unknown, "--output", str(tmp_path / "m.zip"),
                 "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert f"run {unknown}: the tracking store does not know it" in err
    assert list(tmp_path.iterdir()) == []


def rewrite(bundle: Path, out: Path, edit) -> Path:
    """A copy of ``bundle`` with ``edit(members dict)`` applied (name -> bytes)."""
    with zipfile.ZipFile(bundle) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    edit(members)
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return out


@pytest.fixture(scope="module")
def bundle(logged, tmp_path_factory):
    *_, plan, _, _, root = logged
    keras.utils.set_random_seed(0)
    build_unet(3, 1, depth=2, filters=4).save(root / "plain.keras")
    return write_bundle(tmp_path_factory.mktemp("zip") / "model.zip", [root / "plain.keras"], plan)


def _manifest(members, **changes):
    manifest = json.loads(members[MANIFEST])
    manifest.update(changes)
    members[MANIFEST] = json.dumps(manifest).encode()


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda m: m.update({"plan.json": b'{"changed": true}'}),
         "member plan.json has SHA-256"),
        (lambda m: m.pop("postprocessing.json"),
         "member postprocessing.json listed in manifest.json is missing"),
        (lambda m: m.update({"../evil.py": b"x"}), "member name '../evil.py' is not a plain"),
        (lambda m: m.update({"/etc/evil": b"x"}), "member name '/etc/evil' is not a plain"),
        (lambda m: m.update({"extra.txt": b"x"}), "member extra.txt is not listed"),
        (lambda m: m.pop(MANIFEST), "has no manifest.json"),
        (lambda m: _manifest(m, format_version=99), "has format_version 99"),
        (lambda m: m.update({MANIFEST: b"{not json"}), "manifest.json is not valid JSON"),
    ],
)
def test_a_broken_zip_is_refused_naming_the_zip_and_the_member(bundle, tmp_path, edit, fragment):
    broken = rewrite(bundle, tmp_path / "broken.zip", edit)
    with pytest.raises(MedsegIOError, match="model zip") as err:
        read_bundle(broken, tmp_path / "unpacked")
    assert fragment in str(err.value) and str(broken) in str(err.value)
    assert not (tmp_path / "evil.py").exists() and not Path("/etc/evil").exists()


def test_predict_refuses_a_tampered_zip_before_predicting(bundle, logged, tmp_path, capsys):
    *_, source, _ = logged
    broken = rewrite(bundle, tmp_path / "broken.zip",
                     lambda m: m.update({"model.keras": m["model.keras"][:-10]}))
    assert main(["predict", "--model", str(broken), str(source), "--output",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"model zip {broken}: member model.keras has SHA-256" in err
    assert not (tmp_path / "out").exists()
    (tmp_path / "not.zip").write_text("plain text")
    with pytest.raises(MedsegIOError, match="is not a zip file"):
        read_bundle(tmp_path / "not.zip", tmp_path / "u")
    with pytest.raises(FileNotFoundError, match="model zip .*missing.zip does not exist"):
        read_bundle(tmp_path / "missing.zip", tmp_path / "u")


def test_write_bundle_refuses_bad_arguments_and_leaves_nothing(logged, tmp_path):
    *_, plan, _, _, _ = logged
    with pytest.raises(ValueError, match="must end with .zip"):
        write_bundle(tmp_path / "model.tar", [tmp_path / "x.keras"], plan)
    with pytest.raises(FileNotFoundError, match="model file .*x.keras does not exist"):
        write_bundle(tmp_path / "model.zip", [tmp_path / "x.keras"], plan)
    assert list(tmp_path.iterdir()) == []


def test_the_plan_travels_with_the_logged_model(logged, tmp_path):
    """No plan.json in the run: the model folder's own plan serves, also for a copy."""
    import mlflow

    from medseg.tracking.model import load_plan, log_model

    uri, _, _, models, plan, image, source, _ = logged
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("export").experiment_id) as run:
        info = log_model(models[0], plan=plan)
    assert "plan.json" not in {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    for model_uri in (f"runs:/{run.info.run_id}/model", info.model_uri):
        assert load_plan(model_uri, uri).to_dict() == plan.to_dict()
    copied = mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "copy"))
    assert main(["predict", "--model", copied, str(source), "--output", str(tmp_path / "out")]) == 0
    expected, _ = predict_case(models[0], image, SPACING, plan.preprocess, plan.patch_size, 3,
                               stride=2)
    assert np.array_equal(seg_of(tmp_path / "out"), expected)
