"""Calibration: ECE against a direct numpy computation, on calibrated and over-confident
synthetic probabilities, case-by-case accumulation, temperature scaling, the diagram."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from medseg.evaluation.calibration import (
    CalibrationAccumulator,
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    plot_reliability_diagram,
    read_temperature,
    reliability_curve,
    write_temperature,
)


def draw(rng, n, k=3, sharpen=1.0):
    """Labels drawn from Dirichlet probabilities (calibrated by construction), and those
    probabilities raised to ``sharpen`` and renormalised (over-confident for > 1)."""
    probs = rng.dirichlet(np.full(k, 0.7), size=n)
    u = rng.random(n)
    labels = (u[:, None] > np.cumsum(probs, axis=1)).sum(axis=1)
    labels = np.minimum(labels, k - 1)
    shown = probs**sharpen
    return shown / shown.sum(axis=1, keepdims=True), labels


def reference_ece(confidence, correct, n_bins):
    """ECE written out bin by bin, with explicit interval tests."""
    total, n = 0.0, len(confidence)
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = (confidence >= lo) & ((confidence < hi) if b < n_bins - 1 else (confidence <= hi))
        if inside.any():
            total += inside.sum() / n * abs(correct[inside].mean() - confidence[inside].mean())
    return total


def test_ece_of_calibrated_probabilities_is_near_zero():
    probs, labels = draw(np.random.default_rng(0), 200_000)
    per_class, top = expected_calibration_error(probs, labels)
    assert per_class.shape == (3,)
    assert np.all(per_class < 0.01) and top < 0.01


def test_ece_of_overconfident_probabilities_is_large():
    probs, labels = draw(np.random.default_rng(1), 50_000, sharpen=4.0)
    per_class, top = expected_calibration_error(probs, labels)
    assert top > 0.1
    assert np.all(per_class > 0.05)


def test_ece_matches_numpy_reference():
    rng = np.random.default_rng(2)
    probs, labels = draw(rng, 5_000, k=4, sharpen=2.0)
    probs[:7, :] = np.eye(4)[rng.integers(0, 4, 7)]  # confidences of exactly 0 and 1
    per_class, top = expected_calibration_error(probs, labels, n_bins=10)
    for c in range(4):
        assert per_class[c] == pytest.approx(
            reference_ece(probs[:, c], (labels == c).astype(float), 10), abs=1e-12)
    top_conf, top_pred = probs.max(axis=1), probs.argmax(axis=1)
    assert top == pytest.approx(reference_ece(top_conf, (top_pred == labels).astype(float), 10),
                                abs=1e-12)


def test_reliability_curve_matches_numpy():
    probs, labels = draw(np.random.default_rng(3), 3_000, sharpen=3.0)
    confidence, accuracy, counts = reliability_curve(probs, labels, n_bins=5, structure=1)
    bins = np.minimum((probs[:, 1] * 5).astype(int), 4)
    assert counts.tolist() == np.bincount(bins, minlength=5).tolist()
    for b in range(5):
        if counts[b]:
            assert confidence[b] == pytest.approx(probs[bins == b, 1].mean())
            assert accuracy[b] == pytest.approx((labels[bins == b] == 1).mean())
        else:
            assert np.isnan(confidence[b]) and np.isnan(accuracy[b])


def test_accumulator_over_cases_equals_all_at_once():
    rng = np.random.default_rng(4)
    probs, labels = draw(rng, 4 * 6 * 5 * 7, sharpen=2.5)
    volume_p, volume_l = probs.reshape(4, 6, 5, 7, 3), labels.reshape(4, 6, 5, 7)
    acc = CalibrationAccumulator(3, n_bins=12)
    for case in range(4):  # four "cases" of (6, 5, 7) voxels
        acc.update(volume_p[case], volume_l[case])
    whole, whole_top = expected_calibration_error(probs, labels, n_bins=12)
    per_class, top = acc.ece()
    np.testing.assert_allclose(per_class, whole, rtol=1e-12)
    assert top == pytest.approx(whole_top, rel=1e-12)
    assert acc.total == len(labels)
    back = CalibrationAccumulator.from_dict(acc.to_dict())  # as logged in calibration.json
    np.testing.assert_allclose(back.ece()[0], whole, rtol=1e-12)
    halves = CalibrationAccumulator(3, 12).update(probs[:100], labels[:100])
    halves.merge(CalibrationAccumulator(3, 12).update(probs[100:], labels[100:]))
    np.testing.assert_allclose(halves.ece()[0], whole, rtol=1e-12)


def test_temperature_scaling_lowers_held_out_ece():
    rng = np.random.default_rng(5)
    fit_p, fit_l = draw(rng, 20_000, sharpen=3.0)
    test_p, test_l = draw(rng, 20_000, sharpen=3.0)
    t = fit_temperature(fit_p, fit_l)
    assert t == pytest.approx(3.0, rel=0.15)  # p**3 is undone by T = 3 on log p
    before = expected_calibration_error(test_p, test_l)[1]
    scaled = apply_temperature(test_p, t)
    after = expected_calibration_error(scaled, test_l)[1]
    assert after < before / 3 and after < 0.02
    np.testing.assert_array_equal(scaled.argmax(-1), test_p.argmax(-1))
    np.testing.assert_allclose(scaled.sum(-1), 1.0, rtol=1e-5)


def test_temperature_on_logits_recovers_scale():
    rng = np.random.default_rng(6)
    logits = rng.normal(0, 2, size=(20_000, 3))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = (rng.random(20_000)[:, None] > np.cumsum(p, 1)).sum(1).clip(0, 2)
    t = fit_temperature(logits * 2.0, labels, probabilities=False)  # logits twice too big
    assert t == pytest.approx(2.0, rel=0.1)
    np.testing.assert_allclose(apply_temperature(logits * 2.0, t, probabilities=False),
                               np.exp(logits / (t / 2)) / np.exp(logits / (t / 2)).sum(1, keepdims=True),
                               rtol=1e-5)


def test_temperature_file_round_trip(tmp_path):
    path = write_temperature(tmp_path / "temperature.json", 1.7, fitted_on_voxels=10)
    assert read_temperature(path) == pytest.approx(1.7)
    (tmp_path / "bad.json").write_text('{"T": 2}')
    with pytest.raises(ValueError, match="not a temperature file"):
        read_temperature(tmp_path / "bad.json")


def test_reliability_diagram_is_readable_png(tmp_path):
    probs, labels = draw(np.random.default_rng(7), 2_000, sharpen=2.0)
    acc = CalibrationAccumulator(3).update(probs, labels)
    path = plot_reliability_diagram(acc, tmp_path / "plots" / "reliability.png",
                                    ["background", "kidney", "tumor"])
    image = iio.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # something was drawn
    assert [p.name for p in path.parent.iterdir()] == ["reliability.png"]  # no temporary left


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda: expected_calibration_error(np.full((4, 3), 1 / 3), np.zeros(5, int)),
         "do not match"),
        (lambda: expected_calibration_error(np.full((4, 3), 1.5), np.zeros(4, int)),
         "give probabilities in [0, 1]"),
        (lambda: expected_calibration_error(np.full((4, 3), 1 / 3), np.full(4, 3)),
         "labels must be in 0 .. 2"),
        (lambda: expected_calibration_error(np.full((4, 3), 1 / 3), np.zeros(4, int), n_bins=0),
         "n_bins=0"),
        (lambda: expected_calibration_error(np.full((4, 3), 1 / 3), np.zeros(4)),
         "integer class labels"),
        (lambda: CalibrationAccumulator(2).update(np.full((4, 3), 1 / 3), np.zeros(4, int)),
         "probs has 3 classes but the accumulator 2"),
        (lambda: fit_temperature(np.full((4, 3), 1 / 3), np.zeros(4, int), bounds=(0, 2)),
         "give 0 < low < high"),
        (lambda: apply_temperature(np.full((4, 3), 1 / 3), -1.0), "give a finite T > 0"),
    ],
)
def test_bad_inputs_name_the_fault(call, fragment):
    with pytest.raises(ValueError) as info:
        call()
    assert fragment in str(info.value)


# -- in a run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated_run(tiny_config, tmp_path_factory):
    from medseg.tracking import run_training

    store = tmp_path_factory.mktemp("mlruns")
    config = tiny_config(**{
        "tracking.tracking_uri": f"sqlite:///{store}/mlflow.db",
        "tracking.artifact_root": str(store),
        "tracking.experiment": "calibration",
        "evaluation.calibration_bins": 10,
    })
    result, run_id = run_training(config)
    return config, result, run_id


@pytest.mark.slow
def test_run_logs_exact_validation_ece_diagram_and_temperature(calibrated_run):
    import json

    import mlflow
    from mlflow.tracking import MlflowClient

    from medseg.inference import predict_case
    from medseg.pipeline import read_cases
    from medseg.workflows.experiment import prediction_plan

    config, result, run_id = calibrated_run
    setup = result.data
    # the ECE of every validation voxel at once, predicted again from the trained model
    plan = prediction_plan(config, setup)
    probs, labels = [], []
    for ex in read_cases(setup.builder, config.data.split, setup.val_ids).as_numpy_iterator():
        _, p = predict_case(result.model, ex["image"], ex["spacing"], setup.plan,
                            config.patch.patch_size, len(setup.class_names),
                            slab=plan.slab, **_window(config, plan))
        probs.append(p.reshape(-1, p.shape[-1]))
        labels.append(ex["label"].reshape(-1))
    per_class, top = expected_calibration_error(np.concatenate(probs), np.concatenate(labels),
                                                n_bins=10)
    run = MlflowClient(config.tracking.tracking_uri).get_run(run_id)
    for c, name in enumerate(setup.class_names[1:], start=1):
        assert run.data.metrics[f"val_ece_{name}"] == pytest.approx(per_class[c], rel=1e-4,
                                                                     abs=1e-7)
    assert run.data.metrics["val_ece_top_label"] == pytest.approx(top, rel=1e-4, abs=1e-7)
    mlflow.set_tracking_uri(config.tracking.tracking_uri)
    png = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="plots/reliability.png")
    assert iio.imread(png).ndim == 3
    record = json.loads(open(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="evaluation/calibration.json")).read())
    assert record["voxels"] == sum(len(x) for x in labels)
    t = read_temperature(mlflow.artifacts.download_artifacts(run_id=run_id,
                                                             artifact_path="temperature.json"))
    assert t == pytest.approx(run.data.metrics["val_temperature"]) and 0.05 <= t <= 20


def _window(config, plan):
    """predict_case's window settings as evaluate_cases configures them."""
    from medseg.inference import SlidingWindow

    return {"window": SlidingWindow.from_plan(plan, config.inference)}


@pytest.mark.slow
def test_calibration_off_logs_none(tiny_config, tmp_path):
    from mlflow.tracking import MlflowClient

    from medseg.tracking import run_training

    config = tiny_config(**{
        "tracking.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
        "tracking.artifact_root": str(tmp_path),
        "tracking.log_model": False,
        "train.epochs": 1,
        "evaluation.calibration": False,
    })
    _, run_id = run_training(config)
    client = MlflowClient(config.tracking.tracking_uri)
    assert not [k for k in client.get_run(run_id).data.metrics if k.startswith("val_ece")]
    assert "plots/reliability.png" not in {a.path for a in client.list_artifacts(run_id, "plots")}


def test_bad_calibration_bins_named_before_prediction(tiny_config):
    from medseg.workflows.experiment import evaluate_cases

    config = tiny_config(**{"evaluation.calibration_bins": 0})
    with pytest.raises(ValueError, match="evaluation.calibration_bins"):
        evaluate_cases(None, config, _Setup(), ["case_00000"])


class _Setup:
    """Just what evaluate_cases reads before its first case: the refusal comes first."""

    class_names = ["background", "kidney", "tumor"]


@pytest.mark.slow
def test_predict_calibrates_probabilities_with_the_runs_temperature(calibrated_run, tmp_path):
    import mlflow
    import nibabel as nib

    from medseg.cli import main
    from medseg.pipeline import read_cases

    config, result, run_id = calibrated_run
    setup = result.data
    ex = next(read_cases(setup.builder, config.data.split, setup.val_ids[:1]).as_numpy_iterator())
    case = tmp_path / "case.nii.gz"
    # medseg's (D, H, W) is NIfTI's (k, j, i) reversed: write it the way the readers expect
    nib.save(nib.Nifti1Image(np.ascontiguousarray(ex["image"].transpose(2, 1, 0)),
                             np.diag([*ex["spacing"][::-1], 1.0])), case)
    mlflow.set_tracking_uri(config.tracking.tracking_uri)
    folder = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model",
                                                      dst_path=str(tmp_path / "m")))
    keras_file = next(folder.rglob("*.keras"))
    plan = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="plan.json",
                                               dst_path=str(tmp_path))
    uri = config.tracking.tracking_uri
    assert main(["predict", str(case), "--model", f"runs:/{run_id}/model", "--probabilities",
                 "--output", str(tmp_path / "calibrated"), "--tracking-uri", uri]) == 0
    assert main(["predict", str(case), "--model", str(keras_file), "--plan", plan,
                 "--probabilities", "--output", str(tmp_path / "raw")]) == 0
    t = read_temperature(mlflow.artifacts.download_artifacts(run_id=run_id,
                                                             artifact_path="temperature.json"))
    raw = np.asarray(nib.load(tmp_path / "raw/case_prob.nii.gz").dataobj)
    calibrated = np.asarray(nib.load(tmp_path / "calibrated/case_prob.nii.gz").dataobj)
    np.testing.assert_allclose(calibrated, apply_temperature(raw, t), rtol=1e-4, atol=1e-5)
    # the labels, an argmax, are the same
    np.testing.assert_array_equal(
        np.asarray(nib.load(tmp_path / "calibrated/case_seg.nii.gz").dataobj),
        np.asarray(nib.load(tmp_path / "raw/case_seg.nii.gz").dataobj))
