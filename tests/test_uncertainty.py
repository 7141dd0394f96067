"""Voxel-wise uncertainty of predictions: TTA flips, ensemble members, Monte-Carlo dropout."""

from __future__ import annotations

import json

import imageio.v3 as iio
import keras
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage, stats

from medseg.cli import main
from medseg.evaluation.visuals import uncertainty_frames
from medseg.inference import PredictionPlan, SlidingWindow, predict_files
from medseg.inference.uncertainty import (
    SampleStatistics,
    class_variance,
    dropout_model,
    mutual_information,
    predictive_entropy,
    sample_sets,
    uncertainty_summary,
)
from medseg.io import kits19_affine
from medseg.pipeline import PreprocessPlan

SPACING = (2.5, 0.8, 0.8)
CLASSES = ("background", "lesion")


def identity_plan(patch=(8, 8, 8)) -> PredictionPlan:
    """No resampling, no clipping, z-score with mean 0 and std 1: the model sees the image."""
    return PredictionPlan(
        PreprocessPlan(target_spacing=None, clip=None, mean=0.0, std=1.0), CLASSES, patch, 1
    )


def voxel_model(scale, bias=(3.0, -3.0)) -> keras.Model:
    """Per-voxel logits ``x * scale + bias``, softmaxed: constant where x is constant."""
    inputs = keras.Input((None, None, None, 1))
    dense = keras.layers.Dense(2)
    outputs = keras.layers.Softmax()(dense(inputs))
    model = keras.Model(inputs, outputs)
    dense.set_weights([np.asarray([scale], np.float32), np.asarray(bias, np.float32)])
    return model


def write_case(path, image):
    nib.save(nib.Nifti1Image(np.asarray(image, np.float32), kits19_affine(SPACING)), path)
    return path


def softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_entropy_mutual_information_and_variance_match_scipy_and_numpy():
    rng = np.random.default_rng(0)
    samples = rng.dirichlet([0.5, 1.0, 2.0], size=(4, 5, 6)).astype(np.float32)  # S=4
    mean = samples.mean(0)
    np.testing.assert_allclose(predictive_entropy(mean), stats.entropy(mean, axis=-1), rtol=1e-5)
    expected_mi = stats.entropy(mean, axis=-1) - stats.entropy(samples, axis=-1).mean(0)
    np.testing.assert_allclose(mutual_information(samples), expected_mi, atol=1e-5)
    np.testing.assert_allclose(class_variance(samples), samples.var(0).mean(-1), atol=1e-6)
    # a probability of 0 contributes 0 (not NaN), and a one-hot voxel has no entropy
    assert predictive_entropy(np.asarray([[1.0, 0.0, 0.0]]))[0] == 0.0
    # streamed one sample at a time: the same numbers
    acc = SampleStatistics()
    for sample in samples:
        acc.add(sample)
    np.testing.assert_allclose(acc.entropy(), stats.entropy(mean, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(acc.mutual_information(), expected_mi, atol=1e-5)
    np.testing.assert_allclose(acc.variance(), samples.var(0).mean(-1), atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 samples"):
        mutual_information(samples[:1])


def test_summary_entropy_inside_and_on_the_boundary_and_expected_dice():
    seg = np.zeros((8, 8, 8), np.uint8)
    seg[2:6, 2:6, 2:6] = 1
    entropy = np.random.default_rng(1).random(seg.shape).astype(np.float32)
    shifted = np.roll(seg, 1, axis=0)  # overlaps the cube in 48 of 64 voxels
    summary = uncertainty_summary(seg, entropy, [seg, shifted, np.zeros_like(seg)], CLASSES)
    lesion = summary["structures"]["lesion"]
    mask = seg == 1
    shell = mask & ~ndimage.binary_erosion(mask)
    assert lesion["voxels"] == 64 and lesion["boundary_voxels"] == 64 - 8 == shell.sum()
    assert lesion["mean_entropy"] == pytest.approx(entropy[mask].mean(), rel=1e-6)
    assert lesion["boundary_mean_entropy"] == pytest.approx(entropy[shell].mean(), rel=1e-6)
    assert lesion["dice_per_sample"] == pytest.approx([1.0, 2 * 48 / 128, 0.0])
    assert lesion["expected_dice"] == pytest.approx((1.0 + 0.75 + 0.0) / 3)
    assert summary["units"].startswith("nats")
    with pytest.raises(ValueError, match="sample 0 has shape"):
        uncertainty_summary(seg, entropy, [seg[:4]], CLASSES)


def test_ensemble_disagreement_raises_entropy_and_maps_are_on_the_source_grid(tmp_path):
    image = np.zeros((6, 10, 12), np.float32)
    image[1:4, 2:7, 3:9] = 1.0  # the region where the members disagree
    source = write_case(tmp_path / "case.nii.gz", image)
    sure = voxel_model([-7.0, 7.0])  # bright: logits (-4, 4), lesion
    doubtful = voxel_model([-2.0, 2.0])  # bright: logits (1, -1), background
    sure.save(tmp_path / "a.keras")
    doubtful.save(tmp_path / "b.keras")
    identity_plan().save(tmp_path / "plan.json")
    assert main(["predict", str(source), "--model", str(tmp_path / "a.keras"),
                 "--model", str(tmp_path / "b.keras"), "--plan", str(tmp_path / "plan.json"),
                 "--output", str(tmp_path / "out"), "--uncertainty", "ensemble"]) == 0
    out = tmp_path / "out"
    src = nib.load(source)
    maps = {}
    for name in ("entropy", "mutual_info"):
        img = nib.load(out / f"case_{name}.nii.gz")
        assert img.shape == src.shape and img.get_data_dtype() == np.float32
        np.testing.assert_allclose(img.affine, src.affine)
        maps[name] = np.asarray(img.dataobj)
    bright = image > 0
    assert maps["entropy"][bright].min() > 10 * maps["entropy"][~bright].max()
    assert maps["mutual_info"][bright].min() > 10 * maps["mutual_info"][~bright].max()
    # the numbers, from the members' logits by numpy
    x = image[..., None]
    pa = softmax(x * [-7.0, 7.0] + [3.0, -3.0])
    pb = softmax(x * [-2.0, 2.0] + [3.0, -3.0])
    np.testing.assert_allclose(maps["entropy"], stats.entropy((pa + pb) / 2, axis=-1), atol=1e-5)
    expected_mi = stats.entropy((pa + pb) / 2, axis=-1) - (
        stats.entropy(pa, axis=-1) + stats.entropy(pb, axis=-1)
    ) / 2
    np.testing.assert_allclose(maps["mutual_info"], expected_mi, atol=1e-5)
    seg = np.asarray(nib.load(out / "case_seg.nii.gz").dataobj)
    np.testing.assert_array_equal(seg, bright)  # the mean's argmax: 0.56 lesion there
    summary = json.loads((out / "case_uncertainty.json").read_text())
    lesion = summary["structures"]["lesion"]
    assert summary["method"] == "ensemble" and summary["samples"] == 2
    assert lesion["dice_per_sample"] == pytest.approx([1.0, 0.0])  # b never says lesion
    assert lesion["mean_entropy"] == pytest.approx(maps["entropy"][bright].mean(), rel=1e-5)
    frames = iio.imread(out / "case_uncertainty.gif", index=None)
    assert frames.ndim == 4 and frames.shape[-1] in (3, 4)
    record = json.loads((out / "case_provenance.json").read_text())
    assert "case_uncertainty.json" in record["outputs"]
    assert record["key"]["options"]["uncertainty"] == {"method": "ensemble", "samples": 2}


def test_tta_with_one_flip_reproduces_the_entropy_of_the_two_maps(tmp_path):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((None, None, None, 1))
    logits = keras.layers.Conv3D(2, (1, 1, 3), padding="same")(inputs)  # not flip-symmetric
    model = keras.Model(inputs, keras.layers.Softmax()(logits))
    image = np.random.default_rng(2).normal(size=(8, 8, 8)).astype(np.float32)
    source = write_case(tmp_path / "case.nii.gz", image)
    plan = identity_plan()
    window = SlidingWindow((8, 8, 8), mirror_axes=(2,), stride=1)
    predict_files(model, plan, [source], tmp_path / "out", window=window, log=None,
                  uncertainty="tta")
    x = image[None, ..., None]
    p0 = np.asarray(model(x))[0]
    p1 = np.flip(np.asarray(model(np.flip(x, 3).copy()))[0], 2)
    assert np.abs(p0 - p1).max() > 1e-3  # the flip does change the prediction
    mean = (p0 + p1) / 2
    expected = -(mean * np.log(mean)).sum(-1)
    entropy = np.asarray(nib.load(tmp_path / "out" / "case_entropy.nii.gz").dataobj)
    np.testing.assert_allclose(entropy, expected, atol=1e-5)
    mi = np.asarray(nib.load(tmp_path / "out" / "case_mutual_info.nii.gz").dataobj)
    np.testing.assert_allclose(
        mi, expected + ((p0 * np.log(p0)).sum(-1) + (p1 * np.log(p1)).sum(-1)) / 2, atol=1e-5
    )


def test_tta_without_mirroring_and_an_ensemble_of_one_are_refused(tmp_path):
    model = voxel_model([1.0, -1.0])
    with pytest.raises(ValueError, match="add --mirror"):
        sample_sets([model], SlidingWindow((8, 8, 8)), "tta")
    with pytest.raises(ValueError, match="needs at least 2 models, got 1"):
        sample_sets([model], SlidingWindow((8, 8, 8)), "ensemble")
    with pytest.raises(ValueError, match="is not one of 'tta', 'ensemble', 'mc-dropout'"):
        sample_sets([model], SlidingWindow((8, 8, 8)), "bayes")


def test_mc_dropout_of_a_model_without_dropout_names_the_model_and_the_config_key(tmp_path):
    source = write_case(tmp_path / "case.nii.gz", np.zeros((8, 8, 8)))
    with pytest.raises(ValueError, match=r"has no Dropout layer.*model\.dropout"):
        predict_files(voxel_model([1.0, -1.0]), identity_plan(), [source], tmp_path / "out",
                      log=None, uncertainty="mc-dropout", sources=[{"model": "plain.keras"}])
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(ValueError, match="model plain.keras has no Dropout layer"):
        sample_sets([voxel_model([1.0, -1.0])], SlidingWindow((8, 8, 8)), "mc-dropout",
                    names=["plain.keras"])
    with pytest.raises(ValueError, match="uncertainty_samples .* at least 2"):
        sample_sets([dropout_net()], SlidingWindow((8, 8, 8)), "mc-dropout", samples=1)


def dropout_net(rate=0.5) -> keras.Model:
    keras.utils.set_random_seed(5)
    inputs = keras.Input((None, None, None, 1))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    hidden = keras.layers.Dropout(rate)(hidden)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(hidden))


def test_mc_dropout_drops_only_dropout_and_keeps_batch_norm_statistics():
    inputs = keras.Input((3,))
    norm = keras.layers.BatchNormalization()
    dense = keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")
    model = keras.Model(inputs, dense(keras.layers.Dropout(0.5)(norm(inputs))))
    norm.set_weights([np.ones(3), np.zeros(3), np.full(3, 5.0), np.full(3, 4.0)])
    x = np.tile(np.asarray([[1.0, 2.0, 3.0]], np.float32), (4000, 1))
    deterministic = np.asarray(model(x, training=False))
    stochastic = np.asarray(dropout_model(model, seed=0)(x, training=False))
    assert len(np.unique(stochastic.round(5))) > 2  # masks differ from row to row
    # inverted dropout is unbiased: the mean is the inference output with the moving
    # statistics (batch statistics would give 0 here: every row is the same)
    assert stochastic.mean() == pytest.approx(deterministic[0, 0], rel=0.05)
    assert abs(deterministic[0, 0]) > 1


def test_mc_dropout_samples_differ_and_a_seed_repeats_them(tmp_path):
    rng = np.random.default_rng(4)
    image = rng.normal(size=(8, 8, 8)).astype(np.float32)
    folder = tmp_path / "cases"
    folder.mkdir()
    write_case(folder / "a.nii.gz", image)
    write_case(folder / "b.nii.gz", image)  # the same image: the same masks under a seed
    model = dropout_net()

    def run(out, seed):
        predict_files(model, identity_plan(), [folder], tmp_path / out, log=None,
                      uncertainty="mc-dropout", uncertainty_samples=3, seed=seed)
        return {
            case: np.asarray(nib.load(tmp_path / out / f"{case}_mutual_info.nii.gz").dataobj)
            for case in ("a", "b")
        }

    first, again, other = run("one", 7), run("two", 7), run("three", 8)
    assert first["a"].max() > 1e-3  # the passes disagree
    np.testing.assert_array_equal(first["a"], again["a"])
    np.testing.assert_array_equal(first["a"], first["b"])
    assert np.abs(first["a"] - other["a"]).max() > 1e-4
    summary = json.loads((tmp_path / "one" / "a_uncertainty.json").read_text())
    assert summary["method"] == "mc-dropout" and summary["samples"] == 3


def test_uncertainty_frames_show_the_entropy_as_heat():
    image = np.random.default_rng(0).random((4, 6, 8)).astype(np.float32)
    seg = np.zeros(image.shape, np.uint8)
    seg[1:3, 2:4, 2:5] = 1
    entropy = np.zeros(image.shape, np.float32)
    entropy[:, 0, 0] = np.log(2)
    frames = uncertainty_frames(image, seg, entropy, vmax=np.log(2), margin=None, gap=2)
    assert frames.dtype == np.uint8 and frames.shape == (4, 6, 3 * 8 + 2 * 2, 3)
    heat = frames[:, :, 2 * (8 + 2):]
    assert heat[:, 0, 0].astype(int).sum() > 3 * heat[:, 3, 3].astype(int).sum()
    with pytest.raises(ValueError, match="entropy shape"):
        uncertainty_frames(image, seg, entropy[:2])


def test_a_rerun_skips_finished_cases_and_a_run_without_uncertainty_removes_the_maps(tmp_path):
    folder = tmp_path / "cases"
    folder.mkdir()
    write_case(folder / "case.nii.gz", np.zeros((8, 8, 8)))
    models = [voxel_model([-7.0, 7.0]), voxel_model([-2.0, 2.0])]
    out = tmp_path / "out"
    lines = []
    first = predict_files(models, identity_plan(), [folder], out, log=lines.append,
                          uncertainty="ensemble")
    assert sorted(p.name for p in first) == [
        "case_entropy.nii.gz", "case_mutual_info.nii.gz", "case_seg.nii.gz"
    ]
    assert predict_files(models, identity_plan(), [folder], out, log=lines.append,
                         uncertainty="ensemble") == []
    assert "skipped" in lines[-1]
    # the output folder given as input: its maps are outputs, not cases
    assert predict_files(models, identity_plan(), [out], tmp_path / "again", log=None) == []
    predict_files(models, identity_plan(), [folder], out, log=None)
    assert sorted(p.name for p in out.iterdir()) == ["case_provenance.json", "case_seg.nii.gz"]


@pytest.mark.slow
def test_validation_with_tta_logs_entropy_expected_dice_and_its_overlay(tiny_config, tmp_path):
    """inference.uncertainty for validation: per-case scores equal numpy's from the TTA
    samples, their means are run metrics, and the uncertainty GIF is an artifact."""
    import imageio.v3 as iio
    import mlflow
    from mlflow.tracking import MlflowClient

    from medseg.inference import SlidingWindow
    from medseg.inference.predictor import predict_case_samples
    from medseg.inference.uncertainty import sample_sets
    from medseg.pipeline import read_cases
    from medseg.tracking import run_training
    from medseg.workflows.experiment import prediction_plan

    config = tiny_config(**{
        "tracking.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
        "tracking.artifact_root": str(tmp_path),
        "tracking.log_model": False,
        "train.epochs": 1,
        "evaluation.calibration": False,
        "inference.mirror_axes": (2,),
        "inference.uncertainty": "tta",
    })
    result, run_id = run_training(config)
    setup = result.data
    plan = prediction_plan(config, setup)
    window = SlidingWindow.from_plan(plan, config.inference)
    sets, _ = sample_sets([result.model], window, "tta")
    assert len(sets) == 2  # no flip and the flip along axis 2
    by_case = {c.case_id: c.scores for c in result.cases}
    for ex in read_cases(setup.builder, config.data.split, setup.val_ids).as_numpy_iterator():
        samples = list(predict_case_samples(sets, ex["image"], ex["spacing"], setup.plan,
                                            len(setup.class_names), slab=plan.slab))
        mean = np.mean(samples, axis=0)
        entropy = -np.sum(mean * np.log(np.clip(mean, 1e-12, None)), axis=-1)
        consensus = np.argmax(mean, axis=-1)
        scores = by_case[ex["case_id"].decode()]
        for label, name in enumerate(setup.class_names[1:], start=1):
            mask = consensus == label
            expected = entropy[mask].mean() if mask.any() else np.nan
            np.testing.assert_allclose(scores[f"entropy_{name}"], expected, rtol=1e-4,
                                       atol=1e-6)
            dice = []
            for s in samples:
                a = np.argmax(s, axis=-1) == label
                total = a.sum() + mask.sum()
                dice.append(1.0 if total == 0 else 2 * (a & mask).sum() / total)
            assert scores[f"expected_dice_{name}"] == pytest.approx(np.mean(dice), abs=1e-6)
    run = MlflowClient(config.tracking.tracking_uri).get_run(run_id)
    name = setup.class_names[1]
    values = [s[f"expected_dice_{name}"] for s in by_case.values()]
    if np.isfinite(values).any():
        assert run.data.metrics[f"val_case_expected_dice_{name}_mean"] == pytest.approx(
            np.nanmean(values), rel=1e-5)
    gifs = [a.path for a in MlflowClient(config.tracking.tracking_uri).list_artifacts(
        run_id, "plots") if a.path.startswith("plots/uncertainty_")]
    assert len(gifs) == 1
    mlflow.set_tracking_uri(config.tracking.tracking_uri)
    frames = iio.imread(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=gifs[0]))
    assert frames.ndim == 4 and frames.shape[0] >= 1
