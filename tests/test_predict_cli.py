"""``medseg predict`` on a saved model, NIfTI files, DICOM series and MLflow model URIs."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import keras
import nibabel as nib
import numpy as np
import pydicom
import pytest

from medseg.cli import main
from medseg.inference import PredictionPlan, predict_case, predict_files
from medseg.inference.postprocess import load_postprocessing
from medseg.io import kits19_affine, read_dicom_series
from medseg.models import build_unet
from medseg.pipeline import PreprocessPlan

CT5N = Path(pydicom.__file__).parent / "data/test_files/dicomdirtests/98892001/CT5N"
CLASSES = ("background", "kidney", "tumour")
SPACING = (2.5, 0.8, 0.8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny untrained U-Net saved as .keras, its plan.json and two CT-like NIfTI files."""
    root = tmp_path_factory.mktemp("predict")
    keras.utils.set_random_seed(0)
    model = build_unet(3, 1, depth=2, filters=4, normalization="instance")
    model.save(root / "model.keras")
    plan = PredictionPlan(
        PreprocessPlan(target_spacing=(3.0, 1.5, 1.5), clip=(-200.0, 300.0), mean=50.0, std=100.0),
        CLASSES,
        patch_size=(8, 16, 16),
        stride=2,
    )
    plan.save(root / "plan.json")
    rng = np.random.default_rng(0)
    (root / "cases").mkdir()
    images = {}
    for name, shape in (("case_a", (10, 30, 28)), ("case_b", (7, 20, 24))):
        image = (rng.normal(0, 120, shape) + 40).astype(np.int16)
        nib.save(nib.Nifti1Image(image, kits19_affine(SPACING)), root / "cases" / f"{name}.nii.gz")
        images[name] = image
    return root, model, plan, images


def run(*args) -> int:
    return main(["predict", *map(str, args)])


def test_nifti_file_is_predicted_with_the_source_affine(saved, tmp_path):
    root, model, plan, images = saved
    source = root / "cases" / "case_a.nii.gz"
    assert run("--model", root / "model.keras", "--plan", root / "plan.json", source,
               "--output", tmp_path, "--probabilities") == 0
    seg = nib.load(tmp_path / "case_a_seg.nii.gz")
    prob = nib.load(tmp_path / "case_a_prob.nii.gz")
    src = nib.load(source)
    np.testing.assert_allclose(seg.affine, src.affine)
    np.testing.assert_allclose(prob.affine, src.affine)
    labels = np.asarray(seg.dataobj)
    probs = np.asarray(prob.dataobj)
    assert labels.dtype == np.uint8 and labels.shape == images["case_a"].shape
    assert probs.dtype == np.float32 and probs.shape == (*images["case_a"].shape, 3)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    # the same as predicting the array directly with the plan
    expected, expected_probs = predict_case(
        model, images["case_a"], SPACING, plan.preprocess, plan.patch_size, 3, stride=2
    )
    np.testing.assert_allclose(probs, expected_probs, atol=1e-5)
    np.testing.assert_array_equal(labels, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "case_a_prob.nii.gz", "case_a_provenance.json", "case_a_seg.nii.gz"
    ]


def test_mirroring_and_overlap_reach_the_prediction(saved, tmp_path):
    root, model, plan, images = saved
    source = root / "cases" / "case_b.nii.gz"
    assert run("--model", root / "model.keras", "--plan", root / "plan.json", source,
               "--output", tmp_path, "--probabilities", "--mirror", "--overlap", "0.25",
               "--weighting", "mean") == 0
    probs = np.asarray(nib.load(tmp_path / "case_b_prob.nii.gz").dataobj)
    _, expected = predict_case(
        model, images["case_b"], SPACING, plan.preprocess, plan.patch_size, 3, 0.25,
        weighting="mean", mirror_axes=(0, 1, 2), stride=2,
    )
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    _, unmirrored = predict_case(
        model, images["case_b"], SPACING, plan.preprocess, plan.patch_size, 3, 0.25,
        weighting="mean", stride=2,
    )
    assert not np.allclose(probs, unmirrored, atol=1e-4)


def test_dicom_series_is_predicted_with_its_affine(saved, tmp_path):
    root, model, _, _ = saved
    plan = PredictionPlan(
        PreprocessPlan(target_spacing=None, clip=None, mean=0.0, std=100.0), CLASSES, (8, 8, 8), 2
    )
    plan.save(tmp_path / "plan.json")
    assert run("--model", root / "model.keras", "--plan", tmp_path / "plan.json", CT5N,
               "--output", tmp_path / "out") == 0
    record = read_dicom_series(CT5N)
    seg = nib.load(tmp_path / "out" / "CT5N_seg.nii.gz")
    np.testing.assert_allclose(seg.affine, record.affine, atol=1e-4)
    expected, _ = predict_case(model, record.image, record.spacing, plan.preprocess, (8, 8, 8), 3)
    np.testing.assert_array_equal(np.asarray(seg.dataobj), expected)


def test_folder_of_nifti_files_and_resuming(saved, tmp_path, capsys):
    root, *_ = saved
    args = ("--model", root / "model.keras", "--plan", root / "plan.json", root / "cases",
            "--output", tmp_path)
    assert run(*args) == 0
    outputs = sorted(tmp_path.glob("*.nii.gz"))
    assert [p.name for p in outputs] == ["case_a_seg.nii.gz", "case_b_seg.nii.gz"]
    stamps = [p.stat().st_mtime_ns for p in outputs]
    os.utime(outputs[0], ns=(1, 1))
    outputs[1].unlink()  # as if interrupted before the second case
    capsys.readouterr()
    assert run(*args) == 0
    out = capsys.readouterr().out
    assert "case_a: " in out and "skipped" in out and "wrote 1 file(s)" in out
    assert outputs[0].stat().st_mtime_ns == 1  # not predicted again
    assert outputs[1].exists() and outputs[1].stat().st_mtime_ns >= stamps[1]
    assert run(*args, "--overwrite") == 0
    assert outputs[0].stat().st_mtime_ns > 1


def _error(capsys, *args) -> str:
    assert run(*args) == 2
    return capsys.readouterr().err


def test_bad_input_is_an_error_naming_the_file(saved, tmp_path, capsys):
    root, *_ = saved
    model, plan = root / "model.keras", root / "plan.json"
    out = tmp_path / "out"
    missing = tmp_path / "nothere.nii.gz"
    assert f"input {missing} does not exist" in _error(capsys, "--model", model, "--plan", plan,
                                                        missing, "--output", out)
    text = tmp_path / "notes.txt"
    text.write_text("x")
    assert f"input {text}: expected a .nii" in _error(capsys, "--model", model, "--plan", plan,
                                                      text, "--output", out)
    err = _error(capsys, "--model", model, root / "cases" / "case_a.nii.gz", "--output", out)
    assert "pass --plan plan.json" in err
    bad_plan = tmp_path / "plan.json"
    bad_plan.write_text(json.dumps({k: v for k, v in json.loads(plan.read_text()).items()
                                    if k != "patch_size"}))
    err = _error(capsys, "--model", model, "--plan", bad_plan, root / "cases", "--output", out)
    assert str(bad_plan) in err and "'patch_size'" in err
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip")
    assert f"model file {broken} cannot be loaded" in _error(
        capsys, "--model", broken, "--plan", plan, root / "cases", "--output", out
    )
    # two channels for a one-channel model: named, and nothing written
    two = tmp_path / "two.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 16, 16, 2), np.int16), np.eye(4)), two)
    err = _error(capsys, "--model", model, "--plan", plan, two, "--output", out)
    assert f"{two}: image has 2 channel(s) but the model takes 1" in err
    # same case name twice
    other = tmp_path / "again"
    other.mkdir()
    (other / "case_a.nii.gz").write_bytes((root / "cases" / "case_a.nii.gz").read_bytes())
    err = _error(capsys, "--model", model, "--plan", plan, root / "cases", other, "--output", out)
    assert "are both case 'case_a'" in err
    assert not out.exists() or not any(out.iterdir())


# -- MLflow model URIs ------------------------------------------------------------------------


# given, as medseg training gives them: inferring them loads the model in a subprocess
PIP = {"pip_requirements": ["tensorflow", "keras"]}


@pytest.fixture(scope="module")
def mlflow_store(saved, tmp_path_factory):
    """The saved model logged to a fresh sqlite store as medseg training logs it."""
    import mlflow

    from medseg.tracking import model_signature

    root, model, plan, _ = saved
    store = tmp_path_factory.mktemp("mlruns")
    uri = f"sqlite:///{store}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("predict", artifact_location=(store / "a").as_uri())
    with mlflow.start_run(experiment_id=experiment) as with_plan:
        mlflow.log_artifact(str(root / "plan.json"))
        info = mlflow.keras.log_model(model, name="model", signature=model_signature(1, 3), **PIP)
    with mlflow.start_run(experiment_id=experiment) as without_plan:
        mlflow.keras.log_model(model, name="model", signature=model_signature(1, 3), **PIP)
    return uri, with_plan.info.run_id, info.model_uri, without_plan.info.run_id


@pytest.mark.parametrize("kind", ["runs", "models"])
def test_mlflow_model_uri_brings_its_plan(saved, mlflow_store, tmp_path, kind):
    root, model, plan, images = saved
    uri, run_id, model_uri, _ = mlflow_store
    model_arg = f"runs:/{run_id}/model" if kind == "runs" else model_uri
    source = root / "cases" / "case_a.nii.gz"
    assert run("--model", model_arg, "--tracking-uri", uri, source, "--output", tmp_path) == 0
    seg = nib.load(tmp_path / "case_a_seg.nii.gz")
    np.testing.assert_allclose(seg.affine, nib.load(source).affine)
    expected, _ = predict_case(
        model, images["case_a"], SPACING, plan.preprocess, plan.patch_size, 3, stride=2
    )
    np.testing.assert_array_equal(np.asarray(seg.dataobj), expected)


def test_mlflow_run_without_a_plan_is_a_clear_error(saved, mlflow_store, tmp_path, capsys):
    root, *_ = saved
    uri, _, _, bare_run = mlflow_store
    err = _error(capsys, "--model", f"runs:/{bare_run}/model", "--tracking-uri", uri,
                 root / "cases", "--output", tmp_path)
    assert f"run {bare_run} has no plan.json artifact" in err and "--plan" in err
    # with --plan it works
    assert run("--model", f"runs:/{bare_run}/model", "--tracking-uri", uri, "--plan",
               root / "plan.json", root / "cases", "--output", tmp_path) == 0
    assert len(list(tmp_path.glob("*_seg.nii.gz"))) == 2


@pytest.mark.slow
def test_trained_run_predicts_from_its_uri_alone(tiny_config, tmp_path):
    """End to end: medseg training logs what prediction needs; no --plan required."""
    from medseg.tracking import run_training

    store = tmp_path / "mlruns"
    config = tiny_config(**{
        "tracking.tracking_uri": f"sqlite:///{store}/mlflow.db",
        "tracking.artifact_root": str(store),
        "tracking.experiment": "predict-e2e",
    })
    result, run_id = run_training(config)
    image = (np.random.default_rng(1).normal(0, 100, (20, 40, 36)) + 40).astype(np.int16)
    source = tmp_path / "new_case.nii.gz"
    nib.save(nib.Nifti1Image(image, kits19_affine(SPACING)), source)
    assert run("--model", f"runs:/{run_id}/model", "--tracking-uri",
               config.tracking.tracking_uri, source, "--output", tmp_path / "out") == 0
    seg = nib.load(tmp_path / "out" / "new_case_seg.nii.gz")
    np.testing.assert_allclose(seg.affine, kits19_affine(SPACING))
    expected, _ = predict_case(
        result.model, image, SPACING, result.data.plan, config.patch.patch_size,
        len(result.data.class_names), stride=2 ** (config.model.depth - 1),
    )
    np.testing.assert_array_equal(np.asarray(seg.dataobj), expected)


def test_plan_json_round_trip_and_compatibility(tmp_path):
    from medseg.config import Config

    config = Config().with_overrides({"patch.patch_size": [16, 32, 48], "model.depth": 4})
    preprocess = PreprocessPlan((3.0, 1.5, 1.5), (-80.0, 300.0), 100.0, 50.0)
    plan = PredictionPlan.from_config(config, preprocess, CLASSES)
    assert plan.patch_size == (16, 32, 48) and plan.stride == 8
    plan.save(tmp_path / "plan.json")
    assert PredictionPlan.from_file(tmp_path / "plan.json") == plan
    # the file is still a PreprocessPlan for code that reads only that
    values = json.loads((tmp_path / "plan.json").read_text())
    assert PreprocessPlan.from_dict(values) == preprocess
    with pytest.raises(ValueError, match=r"plan file .*bad.json: 'class_names' must list"):
        (tmp_path / "bad.json").write_text(json.dumps({**values, "class_names": ["only"]}))
        PredictionPlan.from_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match=r"not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        PredictionPlan.from_file(tmp_path / "bad.json")


def test_model_uris_are_told_from_paths(tmp_path):
    from medseg.inference import is_model_uri

    assert is_model_uri("runs:/abc/model") and is_model_uri("models:/m-123")
    assert is_model_uri("s3://bucket/model")
    assert not is_model_uri(tmp_path / "model.keras")
    (tmp_path / "mlflow_model").mkdir()
    (tmp_path / "mlflow_model" / "MLmodel").write_text("flavors: {}")
    assert is_model_uri(tmp_path / "mlflow_model")


def test_postprocessing_decision_keeps_the_largest_component(tmp_path):
    """The plan's postprocessing decision (or a cross-validation's put in its place)
    is applied to what is written; it survives the plan's JSON round trip."""
    image = np.zeros((8, 24, 24), np.int16)
    image[2:6, 2:12, 2:12] = 100  # a large "kidney"
    image[3:5, 18:21, 18:21] = 100  # a small false positive
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "case.nii.gz")
    plan = PredictionPlan(
        PreprocessPlan(target_spacing=None, clip=None, mean=0.0, std=1.0),
        ("background", "kidney"),
        patch_size=(8, 8, 8),
        stride=1,
    )
    plan.save(tmp_path / "plan.json")

    def threshold(batch):  # kidney where the intensity is high
        kidney = (np.asarray(batch)[..., 0] > 50).astype(np.float32)
        return np.stack([1 - kidney, kidney], axis=-1)

    predict_files(threshold, plan, [tmp_path / "case.nii.gz"], tmp_path / "raw", log=None)
    raw = np.asarray(nib.load(tmp_path / "raw" / "case_seg.nii.gz").dataobj)
    np.testing.assert_array_equal(raw, image > 50)
    decision = tmp_path / "postprocessing.json"
    decision.write_text(json.dumps({"keep_largest_component": [1]}))
    planned = dataclasses.replace(plan, postprocessing=load_postprocessing(decision))
    planned.save(tmp_path / "planned.json")
    written = predict_files(
        threshold,
        PredictionPlan.from_file(tmp_path / "planned.json"),
        [tmp_path / "case.nii.gz"],
        tmp_path / "post",
        log=None,
    )
    post = np.asarray(nib.load(written[0]).dataobj)
    expected = np.zeros_like(raw)
    expected[2:6, 2:12, 2:12] = 1
    np.testing.assert_array_equal(post, expected)
    # a volume rule in mm³: the file's 2 mm voxels make the 18-voxel blob 144 mm³
    nib.save(nib.Nifti1Image(image, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "big.nii.gz")
    by_volume = dataclasses.replace(
        plan, postprocessing={"keep_largest_component": [], "min_component_mm3": {"1": 150.0}}
    )
    written = predict_files(threshold, by_volume, [tmp_path / "big.nii.gz"], tmp_path / "vol", log=None)
    np.testing.assert_array_equal(np.asarray(nib.load(written[0]).dataobj), expected)
    by_volume = dataclasses.replace(
        plan, postprocessing={"keep_largest_component": [], "min_component_mm3": {"1": 140.0}}
    )
    written = predict_files(threshold, by_volume, [tmp_path / "big.nii.gz"], tmp_path / "v2", log=None)
    np.testing.assert_array_equal(np.asarray(nib.load(written[0]).dataobj), raw)
    bad = {**plan.to_dict(), "postprocessing": {"keep_largest_component": [1],
                                                 "min_component_mm3": {"1": -5}}}
    (tmp_path / "bad_plan.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"bad_plan.json: 'postprocessing': 'min_component_mm3'"):
        PredictionPlan.from_file(tmp_path / "bad_plan.json")
    with pytest.raises(ValueError, match="has no 'keep_largest_component' list"):
        (tmp_path / "bad.json").write_text("{}")
        load_postprocessing(tmp_path / "bad.json")


def test_an_ensemble_file_gives_its_models_and_postprocessing(saved, mlflow_store, tmp_path,
                                                               capsys):
    from medseg.inference import Ensemble

    root, model, plan, images = saved
    uri, run_id, _, _ = mlflow_store
    decision = {"keep_largest_component": [1], "min_component_mm3": {}}
    ensemble = Ensemble((f"runs:/{run_id}/model", str(root / "model.keras")), decision)
    path = ensemble.save(tmp_path / "ensemble.json")
    assert Ensemble.load(path) == ensemble
    assert run("--ensemble", path, "--tracking-uri", uri, root / "cases" / "case_a.nii.gz",
               "--output", tmp_path / "out") == 0
    assert "postprocessing: label 1: keep the largest component" in capsys.readouterr().out
    seg = np.asarray(nib.load(tmp_path / "out" / "case_a_seg.nii.gz").dataobj)
    # the same model twice averages to itself; then the ensemble's postprocessing
    expected, _ = predict_case([model, model], images["case_a"], SPACING, plan.preprocess,
                               plan.patch_size, 3, stride=2)
    from medseg.inference.postprocess import apply_postprocessing

    np.testing.assert_array_equal(seg, apply_postprocessing(expected, decision, SPACING))
    (tmp_path / "bad.json").write_text('{"models": []}')
    err = _error(capsys, "--ensemble", tmp_path / "bad.json", root / "cases", "--output", tmp_path)
    assert "bad.json: 'models' must list at least one model" in err
    err = _error(capsys, root / "cases", "--output", tmp_path)
    assert "give --model (repeatable) or --ensemble" in err


# -- real folders: hidden files, own outputs, reruns, failures ------------------------------


def _cases_copy(root: Path, folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / f"{name}.nii.gz").write_bytes((root / "cases" / f"{name}.nii.gz").read_bytes())
    return folder


def test_hidden_files_and_own_outputs_are_not_cases(saved, tmp_path, capsys):
    root, model, plan, images = saved
    inputs = _cases_copy(root, tmp_path / "in", "case_a")
    # what an MSD archive unpacked on macOS, Finder and an interrupted write leave behind
    (inputs / "._case_a.nii.gz").write_bytes(b"\x00\x05\x16\x07AppleDouble garbage")
    (inputs / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (inputs / ".case_a_seg.nii.gz.k2x9q1.nii.gz").write_bytes(b"half a gzip")
    args = ("--model", root / "model.keras", "--plan", root / "plan.json")
    assert run(*args, inputs, "--output", tmp_path / "out") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "case_a_provenance.json", "case_a_seg.nii.gz"
    ]
    expected, _ = predict_case(
        model, images["case_a"], SPACING, plan.preprocess, plan.patch_size, 3, stride=2
    )
    seg = np.asarray(nib.load(tmp_path / "out" / "case_a_seg.nii.gz").dataobj)
    np.testing.assert_array_equal(seg, expected)
    capsys.readouterr()
    # a folder of outputs given as input (alone, or as files): nothing to predict in it
    assert run(*args, tmp_path / "out", "--output", tmp_path / "again") == 0
    out = capsys.readouterr().out
    assert "skipped 1 output(s) of medseg predict" in out and "wrote 0 file(s)" in out
    assert run(*args, tmp_path / "out" / "case_a_seg.nii.gz", "--output", tmp_path / "again") == 0
    assert "skipped, an output of medseg predict" in capsys.readouterr().out
    assert not (tmp_path / "again").exists() or not any((tmp_path / "again").iterdir())
    # a user's own image that merely ends in _seg (no record beside it) is a case
    (inputs / "liver_seg.nii.gz").write_bytes((root / "cases" / "case_b.nii.gz").read_bytes())
    assert run(*args, inputs, "--output", tmp_path / "out") == 0
    assert (tmp_path / "out" / "liver_seg_seg.nii.gz").is_file()


def test_output_folder_equal_to_an_input_folder_is_refused(saved, tmp_path, capsys):
    root, *_ = saved
    inputs = _cases_copy(root, tmp_path / "in", "case_a")
    before = sorted(p.name for p in inputs.iterdir())
    args = ("--model", root / "model.keras", "--plan", root / "plan.json", inputs)
    err = _error(capsys, *args, "--output", inputs)
    assert f"output folder {inputs} (--output) is the input folder {inputs}" in err
    assert "write them to another folder" in err
    # the same folder by another spelling
    err = _error(capsys, *args, "--output", tmp_path / "in" / ".." / "in")
    assert "is the input folder" in err
    assert sorted(p.name for p in inputs.iterdir()) == before
    # a folder inside the input folder is fine: folders are not searched recursively
    assert run(*args, "--output", inputs / "predicted") == 0
    assert run(*args, "--output", inputs / "predicted") == 0
    assert sorted(p.name for p in (inputs / "predicted").iterdir()) == [
        "case_a_provenance.json", "case_a_seg.nii.gz"
    ]


def test_rerun_skips_same_model_and_replaces_another_models_outputs(saved, tmp_path, capsys):
    import hashlib

    root, model, plan, images = saved
    keras.utils.set_random_seed(1)
    other = build_unet(3, 1, depth=2, filters=4, normalization="instance")
    other.save(tmp_path / "other.keras")
    source = root / "cases" / "case_b.nii.gz"
    out = tmp_path / "out"
    seg, record_path = out / "case_b_seg.nii.gz", out / "case_b_provenance.json"

    def predict(model_file, *options):
        capsys.readouterr()
        assert run("--model", model_file, "--plan", root / "plan.json", source, "--output", out,
                   *options) == 0
        return capsys.readouterr().out, json.loads(record_path.read_text())

    _, record = predict(root / "model.keras")
    digest = hashlib.sha256((root / "model.keras").read_bytes()).hexdigest()
    assert record["key"]["models"][0]["model"] == str((root / "model.keras").resolve())
    assert record["key"]["models"][0]["sha256"] == digest
    assert record["key"]["options"]["overlap"] == 0.5
    assert record["key"]["plan_sha256"] and record["outputs"] == ["case_b_seg.nii.gz"]
    os.utime(seg, ns=(1, 1))
    log, _ = predict(root / "model.keras")
    assert "same model and options: skipped" in log and seg.stat().st_mtime_ns == 1
    # another option: predicted again, and the log says what changed
    log, record = predict(root / "model.keras", "--overlap", "0.25")
    assert "was made otherwise (overlap 0.5 -> 0.25)" in log and "replacing it" in log
    assert seg.stat().st_mtime_ns > 1 and record["key"]["options"]["overlap"] == 0.25
    # another model: predicted again with it, and the record names it
    os.utime(seg, ns=(1, 1))
    log, record = predict(tmp_path / "other.keras", "--overlap", "0.25")
    before, after = (root / "model.keras").resolve(), (tmp_path / "other.keras").resolve()
    assert f"model {before} -> {after}" in log
    assert seg.stat().st_mtime_ns > 1
    assert record["key"]["models"][0]["model"] == str((tmp_path / "other.keras").resolve())
    assert record["key"]["models"][0]["sha256"] == hashlib.sha256(
        (tmp_path / "other.keras").read_bytes()
    ).hexdigest()
    expected, _ = predict_case(other, images["case_b"], SPACING, plan.preprocess,
                               plan.patch_size, 3, 0.25, stride=2)
    np.testing.assert_array_equal(np.asarray(nib.load(seg).dataobj), expected)
    # outputs without a record (an older medseg, or a run killed before the record) are redone
    record_path.unlink()
    os.utime(seg, ns=(1, 1))
    log, _ = predict(tmp_path / "other.keras", "--overlap", "0.25")
    assert "has no provenance record" in log and seg.stat().st_mtime_ns > 1


def test_keep_going_predicts_the_others_and_fails_naming_the_broken_file(saved, tmp_path, capsys):
    root, *_ = saved
    inputs = _cases_copy(root, tmp_path / "in", "case_a", "case_b")
    broken = inputs / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    args = ("--model", root / "model.keras", "--plan", root / "plan.json", inputs)
    # without --keep-going the first failure (broken sorts first) stops the run
    err = _error(capsys, *args, "--output", tmp_path / "stop")
    assert str(broken) in err and not list((tmp_path / "stop").glob("*.nii.gz"))
    assert run(*args, "--output", tmp_path / "out", "--keep-going") == 2
    captured = capsys.readouterr()
    assert "1 of 3 case(s) failed (2 file(s) written" in captured.err
    failed = [line for line in captured.err.splitlines() if line.startswith("  broken: ")]
    assert len(failed) == 1 and "MedsegIOError" in failed[0] and str(broken) in failed[0]
    assert "wrote 2 file(s)" in captured.out
    assert sorted(p.name for p in (tmp_path / "out").glob("*_seg.nii.gz")) == [
        "case_a_seg.nii.gz", "case_b_seg.nii.gz"
    ]
    assert not (tmp_path / "out" / "broken_provenance.json").exists()


def test_absurd_resampling_is_refused_naming_the_file(saved, tmp_path, capsys):
    """The grid a plan resamples a file to is checked before it is allocated. (Spacings
    out of a sane range are refused earlier, when the file is read; these are not.)"""
    root, _, plan, _ = saved
    source = root / "cases" / "case_a.nii.gz"  # (10, 30, 28) at 2.5 x 0.8 x 0.8 mm

    def plan_file(name, target):
        path = tmp_path / name
        dataclasses.replace(
            plan, preprocess=dataclasses.replace(plan.preprocess, target_spacing=target)
        ).save(path)
        return path

    fine = plan_file("fine.json", (0.1, 1.5, 1.5))
    err = _error(capsys, "--model", root / "model.keras", "--plan", fine, source,
                 "--output", tmp_path / "out", "--max-voxels", "10000")
    # 10 * 2.5 / 0.1 = 250, 30 * 0.8 / 1.5 = 16, 28 * 0.8 / 1.5 = 14.9 -> 15
    assert f"{source}: resampling from shape (10, 30, 28) at spacing (2.5, 0.8, 0.8) mm" in err
    assert "to the target spacing (0.1, 1.5, 1.5) mm gives shape (250, 16, 15) = 60,000 " in err
    assert "above the bound of 10,000 (max_voxels)" in err
    coarse = plan_file("coarse.json", (100.0, 1.5, 1.5))  # 10 * 2.5 / 100 = 0.25 -> none
    err = _error(capsys, "--model", root / "model.keras", "--plan", coarse, source,
                 "--output", tmp_path / "out")
    assert f"{source}: resampling from shape (10, 30, 28)" in err
    assert "would collapse axis 0 (10 voxels) to less than one voxel (shape (0, 16, 15))" in err
    err = _error(capsys, "--model", root / "model.keras", "--plan", fine, source,
                 "--output", tmp_path / "out", "--max-voxels", "0")
    assert "max_voxels=0 (--max-voxels) must be at least 1" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_overlap_from_095_is_refused_with_the_window_count(saved, tmp_path, capsys):
    root, *_ = saved
    err = _error(capsys, "--model", root / "model.keras", "--plan", root / "plan.json",
                 root / "cases", "--output", tmp_path, "--overlap", "0.99")
    # refused as the config key, before any model loads (the window count it would need is
    # in the sliding window's own message: tests/test_sliding_window.py)
    assert "config key 'inference.overlap': 0.99 is not in [0, 0.95)" in err
    assert not any(tmp_path.iterdir())
