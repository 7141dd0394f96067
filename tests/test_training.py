"""Training: strategies, optimizers, schedules, stopping, clipping, checkpoints, seeds."""

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from medseg.config import ModelConfig, TrainConfig
from medseg.models import DiceCrossEntropyLoss
from medseg.training import (
    build_compiled_model,
    custom_fit,
    fit,
    latest_checkpoint,
    make_learning_rate,
    make_optimizer,
    make_strategy,
    precision_policy,
    restore_checkpoint,
    save_checkpoint,
    seed_everything,
    worker_count,
    worker_rank,
)
from medseg.workflows.experiment import prepare_data, train_model

CLASSES = ["background", "kidney", "tumour"]
TINY_MODEL = ModelConfig(filters=2, depth=2, normalization="instance")


def weights_of(model):
    return [np.array(w) for w in model.get_weights()]


def assert_same_history(got, expected):
    assert set(got) == set(expected)
    for key in expected:  # NaN (a class absent everywhere) equals NaN here
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def synthetic_batches(seed=0, batch=2, shape=(8, 8, 8), classes=3):
    """Endless batches of the same few (image, one-hot label) pairs, deterministic."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4 * batch, *shape, 1)).astype(np.float32)
    y = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, size=(4 * batch, *shape))]
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True).repeat()


def compiled(train_config, strategy=None, seed=1):
    seed_everything(seed)
    strategy = strategy or make_strategy("default")
    return build_compiled_model(TINY_MODEL, train_config, CLASSES, 1, strategy)


# -- strategies --------------------------------------------------------------------------


def test_strategy_names(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert isinstance(make_strategy("default"), tf.distribute.Strategy)
    mirrored = make_strategy("mirrored")
    assert isinstance(mirrored, tf.distribute.MirroredStrategy)
    assert mirrored.num_replicas_in_sync == 2  # the two logical CPUs of conftest
    assert make_strategy("mirrored") is mirrored  # one per process
    assert make_strategy("auto") is tf.distribute.get_strategy()  # no GPU, no cluster
    with pytest.raises(ValueError, match="train.strategy='tpu'"):
        make_strategy("tpu")
    with pytest.raises(ValueError, match="needs TF_CONFIG"):
        make_strategy("multiworker")


def test_rank_and_worker_count_come_from_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert (worker_count(), worker_rank()) == (1, 0)
    workers = {"worker": ["a:1", "b:2", "c:3"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": workers, "task": {"index": 2}}))
    assert (worker_count(), worker_rank()) == (3, 2)
    with_chief = {"chief": ["m:0"], **workers}
    task = {"type": "chief", "index": 0}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": with_chief, "task": task}))
    assert (worker_count(), worker_rank()) == (4, 0)
    task = {"type": "worker", "index": 0}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": with_chief, "task": task}))
    assert worker_rank() == 1
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        worker_count()


def test_trains_under_mirrored_strategy_on_two_logical_cpus(tiny_config):
    config = tiny_config(**{"train.strategy": "mirrored", "augment.enabled": False})
    setup = prepare_data(config)
    model, history = train_model(config, setup)
    assert len(history["loss"]) == 2 and all(np.isfinite(history["loss"]))
    assert "val_dice_kidney" in history and "dice_tumour" in history
    # every variable is mirrored on both replicas, and the copies agree after training
    for var in model.trainable_variables:
        copies = var.value.values
        assert len(copies) == 2
        np.testing.assert_array_equal(copies[0].numpy(), copies[1].numpy())


def test_default_strategy_training_lowers_the_loss(tiny_config):
    config = tiny_config(
        **{
            "train.epochs": 6,
            "train.steps_per_epoch": 5,
            "train.strategy": "default",
            "augment.enabled": False,
        }
    )
    setup = prepare_data(config)
    _, history = train_model(config, setup)
    assert history["loss"][-1] < history["loss"][0]


@pytest.mark.slow
def test_same_seed_repeats_exactly_and_custom_loop_equals_keras_fit(tiny_config):
    config = tiny_config(**{"train.strategy": "default", "augment.enabled": False})
    setup = prepare_data(config)
    first, history = train_model(config, setup)
    again, history_again = train_model(config, setup)
    for a, b in zip(weights_of(first), weights_of(again), strict=True):
        np.testing.assert_array_equal(a, b)
    assert_same_history(history, history_again)
    # Keras fit on the same stream: the same step, so the same weights and logs
    fitted, fit_history = train_model(config.with_overrides({"train.loop": "fit"}), setup)
    for a, b in zip(weights_of(first), weights_of(fitted), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert set(fit_history) == set(history)
    np.testing.assert_allclose(fit_history["val_loss"], history["val_loss"], rtol=1e-5)


# -- optimizers and schedules ----------------------------------------------------------


def test_poly_learning_rate_matches_nnunet_formula():
    config = TrainConfig(learning_rate=0.01, epochs=4, steps_per_epoch=25, lr_schedule="poly")
    schedule = make_learning_rate(config)
    for step in (0, 1, 50, 99, 100):
        expected = 0.01 * (1 - min(step, 100) / 100) ** 0.9
        assert abs(float(schedule(step)) - expected) < 1e-7
    assert make_learning_rate(TrainConfig(lr_schedule="constant", learning_rate=0.5)) == 0.5
    with pytest.raises(ValueError, match="'train.lr_schedule': 'step' is not one of 'poly'"):
        TrainConfig(lr_schedule="step")  # refused when the config is made


def test_cosine_learning_rate_matches_closed_form():
    config = TrainConfig(learning_rate=0.02, epochs=3, steps_per_epoch=10, lr_schedule="cosine")
    schedule = make_learning_rate(config)
    steps = np.arange(0, 36)
    expected = 0.02 * 0.5 * (1 + np.cos(np.pi * np.minimum(steps, 30) / 30))
    got = np.array([float(schedule(int(s))) for s in steps])
    np.testing.assert_allclose(got, expected, atol=1e-8)


def test_optimizers():
    sgd = make_optimizer(TrainConfig(optimizer="sgd", lr_schedule="constant"))
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.nesterov and sgd.momentum == 0.99
    adamw = make_optimizer(TrainConfig(optimizer="adamw", weight_decay=0.01))
    assert isinstance(adamw, keras.optimizers.AdamW) and adamw.weight_decay == 0.01
    adam = make_optimizer(TrainConfig(optimizer="adam", clip_norm=1.0, loop="fit"))
    assert adam.global_clipnorm == 1.0  # Keras fit clips; the custom loop clips itself
    assert make_optimizer(TrainConfig(clip_norm=1.0)).global_clipnorm is None
    with pytest.raises(ValueError, match="'train.optimizer': 'rmsprop' is not one of 'adam'"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="'train.clip_norm': -1.0 is not a finite number > 0"):
        TrainConfig(clip_norm=-1.0)


def test_plateau_lowers_the_learning_rate_after_patience_epochs():
    # min_delta so large that no epoch after the first counts as an improvement
    config = TrainConfig(
        epochs=4,
        steps_per_epoch=1,
        learning_rate=0.01,
        lr_schedule="plateau",
        plateau_factor=0.5,
        plateau_patience=1,
        min_delta=1e9,
        monitor="loss",
    )
    model = compiled(config)
    history = fit(model, synthetic_batches(), None, config, verbose=0)
    # epoch 0 sets the best; epochs 1, 2, 3 each wait out the patience of 1 and halve the
    # rate at their end; the log holds the rate each epoch trained with
    np.testing.assert_allclose(history["learning_rate"], [0.01, 0.01, 0.005, 0.0025], rtol=1e-6)
    assert math.isclose(float(model.optimizer.learning_rate), 0.00125, rel_tol=1e-6)


def test_early_stopping_stops_and_the_monitor_needs_validation():
    config = TrainConfig(
        epochs=6, steps_per_epoch=1, early_stopping_patience=2, min_delta=1e9, monitor="loss"
    )
    model = compiled(config)
    history = fit(model, synthetic_batches(), None, config, verbose=0)
    assert len(history["loss"]) == 3  # best at epoch 0, then 2 epochs of patience
    with pytest.raises(ValueError, match="train.monitor='val_loss' needs validation"):
        fit(model, synthetic_batches(), None, TrainConfig(early_stopping_patience=1), verbose=0)


# -- clipping ----------------------------------------------------------------------------


def one_sgd_step(strategy, clip_norm):
    """Weight change of one plain SGD step (lr 1): minus the (clipped) gradient."""
    config = TrainConfig(
        optimizer="sgd", momentum=0.0, learning_rate=1.0, lr_schedule="constant",
        clip_norm=clip_norm, epochs=1, steps_per_epoch=1,
    )
    model = compiled(config, strategy)
    before = weights_of(model)
    custom_fit(model, synthetic_batches(), None, epochs=1, steps_per_epoch=1,
               clip_norm=clip_norm, verbose=0)
    trainable = {id(v) for v in model.trainable_variables}
    after = weights_of(model)
    return [a - b for a, b, v in zip(after, before, model.weights, strict=True)
            if id(v) in trainable]


@pytest.mark.parametrize("strategy_name", ["default", "mirrored"])
def test_clipping_bounds_the_global_gradient_norm(strategy_name):
    strategy = make_strategy(strategy_name)
    free = one_sgd_step(strategy, None)
    norm = np.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2)) for d in free))
    clip = norm / 4  # binding
    clipped = one_sgd_step(strategy, clip)
    clipped_norm = np.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2)) for d in clipped))
    np.testing.assert_allclose(clipped_norm, clip, rtol=1e-4)
    # one factor for all variables (global norm), not a per-tensor clip
    for c, f in zip(clipped, free, strict=True):
        np.testing.assert_allclose(c, f * (clip / norm), rtol=1e-3, atol=1e-7)
    if strategy_name != "default":
        return
    # a bound above the norm changes nothing
    loose = one_sgd_step(strategy, norm * 2)
    for c, f in zip(loose, free, strict=True):
        np.testing.assert_allclose(c, f, rtol=1e-5, atol=1e-8)


def test_two_replicas_step_like_one_device():
    """The global-batch gradient: replicas' shares of the loss add up to the one-device loss."""
    one = one_sgd_step(make_strategy("default"), None)
    two = one_sgd_step(make_strategy("mirrored"), None)
    for a, b in zip(one, two, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)


# -- precision -----------------------------------------------------------------------------


def test_precision_policy():
    assert precision_policy(TrainConfig()) == "float32"  # no GPU here
    with pytest.raises(ValueError, match="'train.precision': 'half' is not one of 'auto'"):
        TrainConfig(precision="half")
    # built (not trained: TensorFlow has no float16 CPU kernel for 3D pooling)
    model = compiled(TrainConfig(precision="mixed_float16"))
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.layers[1].compute_dtype == "float16"
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored


def test_loss_scaling_step_equals_the_unscaled_step_and_clips_unscaled_norm():
    """The custom loop's loss-scale path (as under mixed precision), on a pooling-free model."""

    def step(scaled, clip_norm):
        keras.utils.set_random_seed(3)
        model = keras.Sequential(
            [keras.Input((8, 8, 8, 1)), keras.layers.Conv3D(3, 3, padding="same"),
             keras.layers.Softmax()]
        )
        optimizer = keras.optimizers.SGD(learning_rate=1.0)
        if scaled:
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=2.0**10)
        model.compile(optimizer=optimizer, loss=DiceCrossEntropyLoss())
        before = weights_of(model)
        custom_fit(model, synthetic_batches(), None, epochs=1, steps_per_epoch=1,
                   clip_norm=clip_norm, verbose=0)
        return [a - b for a, b in zip(weights_of(model), before, strict=True)]

    plain, scaled = step(False, None), step(True, None)
    for a, b in zip(plain, scaled, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)
    norm = np.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2)) for d in plain))
    clipped = step(True, norm / 2)
    for a, c in zip(plain, clipped, strict=True):
        np.testing.assert_allclose(c, a / 2, rtol=1e-4, atol=1e-7)


# -- checkpoints -----------------------------------------------------------------------------


def test_checkpoint_round_trip_restores_weights_and_optimizer_state(tmp_path):
    config = TrainConfig(epochs=1, steps_per_epoch=3, lr_schedule="constant")
    model = compiled(config)
    fit(model, synthetic_batches(), None, config, verbose=0)
    for epoch in (1, 2, 3):
        path = save_checkpoint(tmp_path, model, epoch, {"loss": [1.0] * epoch})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0002", "epoch-0003"]
    (tmp_path / ".tmp-epoch-0004-1").mkdir()  # a half-written one is never picked
    assert latest_checkpoint(tmp_path) == path
    fresh = compiled(config, seed=7)
    state = restore_checkpoint(path, fresh)
    assert state["epoch"] == 3 and state["history"] == {"loss": [1.0] * 3}
    for a, b in zip(weights_of(model), weights_of(fresh), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(fresh.optimizer.iterations) == 3
    for a, b in zip(model.optimizer.variables, fresh.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    other = compiled(TrainConfig(optimizer="sgd", lr_schedule="constant"))
    with pytest.raises(ValueError, match="optimizer variables saved"):
        restore_checkpoint(path, other)


@pytest.mark.parametrize("loop", ["custom", "fit"])
def test_resume_in_process_continues_where_the_checkpoint_left(tmp_path, loop):
    """Checkpoint after 2 of 4 epochs, then a fresh model resumes: same as 4 epochs straight."""
    config = TrainConfig(
        epochs=4, steps_per_epoch=2, checkpoint_dir=str(tmp_path / "a"), loop=loop
    )
    straight = compiled(config)
    full = fit(straight, synthetic_batches(), None, config, verbose=0)
    assert latest_checkpoint(tmp_path / "a").name == "epoch-0004"

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.stop_training = epoch == 1

    second = TrainConfig(
        epochs=4, steps_per_epoch=2, checkpoint_dir=str(tmp_path / "b"), loop=loop
    )
    fit(compiled(second), synthetic_batches(), None, second, [Interrupt()], verbose=0)
    assert latest_checkpoint(tmp_path / "b").name == "epoch-0002"
    resumed = compiled(second, seed=99)  # other initial weights: all must come from the file
    history = fit(resumed, synthetic_batches(), None, second, verbose=0)
    assert_same_history(history, full)
    for a, b in zip(weights_of(straight), weights_of(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="train.steps_per_epoch=2"):
        bad = TrainConfig(epochs=6, steps_per_epoch=3, checkpoint_dir=str(tmp_path / "b"))
        fit(compiled(bad), synthetic_batches(), None, bad, verbose=0)


def test_deep_supervision_trains_every_output_and_logs_full_resolution_metrics():
    from medseg.models import downsample_targets

    config = TrainConfig(epochs=1, steps_per_epoch=2)
    seed_everything(1)
    model_config = ModelConfig(filters=2, depth=3, deep_supervision=True)
    model = build_compiled_model(model_config, config, CLASSES, 1, make_strategy("default"))
    assert len(model.outputs) == 2
    before = weights_of(model)
    batches = synthetic_batches().map(lambda x, y: (x, downsample_targets(y, model)))
    history = fit(model, batches, None, config, verbose=0)
    # metrics of the full-resolution output under their single-output names
    assert {"loss", "dice_kidney", "dice_tumour"} <= set(history)
    assert not any(k.endswith("dice_kidney") and k != "dice_kidney" for k in history)
    assert sum(k.endswith("_loss") for k in history) == 2  # one loss per output
    assert all(np.isfinite(v).all() for v in history.values())
    assert any(not np.array_equal(a, b) for a, b in zip(before, weights_of(model), strict=True))
