"""Training-time metrics against numpy on the concatenated hard predictions.

Convention (as medseg.evaluation): a score whose denominator is 0 is NaN — Dice and IoU of a
structure absent from both truth and prediction, sensitivity of one absent from the truth,
specificity of one that fills the truth.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from medseg.models import (
    ClassDice,
    DiceScore,
    IoUScore,
    Sensitivity,
    Specificity,
    class_dice_metrics,
    metric_key,
    metrics_from_config,
)
from medseg.training import make_strategy

KINDS = {"dice": DiceScore, "iou": IoUScore, "sensitivity": Sensitivity, "specificity": Specificity}


def _numpy_scores(truth, pred, labels):
    """Scores of the structure ``labels`` from label maps, by set counting."""
    t, p = np.isin(truth, labels), np.isin(pred, labels)
    tp, fp = np.sum(t & p), np.sum(~t & p)
    fn, tn = np.sum(t & ~p), np.sum(~t & ~p)

    def ratio(numerator, denominator):
        return math.nan if denominator == 0 else numerator / denominator

    return {
        "dice": ratio(2 * tp, 2 * tp + fp + fn),
        "iou": ratio(tp, tp + fp + fn),
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
    }


def _label_maps(y_true, y_pred):
    if y_pred.shape[-1] == 1:
        return (y_true[..., 0] > 0.5).astype(int), (y_pred[..., 0] > 0.5).astype(int)
    return y_true.argmax(-1), y_pred.argmax(-1)


def _numpy_class_dice(y_true, y_pred, class_id):
    return _numpy_scores(*_label_maps(y_true, y_pred), [class_id])["dice"]


def _batches(rng, count, spatial=(6, 6, 6), num_classes=3, batch=2):
    for _ in range(count):
        if num_classes == 1:  # sigmoid output
            y_true = rng.integers(0, 2, size=(batch, *spatial, 1)).astype(np.float32)
            y_pred = rng.random(size=(batch, *spatial, 1)).astype(np.float32)
        else:
            labels = rng.integers(0, num_classes, size=(batch, *spatial))
            y_true = np.eye(num_classes, dtype=np.float32)[labels]
            y_pred = rng.random(size=(batch, *spatial, num_classes)).astype(np.float32)
        yield y_true, y_pred


SETUPS = {
    # name: (spatial, channels, structures)
    "binary_sigmoid_2d": ((7, 6), 1, [[1], [0]]),
    "binary_softmax_3d": ((4, 5, 3), 2, [[1]]),
    "multiclass_2d": ((8, 7), 3, [[1], [2], [1, 2]]),
    "multiclass_3d": ((4, 5, 3), 4, [[0], [3], [1, 2], [1, 2, 3]]),
}
CASES = [(s, kind, labels) for s, (_, _, st) in SETUPS.items() for kind in KINDS for labels in st]


@pytest.mark.parametrize("setup, kind, labels", CASES)
def test_accumulated_over_batches_equals_numpy_on_the_concatenation(setup, kind, labels):
    spatial, channels, _ = SETUPS[setup]
    batches = list(_batches(np.random.default_rng(len(labels)), 3, spatial, channels))
    metric = KINDS[kind](labels)
    for y_true, y_pred in batches:
        metric.update_state(y_true, y_pred)
    y_true = np.concatenate([b[0] for b in batches])
    y_pred = np.concatenate([b[1] for b in batches])
    expected = _numpy_scores(*_label_maps(y_true, y_pred), labels)[kind]
    assert 0 < expected < 1
    np.testing.assert_allclose(float(metric.result()), expected, rtol=1e-6)
    # differs from the mean of per-batch scores: counts accumulate, ratios do not average
    per_batch = np.mean([_numpy_scores(*_label_maps(t, p), labels)[kind] for t, p in batches])
    assert float(metric.result()) != pytest.approx(per_batch, rel=1e-9)


@pytest.mark.parametrize("class_id", [0, 1, 2])
def test_class_dice_accumulates_over_batches(class_id):
    batches = list(_batches(np.random.default_rng(class_id), 3))
    metric = ClassDice(class_id)
    for y_true, y_pred in batches:
        metric.update_state(y_true, y_pred)
    y_true = np.concatenate([b[0] for b in batches])
    y_pred = np.concatenate([b[1] for b in batches])
    np.testing.assert_allclose(
        float(metric.result()), _numpy_class_dice(y_true, y_pred, class_id), rtol=1e-6
    )


def test_reset_state():
    first, second = _batches(np.random.default_rng(10), 2, spatial=(8, 8))
    metric = ClassDice(1, name="dice_kidney")
    metric.update_state(*first)
    metric.reset_state()
    assert math.isnan(float(metric.result()))  # nothing counted: undefined
    assert all(float(v) == 0.0 for v in metric.variables)
    metric.update_state(*second)
    np.testing.assert_allclose(
        float(metric.result()), _numpy_class_dice(*second, class_id=1), rtol=1e-6
    )


def test_empty_structures_are_nan_as_in_evaluation():
    y_true = np.eye(3, dtype=np.float32)[np.zeros((1, 4, 4), int)]  # background only
    scores = {kind: cls(2) for kind, cls in KINDS.items()}
    for metric in scores.values():
        metric.update_state(y_true, y_true)  # class 2 absent from truth and prediction
    assert math.isnan(float(scores["dice"].result()))
    assert math.isnan(float(scores["iou"].result()))
    assert math.isnan(float(scores["sensitivity"].result()))
    assert float(scores["specificity"].result()) == 1.0

    predicted = y_true.copy()
    predicted[0, 0, 0] = [0.0, 0.0, 1.0]  # one false positive
    for metric in scores.values():
        metric.update_state(y_true, predicted)
    assert float(scores["dice"].result()) == 0.0
    assert float(scores["iou"].result()) == 0.0
    assert math.isnan(float(scores["sensitivity"].result()))  # still absent from the truth
    np.testing.assert_allclose(float(scores["specificity"].result()), 31 / 32)
    assert float(scores["dice"].false_positives) == 1.0

    # a structure filling the truth: specificity undefined
    background = Specificity(0)
    background.update_state(y_true, predicted)
    assert math.isnan(float(background.result()))

    perfect = ClassDice(0)
    perfect.update_state(y_true, y_true)
    assert float(perfect.result()) == 1.0


def test_sample_weight_per_sample():
    y_true, y_pred = next(_batches(np.random.default_rng(11), 1, spatial=(5, 5)))
    for kind, cls in KINDS.items():
        metric = cls([1, 2])
        metric.update_state(y_true, y_pred, sample_weight=np.array([0.0, 1.0]))
        expected = _numpy_scores(*_label_maps(y_true[1:], y_pred[1:]), [1, 2])[kind]
        np.testing.assert_allclose(float(metric.result()), expected, rtol=1e-6, err_msg=kind)


def test_labels_outside_the_predictions_are_refused():
    y_true, y_pred = next(_batches(np.random.default_rng(12), 1, spatial=(4, 4)))
    with pytest.raises(ValueError, match=r"labels \[1, 3\] outside the 3 classes"):
        DiceScore([1, 3]).update_state(y_true, y_pred)
    with pytest.raises(ValueError, match="labels must be one or more class indices"):
        IoUScore([])


def test_under_mirrored_strategy_equals_numpy_on_all_batches():
    """Counts add up over replicas and batches (10 samples: batches 4 + 4 + 2)."""
    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs the two logical CPUs configured in conftest")
    rng = np.random.default_rng(13)
    labels = rng.integers(0, 3, size=(10, 6, 5, 4))
    labels[labels == 2] = rng.integers(0, 2, size=np.count_nonzero(labels == 2))  # rarer
    y = np.eye(3, dtype=np.float32)[labels]
    x = rng.normal(size=y.shape).astype(np.float32)
    class_names, regions = ["background", "kidney", "tumour"], {"kidney_and_tumour": [1, 2]}
    strategy = make_strategy("mirrored")
    with strategy.scope():
        inputs = keras.Input((6, 5, 4, 3))
        model = keras.Model(inputs, keras.layers.Softmax()(inputs))
        model.compile(
            loss="categorical_crossentropy", metrics=metrics_from_config(class_names, regions)
        )
    logs = model.evaluate(x, y, batch_size=4, return_dict=True, verbose=0)
    structures = {"kidney": [1], "tumour": [2], "kidney_and_tumour": [1, 2]}
    for structure, structure_labels in structures.items():
        expected = _numpy_scores(labels, x.argmax(-1), structure_labels)
        for kind, value in expected.items():
            np.testing.assert_allclose(logs[f"{kind}_{structure}"], value, rtol=1e-6)


def test_metrics_from_config_names():
    metrics = metrics_from_config(
        ["background", "kidney", "tumour"], {"kidney_and_tumour": [1, 2]}, kinds=("dice", "iou")
    )
    assert [m.name for m in metrics] == [
        "dice_kidney",
        "dice_tumour",
        "dice_kidney_and_tumour",
        "iou_kidney",
        "iou_tumour",
        "iou_kidney_and_tumour",
    ]
    assert [type(m) for m in metrics] == [DiceScore] * 3 + [IoUScore] * 3
    assert [m.labels for m in metrics[:3]] == [(1,), (2,), (1, 2)]
    everything = metrics_from_config(["background", "left atrium"])
    assert [m.name for m in everything] == [
        "dice_left_atrium",
        "iou_left_atrium",
        "sensitivity_left_atrium",
        "specificity_left_atrium",
    ]
    assert metric_key("kidney+tumour (all)") == "kidney_tumour_all"


def test_metrics_from_config_errors():
    names = ["background", "kidney", "tumour"]
    with pytest.raises(ValueError, match=r"region 'whole': labels \[1, 3\] must be"):
        metrics_from_config(names, {"whole": [1, 3]})
    with pytest.raises(ValueError, match="region 'none': labels"):
        metrics_from_config(names, {"none": []})
    with pytest.raises(ValueError, match="unknown metric kinds"):
        metrics_from_config(names, kinds=("dice", "hausdorff"))
    with pytest.raises(ValueError, match="both give the metric name 'dice_kidney'"):
        metrics_from_config(names, {"kidney": [1, 2]})
    with pytest.raises(ValueError, match="need the background and at least one class"):
        metrics_from_config(["background"])


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


@pytest.mark.parametrize("kind", KINDS)
def test_serialization_round_trip(kind):
    metric = KINDS[kind]([1, 2], name=f"{kind}_kidney_and_tumour")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(metric))
    assert type(restored) is KINDS[kind]
    assert (
        restored.get_config()
        == metric.get_config()
        == {
            "labels": [1, 2],
            "name": f"{kind}_kidney_and_tumour",
            "dtype": "float32",
        }
    )
