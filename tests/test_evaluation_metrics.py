"""Per-case Dice and summaries against hand-computed values and a numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.evaluation import dice_per_class, dice_region, summarize


def reference_dice(pred_mask, truth_mask):
    """Dice by explicit counting over voxels."""
    tp = fp = fn = 0
    for p, t in zip(pred_mask.ravel().tolist(), truth_mask.ravel().tolist(), strict=True):
        tp += p and t
        fp += p and not t
        fn += t and not p
    return math.nan if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def test_dice_per_class_hand_computed():
    pred = np.array([[0, 1, 1], [2, 2, 0]])
    truth = np.array([[0, 1, 0], [2, 1, 0]])
    dice = dice_per_class(pred, truth, [0, 1, 2, 3])
    # class 0: pred {0, 5}, truth {0, 2, 5} -> 2*2/(2+3); class 1: pred {1, 2}, truth {1, 4}
    # -> 2*1/4; class 2: pred {3, 4}, truth {3} -> 2*1/3; class 3 absent from both
    assert dice[0] == pytest.approx(4 / 5)
    assert dice[1] == pytest.approx(1 / 2)
    assert dice[2] == pytest.approx(2 / 3)
    assert math.isnan(dice[3])
    assert list(dice) == [0, 1, 2, 3]


def test_dice_is_zero_when_predicted_but_absent_in_truth_and_vice_versa():
    truth = np.zeros((2, 3, 4), dtype=np.uint8)
    pred = truth.copy()
    pred[1, 2, 3] = 2
    assert dice_per_class(pred, truth, [2]) == {2: 0.0}
    assert dice_per_class(truth, pred, [2]) == {2: 0.0}
    assert dice_region(pred, truth, [1, 2]) == 0.0
    assert math.isnan(dice_region(truth, truth, [1, 2]))
    assert dice_per_class(pred, pred, [2]) == {2: 1.0}


def test_dice_region_hand_computed():
    pred = np.array([0, 1, 2, 2, 0, 1])
    truth = np.array([0, 2, 2, 1, 1, 0])
    # kidney+tumour region: pred {1, 2, 3, 5}, truth {1, 2, 3, 4} -> 2*3/8
    assert dice_region(pred, truth, [1, 2]) == pytest.approx(6 / 8)
    # a one-label region is that class's Dice
    assert dice_region(pred, truth, [2]) == dice_per_class(pred, truth, [2])[2]


def test_dice_matches_numpy_reference_on_random_volumes():
    rng = np.random.default_rng(0)
    for _ in range(5):
        truth = rng.integers(0, 3, size=(5, 6, 7))
        pred = np.where(rng.random(truth.shape) < 0.7, truth, rng.integers(0, 3, truth.shape))
        dice = dice_per_class(pred, truth, [0, 1, 2])
        for c in (0, 1, 2):
            assert dice[c] == pytest.approx(reference_dice(pred == c, truth == c))
        region = dice_region(pred, truth, (1, 2))
        assert region == pytest.approx(reference_dice(pred > 0, truth > 0))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        dice_per_class(np.zeros((2, 3)), np.zeros((3, 2)), [1])


def test_summarize_ignores_nan_and_non_numeric_entries():
    per_case = [
        {"case": "a", "dice_kidney": 0.9, "dice_tumor": math.nan},
        {"case": "b", "dice_kidney": 0.7, "dice_tumor": 0.5},
        {"case": "c", "dice_kidney": np.float32(0.8), "dice_tumor": 0.1},
        {"case": "d", "dice_kidney": 0.2},  # a missing key counts as NaN
    ]
    summary = summarize(per_case)
    assert set(summary) == {"dice_kidney", "dice_tumor"}
    kidney = summary["dice_kidney"]
    assert kidney["n"] == 4
    assert kidney["mean"] == pytest.approx(np.mean([0.9, 0.7, 0.8, 0.2]))
    assert kidney["median"] == pytest.approx(0.75)
    assert kidney["std"] == pytest.approx(np.std([0.9, 0.7, 0.8, 0.2]), rel=1e-6)
    tumor = summary["dice_tumor"]
    assert tumor == pytest.approx({"mean": 0.3, "median": 0.3, "std": 0.2, "n": 2})


def test_summarize_all_nan_metric_is_nan_without_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = summarize([{"dice_tumor": math.nan}, {"dice_tumor": math.nan}])
    assert summary["dice_tumor"]["n"] == 0
    assert all(math.isnan(summary["dice_tumor"][k]) for k in ("mean", "median", "std"))
    assert summarize([]) == {}


def test_iou_and_volume_difference_match_numpy():
    from medseg.evaluation import iou_per_class, volume_difference

    rng = np.random.default_rng(5)
    spacing = (2.5, 0.8, 1.2)
    voxel = 2.5 * 0.8 * 1.2
    for _ in range(4):
        truth = rng.integers(0, 3, size=(4, 5, 6))
        pred = np.where(rng.random(truth.shape) < 0.6, truth, rng.integers(0, 3, truth.shape))
        iou = iou_per_class(pred, truth, [1, 2, 5])
        for c in (1, 2):
            p, t = pred == c, truth == c
            assert iou[c] == pytest.approx(np.logical_and(p, t).sum() / np.logical_or(p, t).sum())
            # Dice and IoU of the same masks satisfy D = 2 J / (1 + J)
            assert dice_per_class(pred, truth, [c])[c] == pytest.approx(2 * iou[c] / (1 + iou[c]))
            diff, rel = volume_difference(p, t, spacing)
            assert diff == pytest.approx((p.sum() - t.sum()) * voxel)
            assert rel == pytest.approx((p.sum() - t.sum()) / t.sum())
        assert math.isnan(iou[5])


def test_iou_and_volume_difference_empty_conventions():
    from medseg.evaluation import iou_per_class, volume_difference

    empty = np.zeros((2, 3, 4), bool)
    one = empty.copy()
    one[1, 2, 3] = True
    assert iou_per_class(one.astype(int), empty.astype(int), [1]) == {1: 0.0}
    assert all(math.isnan(v) for v in volume_difference(empty, empty, (1, 1, 1)))
    diff, rel = volume_difference(one, empty, (2.0, 1.0, 0.5))
    assert diff == 1.0 and math.isnan(rel)
    assert volume_difference(empty, one, (2.0, 1.0, 0.5)) == (-1.0, -1.0)


def test_long_scores_name_structures_without_splitting_keys():
    from medseg.evaluation import long_scores, score_case, wide_scores

    truth = np.zeros((4, 6, 6), np.uint8)
    truth[1:3, 1:4, 1:4] = 1
    truth[2, 2, 2] = 2
    pred = truth.copy()
    pred[0, 0, 0] = 2
    names = ["background", "kidney", "kidney_and"]  # a class name that is a key prefix
    regions = {"kidney_and_tumour": [1, 2]}
    scores = score_case(pred, truth, (1.0, 1.0, 1.0), names, regions)
    rows = long_scores([("case_1", scores)], names, regions)
    assert len(rows) == 2 * 7 + 1
    region = [r for r in rows if r.structure == "kidney_and_tumour"]
    assert [(r.metric, r.value) for r in region] == [("dice", scores["dice_kidney_and_tumour"])]
    assert {r.structure for r in rows} == {"kidney", "kidney_and", "kidney_and_tumour"}
    np.testing.assert_equal(wide_scores(rows), {"case_1": scores})
