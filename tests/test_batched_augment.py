"""Augmentation of whole batches in the training step (``augment.device="accelerator"``)
against the per-patch tf.data path: same per-patch parameters from the same seeds, same
outputs where the transforms are comparable, labels within their label set."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from medseg.config import AugmentConfig, PatchConfig
from medseg.pipeline import CaseTable, training_dataset
from medseg.pipeline.augment import augment, draw_parameters
from medseg.pipeline.batched import augment_batch, draw_batch_parameters, element_seeds

PROBABILITIES = [f.name for f in dataclasses.fields(AugmentConfig) if f.name.endswith("_probability")]
def _off(**changes) -> AugmentConfig:
    """All transforms off except ``changes``."""
    return AugmentConfig(**{**{p: 0.0 for p in PROBABILITIES}, **changes})


# flips, rot90 and every intensity transform on, with coins that fall both ways
COMPARABLE = _off(
    flip_probability=0.5,
    rot90_probability=0.5,
    noise_probability=0.5,
    blur_probability=0.5,
    brightness_probability=0.5,
    contrast_probability=0.5,
    lowres_probability=0.5,
    gamma_probability=0.5,
    gamma_invert_probability=0.5,
    bias_field_probability=0.5,
    bias_field_pedestal=(0.0, 1.0),
    jit=False,
)
SPATIAL = dataclasses.replace(
    COMPARABLE, rotation_probability=0.5, scale_probability=0.5, elastic_probability=0.5,
    elastic_grid_spacing=4, elastic_magnitude=(0.5, 2.0),
)


def _batch(shape, channels=2, batch=6, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    images = np.cumsum(rng.normal(size=(batch, *shape, channels)), axis=1).astype(np.float32)
    labels = rng.integers(0, classes, size=(batch, *shape)).astype(np.int32)
    return images, labels


def _seeds(batch, seed=7):
    return tf.constant([[seed, i] for i in range(batch)], tf.int64)


def _per_patch(images, labels, config, seeds):
    outs = [
        augment(tf.constant(x), tf.constant(y), config, seeds[i])
        for i, (x, y) in enumerate(zip(images, labels, strict=True))
    ]
    return np.stack([o[0].numpy() for o in outs]), np.stack([o[1].numpy() for o in outs])


@pytest.mark.parametrize("config", [COMPARABLE, SPATIAL, AugmentConfig()], ids=["cmp", "spatial", "default"])
def test_batched_parameters_are_the_per_patch_draws(config):
    shape, seeds = (6, 8, 8), _seeds(5)
    batched = draw_batch_parameters(config, seeds, shape, 2)
    for i in range(5):
        single = draw_parameters(config, seeds[i], shape, 2)
        assert set(single) == set(batched)
        for key, value in single.items():
            np.testing.assert_array_equal(batched[key][i].numpy(), value.numpy(), err_msg=key)
    # the coins fall both ways over a batch: the comparison covers applied and skipped
    assert 0 < int(tf.reduce_sum(tf.cast(batched["gamma"], tf.int32))) < 5 or config is not COMPARABLE


def test_drawn_parameters_are_the_ones_the_tfdata_path_applies():
    # flips only: the tf.data output is np.flip over exactly the drawn axes
    config = _off(flip_probability=0.5, jit=False)
    images, labels = _batch((4, 6, 6), batch=8)
    seeds = _seeds(8, seed=3)
    out, out_labels = _per_patch(images, labels, config, seeds)
    flips = draw_batch_parameters(config, seeds, (4, 6, 6), 2)["flip"].numpy()
    assert 0 < flips.sum() < flips.size
    for i in range(8):
        axes = tuple(int(a) for a in np.flatnonzero(flips[i]))
        np.testing.assert_array_equal(out[i], np.flip(images[i], axes))
        np.testing.assert_array_equal(out_labels[i], np.flip(labels[i], axes))


@pytest.mark.parametrize("shape", [(4, 6, 6), (8, 8), (4, 6, 8)], ids=["3d", "2d", "non-square"])
def test_batched_flips_rot90_intensity_match_the_tfdata_path(shape):
    images, labels = _batch(shape, batch=8)
    seeds = _seeds(8)
    ref, ref_labels = _per_patch(images, labels, COMPARABLE, seeds)
    out, out_labels = augment_batch(tf.constant(images), tf.constant(labels), COMPARABLE, seeds)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out_labels.numpy(), ref_labels)
    assert not np.allclose(ref, images)  # something was applied


def test_batched_spatial_matches_the_tfdata_path_and_keeps_the_label_set():
    images, labels = _batch((6, 8, 8), batch=8, classes=3)
    one_hot = np.eye(3, dtype=np.float32)[labels]
    seeds = _seeds(8, seed=11)
    ref, ref_labels = _per_patch(images, labels, SPATIAL, seeds)
    out, out_one_hot = augment_batch(tf.constant(images), tf.constant(one_hot), SPATIAL, seeds)
    warped = draw_batch_parameters(SPATIAL, seeds, (6, 8, 8), 2)["spatial"].numpy()
    assert 0 < warped.sum() < 8
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-3, atol=1e-3)
    out_one_hot = out_one_hot.numpy()
    # one-hot rows gathered whole: still one-hot, classes from the label set
    np.testing.assert_array_equal(out_one_hot.sum(-1), 1.0)
    assert set(np.unique(out_one_hot)) <= {0.0, 1.0}
    # nearest-neighbour labels agree except at rounding ties of the source coordinate
    agree = np.mean(np.argmax(out_one_hot, -1) == ref_labels)
    assert agree > 0.99


def test_element_seeds_reproduce_the_training_stream():
    rng = np.random.default_rng(0)
    table = CaseTable(
        case_ids=("a", "b"),
        images=tuple(tf.constant(rng.normal(size=(8, 10, 10, 1)), tf.float32) for _ in "ab"),
        labels=tuple(tf.constant(rng.integers(0, 3, (8, 10, 10)), tf.int32) for _ in "ab"),
        coords=(tf.zeros([0, 3], tf.int32),) * 2,
        classes=(tf.zeros([0], tf.int32),) * 2,
    )
    patch = PatchConfig(patch_size=(4, 6, 6), batch_size=3, foreground_share=0.0)
    on_cpu = training_dataset(table, 2, patch, 3, seed=5, augment=COMPARABLE, start_step=2)
    raw = training_dataset(
        table, 2, patch, 3, seed=5, augment=dataclasses.replace(COMPARABLE, enabled=False),
        start_step=2,
    )
    pairs = zip(on_cpu.take(2), raw.take(2), strict=True)
    for step, ((x_ref, y_ref), (x, y)) in enumerate(pairs, start=2):
        out, out_y = augment_batch(x, y, COMPARABLE, element_seeds(5, step, 3))
        np.testing.assert_allclose(out.numpy(), x_ref.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(out_y.numpy(), y_ref.numpy())


def test_batched_augment_keeps_dtype_and_runs_compiled():
    images, labels = _batch((4, 6, 6), batch=2)
    step = tf.function(lambda x, y, s: augment_batch(x, y, AugmentConfig(), s), jit_compile=False)
    out, out_labels = step(tf.constant(images, tf.float16), tf.constant(labels), _seeds(2))
    assert out.dtype == tf.float16 and out_labels.dtype == tf.int32
    assert set(np.unique(out_labels.numpy())) <= set(np.unique(labels))


def test_dynamic_patch_shape_is_refused_naming_the_fix():
    step = tf.function(
        lambda x: augment_batch(x, None, AugmentConfig(), _seeds(2)),
        input_signature=[tf.TensorSpec([None, None, 6, 6, 1], tf.float32)],
    )
    with pytest.raises(ValueError, match="static size"):
        step.get_concrete_function()


def _config(**overrides):
    from medseg.config import Config

    return Config().with_overrides({"augment.device": "accelerator", **overrides})


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"augment.extra": ["medseg.pipeline.augment:flip"]}, "would then run before it"),
        ({"model.deep_supervision": True}, "model.deep_supervision=true"),
        ({"patch.mode": "full"}, "patch.mode='full'"),
        ({"train.loop": "fit"}, "train.loop='fit'"),
    ],
)
def test_accelerator_placement_refuses_what_it_cannot_do(overrides, fragment):
    from medseg.workflows.experiment import _augment_placement

    with pytest.raises(ValueError, match=fragment):
        _augment_placement(_config(**overrides))


def test_accelerator_placement_moves_the_builtin_augmentation_into_the_step():
    from medseg.workflows.experiment import _augment_placement

    stream, batch = _augment_placement(_config())
    assert not stream.enabled and batch.config.device == "accelerator"
    on_cpu, none = _augment_placement(_config(**{"augment.device": "cpu"}))
    assert on_cpu.enabled and none is None


def test_trainer_fit_refuses_batch_augmentation_with_keras_fit():
    from medseg.config import TrainConfig
    from medseg.pipeline.batched import BatchAugmentation
    from medseg.training.trainer import fit

    with pytest.raises(ValueError, match="set train.loop='custom'"):
        fit(None, None, None, TrainConfig(loop="fit"), augment=BatchAugmentation(COMPARABLE, 0, 2))


def test_custom_fit_trains_on_batches_augmented_in_the_step():
    import keras

    from medseg.pipeline.batched import BatchAugmentation
    from medseg.training.loop import custom_fit

    images, labels = _batch((4, 6, 6), channels=1, batch=2, classes=3)
    y = np.eye(3, dtype=np.float32)[labels]
    seen = []

    def recording(x, y, step, first=0):
        out = BatchAugmentation(COMPARABLE, 5, 2)(x, y, step, first)
        seen.append(out)  # traced once: the symbolic tensors show the call happened
        return out

    inputs = keras.Input((4, 6, 6, 1))
    model = keras.Model(inputs, keras.layers.Conv3D(3, 1, activation="softmax")(inputs))
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    ds = tf.data.Dataset.from_tensors((images, y)).repeat()
    history = custom_fit(model, ds, None, epochs=1, steps_per_epoch=3, verbose=0, augment=recording)
    assert len(history["loss"]) == 1 and np.isfinite(history["loss"][0])
    assert len(seen) == 1  # one trace for every step: the step is a tensor argument


@pytest.mark.slow
def test_gpu_step_benchmark_dry_run_reports_both_devices():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "benchmarks" / "gpu_step.py"
    done = subprocess.run(
        [sys.executable, str(script), "--dry-run"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|") for line in done.stdout.splitlines() if line.count("|") == 3][1:]
    assert [r[0].strip() for r in rows] == ["cpu", "accelerator"]
    for _, step, busy, patches in rows:
        assert float(step) > 0 and 0 < float(busy) <= 1 and float(patches) > 0
