"""ClassDice against numpy on the concatenated hard predictions."""

import keras
import numpy as np
import pytest

from medseg.models import ClassDice, class_dice_metrics


def _numpy_class_dice(y_true, y_pred, class_id):
    predicted = y_pred.argmax(-1) == class_id
    target = y_true.argmax(-1) == class_id
    tp = np.sum(predicted & target)
    denominator = 2 * tp + np.sum(predicted & ~target) + np.sum(~predicted & target)
    return 0.0 if denominator == 0 else 2 * tp / denominator


def _batches(rng, count, spatial=(6, 6, 6), num_classes=3):
    for _ in range(count):
        labels = rng.integers(0, num_classes, size=(2, *spatial))
        y_true = np.eye(num_classes, dtype=np.float32)[labels]
        y_pred = rng.random(size=(2, *spatial, num_classes)).astype(np.float32)
        yield y_true, y_pred


@pytest.mark.parametrize("class_id", [0, 1, 2])
def test_accumulates_over_batches(class_id):
    batches = list(_batches(np.random.default_rng(class_id), 3))
    metric = ClassDice(class_id)
    for y_true, y_pred in batches:
        metric.update_state(y_true, y_pred)
    y_true = np.concatenate([b[0] for b in batches])
    y_pred = np.concatenate([b[1] for b in batches])
    expected = _numpy_class_dice(y_true, y_pred, class_id)
    assert 0 < expected < 1
    np.testing.assert_allclose(float(metric.result()), expected, rtol=1e-6)
    # differs from the mean of per-batch Dice: counts accumulate, ratios do not average
    per_batch = np.mean([_numpy_class_dice(t, p, class_id) for t, p in batches])
    assert float(metric.result()) != pytest.approx(per_batch, rel=1e-9)


def test_reset_state():
    first, second = _batches(np.random.default_rng(10), 2, spatial=(8, 8))
    metric = ClassDice(1, name="dice_kidney")
    metric.update_state(*first)
    metric.reset_state()
    assert float(metric.result()) == 0.0
    assert all(float(v) == 0.0 for v in metric.variables)
    metric.update_state(*second)
    np.testing.assert_allclose(
        float(metric.result()), _numpy_class_dice(*second, class_id=1), rtol=1e-6
    )


def test_empty_class():
    y_true = np.eye(3, dtype=np.float32)[np.zeros((1, 4, 4), int)]  # background only
    metric = ClassDice(2)
    metric.update_state(y_true, y_true)  # absent from truth and prediction
    assert float(metric.result()) == 0.0  # undefined → 0.0, never NaN

    predicted = y_true.copy()
    predicted[0, 0, 0] = [0.0, 0.0, 1.0]  # one false positive
    metric.update_state(y_true, predicted)
    assert float(metric.result()) == 0.0
    assert float(metric.false_positives) == 1.0

    perfect = ClassDice(0)
    perfect.update_state(y_true, y_true)
    assert float(perfect.result()) == 1.0


def test_sample_weight_per_sample():
    y_true, y_pred = next(_batches(np.random.default_rng(11), 1, spatial=(5, 5)))
    metric = ClassDice(1)
    metric.update_state(y_true, y_pred, sample_weight=np.array([0.0, 1.0]))
    np.testing.assert_allclose(
        float(metric.result()), _numpy_class_dice(y_true[1:], y_pred[1:], 1), rtol=1e-6
    )


def test_config_and_helper():
    metrics = class_dice_metrics(["background", "kidney", "tumor"])
    assert [m.name for m in metrics] == ["dice_kidney", "dice_tumor"]
    assert [m.class_id for m in metrics] == [1, 2]
    assert ClassDice(3).name == "dice_3"

    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(metrics[1])
    )
    assert isinstance(restored, ClassDice)
    assert restored.get_config() == metrics[1].get_config()
    assert restored.true_positives.dtype == "float64"
