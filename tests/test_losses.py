"""DiceCrossEntropyLoss and soft_dice against a plain numpy reference."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from medseg.models import DiceCrossEntropyLoss, build_unet, class_dice_metrics, soft_dice
from medseg.training import make_strategy


def _numpy_dice(y_true, y_pred, include_background, smooth=1e-5):
    axes = tuple(range(y_pred.ndim - 1))
    y_true, y_pred = y_true.astype(np.float64), y_pred.astype(np.float64)
    intersection = (y_true * y_pred).sum(axes)
    dice = (2 * intersection + smooth) / (y_pred.sum(axes) + y_true.sum(axes) + smooth)
    return dice if include_background else dice[1:]


def _numpy_loss(y_true, y_pred, include_background, dice_weight=1.0, ce_weight=1.0, eps=1e-7):
    dice = _numpy_dice(y_true, y_pred, include_background).mean()
    probabilities = np.clip(y_pred.astype(np.float64), eps, 1 - eps)
    cross_entropy = (-(y_true * np.log(probabilities)).sum(-1)).mean()
    return dice_weight * (1 - dice) + ce_weight * cross_entropy


def _random_batch(rng, spatial, num_classes, empty_class=None, batch=2):
    labels = rng.integers(0, num_classes, size=(batch, *spatial))
    if empty_class is not None:
        labels[labels == empty_class] = 0
    y_true = np.eye(num_classes, dtype=np.float32)[labels]
    logits = rng.normal(scale=2.0, size=(batch, *spatial, num_classes))
    y_pred = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return y_true, y_pred.astype(np.float32)


CASES = [
    # (spatial, num_classes, empty_class)
    ((8, 8), 2, None),
    ((6, 8, 4), 2, None),
    ((8, 8), 3, 2),
    ((6, 8, 4), 3, None),
    ((6, 8, 4), 4, 1),
]


@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("spatial, num_classes, empty_class", CASES)
def test_loss_and_soft_dice_match_numpy(spatial, num_classes, empty_class, include_background):
    rng = np.random.default_rng(num_classes * 10 + len(spatial))
    y_true, y_pred = _random_batch(rng, spatial, num_classes, empty_class)
    if empty_class is not None:
        assert y_true[..., empty_class].sum() == 0

    loss = DiceCrossEntropyLoss(include_background=include_background)(y_true, y_pred)
    assert tuple(loss.shape) == ()
    np.testing.assert_allclose(
        float(loss), _numpy_loss(y_true, y_pred, include_background), rtol=1e-5
    )

    expected = _numpy_dice(y_true, y_pred, include_background)
    per_class = soft_dice(y_true, y_pred, include_background=include_background, per_class=True)
    np.testing.assert_allclose(np.asarray(per_class), expected, rtol=1e-5)
    np.testing.assert_allclose(
        float(soft_dice(y_true, y_pred, include_background=include_background)),
        expected.mean(),
        rtol=1e-5,
    )


def test_weights_of_the_two_terms():
    y_true, y_pred = _random_batch(np.random.default_rng(3), (6, 6, 6), 3)
    for dice_weight, ce_weight in [(1.0, 0.0), (0.0, 1.0), (0.3, 2.0)]:
        loss = DiceCrossEntropyLoss(dice_weight=dice_weight, ce_weight=ce_weight)
        np.testing.assert_allclose(
            float(loss(y_true, y_pred)),
            _numpy_loss(y_true, y_pred, False, dice_weight, ce_weight),
            rtol=1e-5,
        )


def test_batch_dice_is_not_a_mean_of_per_sample_dice():
    # nnU-Net's batch Dice: sums over the batch first, one ratio per class
    y_true, y_pred = _random_batch(np.random.default_rng(4), (8, 8), 3, batch=3)
    batch_dice = float(soft_dice(y_true, y_pred))
    per_sample = np.mean(
        [_numpy_dice(y_true[i : i + 1], y_pred[i : i + 1], False).mean() for i in range(3)]
    )
    np.testing.assert_allclose(batch_dice, _numpy_dice(y_true, y_pred, False).mean(), rtol=1e-5)
    assert abs(batch_dice - per_sample) > 1e-4


@pytest.mark.parametrize("empty_class", [None, 2])
def test_perfect_prediction_is_minimal(empty_class):
    rng = np.random.default_rng(5)
    y_true, y_pred = _random_batch(rng, (6, 6, 6), 3, empty_class)
    loss = DiceCrossEntropyLoss()
    perfect = float(loss(y_true, y_true))
    assert 0.0 <= perfect < 1e-5  # dice term 0 (an empty class too), CE ≈ -log(1 - eps)
    np.testing.assert_allclose(float(soft_dice(y_true, y_true, include_background=True)), 1.0)
    assert perfect < float(loss(y_true, y_pred))
    # and a blurred version of the truth is worse than the truth
    blurred = 0.8 * y_true + 0.2 / 3
    assert perfect < float(loss(y_true, blurred)) < float(loss(y_true, 1.0 - y_true + 1e-3))


def test_config_round_trip():
    loss = DiceCrossEntropyLoss(
        dice_weight=0.5, ce_weight=2.0, include_background=True, smooth=1e-3, name="dce"
    )
    config = loss.get_config()
    assert config["dice_weight"] == 0.5 and config["include_background"] is True
    again = DiceCrossEntropyLoss.from_config(config)
    assert again.get_config() == config
    assert again.reduction == "none"

    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, DiceCrossEntropyLoss)
    assert restored.get_config() == config
    y_true, y_pred = _random_batch(np.random.default_rng(6), (4, 4, 4), 3)
    assert float(restored(y_true, y_pred)) == float(loss(y_true, y_pred))


def test_sample_weight_is_refused():
    y_true, y_pred = _random_batch(np.random.default_rng(7), (4, 4), 2)
    with pytest.raises(ValueError, match="sample_weight"):
        DiceCrossEntropyLoss()(y_true, y_pred, sample_weight=np.ones(2))


def _one_step(strategy, x, y):
    keras.utils.set_random_seed(1)
    with strategy.scope():
        # instance norm: per-sample statistics, identical however the batch is split
        model = build_unet(3, ndim=2, depth=2, filters=4, normalization="instance")
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=DiceCrossEntropyLoss(),
            metrics=class_dice_metrics(["background", "a", "b"]),
        )
    history = model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0).history
    return model.get_weights(), {k: v[0] for k, v in history.items()}


def test_mirrored_strategy_matches_one_device():
    """Global batch Dice and 1/replicas scaling: same step and logs as on one device."""
    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < 2:
        pytest.skip("needs the two logical CPUs configured in conftest")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 16, 16, 1)).astype("float32")
    labels = rng.integers(0, 3, size=(4, 16, 16))
    labels[:2][labels[:2] == 2] = 0  # class 2 only on the second replica's half
    y = np.eye(3, dtype="float32")[labels]

    single_weights, single_logs = _one_step(tf.distribute.get_strategy(), x, y)
    # the project's own CPU strategy: reduction through one device, no collective ops
    # (whose instance keys clash across strategies in one test process)
    mirrored = make_strategy("mirrored")
    assert mirrored.num_replicas_in_sync == 2
    mirrored_weights, mirrored_logs = _one_step(mirrored, x, y)

    assert mirrored_logs.keys() == single_logs.keys()
    for key, value in single_logs.items():
        np.testing.assert_allclose(mirrored_logs[key], value, rtol=1e-5, err_msg=key)
    for single, distributed in zip(single_weights, mirrored_weights, strict=True):
        # a per-replica Dice differs by ~3e-4 here, a missing 1/replicas by far more
        np.testing.assert_allclose(distributed, single, atol=1e-6)
