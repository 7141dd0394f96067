"""The user's own patch transforms: named in the config or passed in, each with its own seed
stream, trained with, logged, and a failing one named."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf
from mlflow.tracking import MlflowClient

from medseg.config import AugmentConfig, Config, ConfigError
from medseg.pipeline import CaseTable, plan_preprocessing, preprocessed_cases, training_dataset
from medseg.pipeline.transforms import Compose, TransformError, load_transform

SPIKE_AT = (1, 2, 3)


class RandomSpike:
    """Adds a random value in [10, 20) at one voxel (a transform as a user writes one)."""

    def __call__(self, image, label, seed):
        value = tf.random.stateless_uniform([], seed=seed, minval=10.0, maxval=20.0)
        index = [[*SPIKE_AT, 0]]
        return tf.tensor_scatter_nd_add(image, index, [value]), label


def broken(image, label, seed):
    raise RuntimeError("no spikes today")


def shrinking(image, label, seed):
    return image[0], label[0]


@pytest.fixture(scope="module")
def table(tiny_config):
    from medseg import datasets
    from medseg.pipeline import read_case_ids

    config = tiny_config()
    builder = datasets.get_builder("kits_phantom", "tiny", config.data.data_dir)
    fingerprint = datasets.read_fingerprint(builder)
    plan = plan_preprocessing(config.preprocess, fingerprint)
    ids = read_case_ids(builder, "train")
    cases = preprocessed_cases(builder, "train", ids, plan, 3, config.seed)
    return CaseTable.from_dataset(cases), config


def batches(table, config, n=2, **kw):
    ds = training_dataset(table, len(table), config.patch, 3, 7, augment=config.augment, **kw)
    return [x.numpy() for x, _ in ds.take(n)]


def test_a_named_transform_draws_from_its_own_stream(table):
    table, config = table
    plain = batches(table, config)
    named = config.with_overrides({"augment.extra": ["test_transforms:RandomSpike"]})
    spiked = batches(table, named)
    # same seed, same patches: the stream is a function of (seed, step)
    for a, b in zip(spiked, batches(table, named), strict=True):
        np.testing.assert_array_equal(a, b)
    # adding a transform changes nothing but what it does: the built-in augmentation's draws
    # are untouched, and the spike lands on its voxel with a value of its own per patch
    values = []
    for before, after in zip(plain, spiked, strict=True):
        difference = after - before
        spot = (slice(None), *SPIKE_AT, 0)
        outside = difference.copy()
        outside[spot] = 0
        np.testing.assert_allclose(outside, 0, atol=1e-6)
        assert np.all((difference[spot] >= 10) & (difference[spot] < 20))
        values += list(difference[spot])
    assert len(set(np.round(values, 4))) == len(values)  # one draw per patch
    # passed in the API instead: the same transform at the same stream, the same patches
    passed = batches(table, config, transforms=[RandomSpike()])
    for a, b in zip(spiked, passed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_transforms_are_named():
    with pytest.raises(ConfigError, match="'augment.extra': 'not a spec' is not of the form"):
        AugmentConfig(extra=("not a spec",))
    with pytest.raises(TransformError, match="cannot import 'no_such_module'"):
        load_transform("no_such_module:Spike")
    with pytest.raises(TransformError, match="'test_transforms' has no 'Missing'"):
        load_transform("test_transforms:Missing")
    image, label = tf.zeros([4, 8, 8, 1]), tf.zeros([4, 8, 8], tf.int32)
    seed = tf.constant([1, 2], tf.int64)
    with pytest.raises(TransformError, match="test_transforms:broken failed .*no spikes today"):
        Compose(None, [broken])(image, label, seed)
    with pytest.raises(TransformError, match="test_transforms:shrinking returned shapes"):
        Compose(None, [shrinking])(image, label, seed)


def test_a_failing_transform_stops_training_naming_it(tiny_config):
    from medseg.workflows import prepare_data, train_model

    config = tiny_config(**{"augment.extra": ["test_transforms:broken"]})
    setup = prepare_data(config)
    with pytest.raises(TransformError, match="augment transform test_transforms:broken failed"):
        train_model(config, setup)


@pytest.mark.slow
def test_a_user_transform_trains_and_is_logged(tiny_config, tmp_path):
    from medseg.tracking import run_training

    config = tiny_config(
        **{
            "augment.extra": ["test_transforms:RandomSpike"],
            "tracking.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
            "tracking.artifact_root": str(tmp_path),
            "tracking.log_model": False,
        }
    )
    result, run_id = run_training(config)
    assert np.isfinite(result.history["loss"]).all() and len(result.history["loss"]) == 2
    params = MlflowClient(config.tracking.tracking_uri).get_run(run_id).data.params
    assert json.loads(params["augment.extra"]) == ["test_transforms:RandomSpike"]
    assert json.loads(params["augment.transforms"]) == ["test_transforms:RandomSpike"]
    assert Config.from_dict(result.config.to_dict()).augment.extra == (
        "test_transforms:RandomSpike",
    )


# -- the user's own preprocessing step -----------------------------------------------------


def plus_hundred(image, label):
    """A user preprocessing step: shifts the normalised image (label untouched)."""
    return image + 100.0, label


def broken_step(image, label):
    raise RuntimeError("no preprocessing today")


def test_a_preprocessing_step_is_applied_in_training_and_prediction_and_recorded():
    from medseg.config import PreprocessConfig
    from medseg.inference import predict_case
    from medseg.pipeline import PreprocessPlan, preprocess_case

    fingerprint = {"class_names": ["bg", "fg"], "foreground_intensity": {}}
    config = PreprocessConfig(target_spacing=None, clip="none", normalize="none",
                              extra=("test_transforms:plus_hundred",))
    plan = plan_preprocessing(config, fingerprint)
    assert plan.extra == ("test_transforms:plus_hundred",)
    assert PreprocessPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    plain = plan_preprocessing(dataclasses.replace(config, extra=()), fingerprint)
    assert "extra" not in plain.to_dict()  # plans (and cache keys) without steps unchanged
    rng = np.random.default_rng(0)
    image = rng.normal(size=(4, 6, 6)).astype(np.float32)
    label = (image > 0).astype(np.int32)
    spacing = tf.constant([1.0, 1.0, 1.0])
    out, out_label = preprocess_case(tf.constant(image), tf.constant(label), spacing, plan)
    np.testing.assert_allclose(out.numpy()[..., 0], image + 100.0, rtol=1e-6)
    np.testing.assert_array_equal(out_label.numpy(), label)
    # prediction preprocesses with the same step: a model thresholding at 100 sees it
    def model(batch):
        fg = (np.asarray(batch)[..., 0] > 100.0).astype(np.float32)
        return np.stack([1 - fg, fg], axis=-1)

    labels, _ = predict_case(model, image, (1.0, 1.0, 1.0), plan, (4, 6, 6), 2,
                             probabilities=False)
    np.testing.assert_array_equal(labels, label)
    labels, _ = predict_case(model, image, (1.0, 1.0, 1.0), plain, (4, 6, 6), 2,
                             probabilities=False)
    assert not labels.any()
    bad = dataclasses.replace(plan, extra=("test_transforms:broken_step",))
    with pytest.raises(TransformError, match="preprocess.extra step test_transforms:broken_step"):
        preprocess_case(tf.constant(image), None, spacing, bad)
    with pytest.raises(ConfigError, match="'preprocess.extra': 'nope' is not of the form"):
        PreprocessConfig(extra=("nope",))


def test_the_builtin_augmentation_is_small_transform_objects_with_the_same_draws():
    from medseg.pipeline.augment import RandomIntensity, augment, builtin_transforms

    config = AugmentConfig(jit=False, rot90_probability=0.5, elastic_probability=0.5,
                           noise_probability=0.5, lowres_probability=0.5)
    names = [type(t).__name__ for t in builtin_transforms(config)]
    assert names[:3] == ["RandomSpatial", "RandomRot90", "RandomFlip"]
    assert [t.name for t in builtin_transforms(config)[3:]] == [
        "noise", "blur", "brightness", "contrast", "lowres", "gamma_inverted", "gamma",
        "bias_field",
    ]
    rng = np.random.default_rng(3)
    image = tf.constant(rng.normal(size=(6, 12, 12, 1)).astype(np.float32))
    label = tf.constant(rng.integers(0, 3, size=(6, 12, 12)).astype(np.int32))
    for s in range(4):
        seed = tf.constant([s, 1], tf.int64)
        x, y = image, label
        for transform in builtin_transforms(config):  # composed by hand
            x, y = transform(x, y, seed)
        ex, ey = augment(image, label, config, seed)
        np.testing.assert_array_equal(x.numpy(), ex.numpy())
        np.testing.assert_array_equal(y.numpy(), ey.numpy())
    with pytest.raises(ValueError, match="no intensity transform 'sharpen'"):
        RandomIntensity("sharpen", config)
