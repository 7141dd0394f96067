"""Training under tf.distribute strategies."""

import numpy as np
import pytest
import tensorflow as tf

from medseg.experiment import prepare_data, train_model
from medseg.training import make_strategy


def test_strategy_names():
    assert isinstance(make_strategy("default"), tf.distribute.Strategy)
    mirrored = make_strategy("mirrored")
    assert isinstance(mirrored, tf.distribute.MirroredStrategy)
    assert mirrored.num_replicas_in_sync == 2  # the two logical CPUs of conftest
    with pytest.raises(ValueError, match="train.strategy='tpu'"):
        make_strategy("tpu")


def test_trains_under_mirrored_strategy_on_two_logical_cpus(tiny_config):
    config = tiny_config(**{"train.strategy": "mirrored"})
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
        **{"train.epochs": 6, "train.steps_per_epoch": 5, "train.strategy": "default"}
    )
    setup = prepare_data(config)
    _, history = train_model(config, setup)
    assert history["loss"][-1] < history["loss"][0]


def test_poly_learning_rate_matches_nnunet_formula():
    from medseg.config import TrainConfig
    from medseg.training import make_learning_rate

    config = TrainConfig(learning_rate=0.01, epochs=4, steps_per_epoch=25, lr_schedule="poly")
    schedule = make_learning_rate(config)
    for step in (0, 1, 50, 99, 100):
        expected = 0.01 * (1 - min(step, 100) / 100) ** 0.9
        assert abs(float(schedule(step)) - expected) < 1e-7
    assert make_learning_rate(TrainConfig(lr_schedule="constant", learning_rate=0.5)) == 0.5
    with pytest.raises(ValueError, match="train.lr_schedule='cosine'"):
        make_learning_rate(TrainConfig(lr_schedule="cosine"))
