"""Largest-component postprocessing and nnU-Net's per-class decision rule."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from medseg.inference.postprocess import (
    apply_postprocessing,
    decide_postprocessing,
    keep_largest_component,
    load_postprocessing,
    postprocessing_scores,
    save_postprocessing,
)


def reference_largest(mask):
    """Largest 26-connected component by flood fill from every voxel (brute force)."""
    seen = np.zeros_like(mask)
    best = np.zeros_like(mask)
    for start in map(tuple, np.argwhere(mask)):
        if seen[start]:
            continue
        component = np.zeros_like(mask)
        stack = [start]
        while stack:
            v = stack.pop()
            if component[v]:
                continue
            component[v] = seen[v] = True
            for step in np.ndindex(3, 3, 3):
                n = tuple(np.array(v) + np.array(step) - 1)
                if all(0 <= i < s for i, s in zip(n, mask.shape, strict=True)) and mask[n]:
                    stack.append(n)
        if component.sum() > best.sum():
            best = component
    return best


def dice(p, t):
    return 2 * np.logical_and(p, t).sum() / (p.sum() + t.sum())


def test_keep_largest_component_removes_small_components_per_class():
    labels = np.zeros((6, 8, 8), np.uint8)
    labels[1:4, 1:4, 1:4] = 1  # kidney: 27 voxels
    labels[5, 7, 7] = 1  # a stray kidney voxel
    labels[1:3, 5:8, 5:8] = 2  # tumour: 18 voxels
    labels[5, 0, 0] = 2  # a stray tumour voxel
    cleaned = keep_largest_component(labels, [1])
    assert cleaned[5, 7, 7] == 0 and (cleaned[1:4, 1:4, 1:4] == 1).all()
    assert cleaned[5, 0, 0] == 2  # class 2 not asked for: untouched
    assert labels[5, 7, 7] == 1  # input not modified
    both = keep_largest_component(labels, [1, 2])
    assert both[5, 0, 0] == 0 and np.count_nonzero(both == 2) == 18
    # diagonal neighbours are connected (26-connectivity): nothing removed
    diagonal = np.zeros((3, 3, 3), np.uint8)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = diagonal[2, 2, 2] = 1
    np.testing.assert_array_equal(keep_largest_component(diagonal, [1]), diagonal)


def test_keep_largest_component_matches_flood_fill_reference():
    rng = np.random.default_rng(2)
    for _ in range(3):
        labels = (rng.random((5, 6, 7)) < 0.12).astype(np.uint8)
        cleaned = keep_largest_component(labels, [1])
        want = reference_largest(labels == 1)
        # equal sizes may tie: compare the kept size and that a whole component was kept
        assert np.count_nonzero(cleaned) == want.sum()
        components, _ = ndimage.label(labels, np.ones((3, 3, 3)))
        kept = np.unique(components[cleaned == 1])
        assert len(kept) == 1 and np.count_nonzero(components == kept[0]) == want.sum()
        # the scores used for the decision are the Dice of these masks
        truth = (rng.random(labels.shape) < 0.1).astype(np.uint8)
        before, after = postprocessing_scores(labels, truth, [1])[1]
        assert before == pytest.approx(dice(labels == 1, truth == 1))
        assert after == pytest.approx(dice(cleaned == 1, truth == 1))


def two_component_case(stray_is_true):
    """Truth and prediction: one big kidney, plus a small blob predicted away from it
    that the truth does (or does not) contain."""
    truth = np.zeros((8, 10, 10), np.uint8)
    truth[1:5, 1:5, 1:5] = 1
    pred = truth.copy()
    pred[6:8, 7:9, 7:9] = 1
    if stray_is_true:
        truth[6:8, 7:9, 7:9] = 1
    return pred, truth


def test_decision_applies_only_when_it_improves_the_metric():
    # stray components are false positives: removing them raises Dice -> apply
    cases = [postprocessing_scores(*two_component_case(False), [1, 2]) for _ in range(2)]
    before, after = cases[0][1]
    assert before == pytest.approx(2 * 64 / (72 + 64)) and after == 1.0
    assert math.isnan(cases[0][2][0])  # tumour absent from both
    decision = decide_postprocessing(cases, ["background", "kidney", "tumor"])
    assert decision["keep_largest_component"] == [1]
    assert decision["classes"][1]["name"] == "kidney"
    assert decision["classes"][1]["apply"] and not decision["classes"][2]["apply"]

    # the second component is real: removing it lowers Dice -> do not apply
    cases = [postprocessing_scores(*two_component_case(True), [1]) for _ in range(2)]
    assert cases[0][1] == (1.0, pytest.approx(2 * 64 / (64 + 72)))
    assert decide_postprocessing(cases)["keep_largest_component"] == []

    # mixed: it helps one case a little and hurts another more -> the mean decides, no
    mixed = [{1: (0.8, 0.85)}, {1: (0.9, 0.7)}]
    assert decide_postprocessing(mixed)["keep_largest_component"] == []
    # a tie keeps the raw prediction
    assert decide_postprocessing([{1: (0.8, 0.8)}])["keep_largest_component"] == []


def test_apply_postprocessing_and_json_round_trip(tmp_path):
    pred, truth = two_component_case(False)
    cases = [postprocessing_scores(pred, truth, [1])]
    path = save_postprocessing(decide_postprocessing(cases), tmp_path / "pp" / "decision.json")
    decision = load_postprocessing(path)
    assert json.loads(path.read_text())["keep_largest_component"] == [1]
    np.testing.assert_array_equal(apply_postprocessing(pred, decision), truth)
    assert apply_postprocessing(pred, None) is pred
    assert apply_postprocessing(pred, {"keep_largest_component": []}) is pred
    with pytest.raises(ValueError, match="keep_largest_component"):
        apply_postprocessing(pred, {"classes": {}})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_postprocessing(tmp_path / "bad.json")
