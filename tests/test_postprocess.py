"""Component postprocessing (largest component, minimum volume) and its per-class decision."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from medseg.inference.postprocess import (
    Components,
    apply_postprocessing,
    component_tables,
    decide_postprocessing,
    describe_postprocessing,
    drop_small_components,
    keep_largest_component,
    load_postprocessing,
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
        # the component table gives the Dice of these masks for both rules
        truth = (rng.random(labels.shape) < 0.1).astype(np.uint8)
        table = component_tables(labels, truth, [1])[1]
        assert table.dice() == pytest.approx(dice(labels == 1, truth == 1))
        assert table.dice(table.largest()) == pytest.approx(dice(cleaned == 1, truth == 1))


def test_drop_small_components_and_its_table_match_scipy():
    rng = np.random.default_rng(5)
    labels = (rng.random((6, 7, 8)) < 0.15).astype(np.uint8) * rng.integers(1, 3, (6, 7, 8))
    truth = (rng.random(labels.shape) < 0.2).astype(np.uint8)
    spacing = (2.0, 0.5, 1.5)  # 1.5 mm³ voxels
    for c, limit in ((1, 3), (2, 2)):
        cleaned = drop_small_components(labels, {c: limit})
        components, n = ndimage.label(labels == c, np.ones((3, 3, 3)))
        sizes = ndimage.sum_labels(np.ones_like(components), components, range(1, n + 1))
        want = np.isin(components, 1 + np.flatnonzero(sizes >= limit))
        np.testing.assert_array_equal(cleaned == c, want)
        other = 3 - c
        np.testing.assert_array_equal(cleaned == other, labels == other)  # untouched
        table = component_tables(labels, truth * c, [c], spacing)[c]
        assert sorted(table.sizes) == sorted(int(v) for v in sizes)
        assert table.voxel_mm3 == pytest.approx(1.5)
        # the threshold in mm³ is the voxel limit times the voxel volume
        kept = table.dice(table.at_least(limit * 1.5))
        assert kept == pytest.approx(dice(want, truth == 1))
        assert Components.from_dict(json.loads(json.dumps(table.to_dict()))) == table


def two_component_case(stray_is_true, stray=(slice(6, 8), slice(7, 9), slice(7, 9))):
    """Truth and prediction: one big kidney (64 voxels), plus a blob predicted away from
    it that the truth does (or does not) contain."""
    truth = np.zeros((8, 10, 10), np.uint8)
    truth[1:5, 1:5, 1:5] = 1
    pred = truth.copy()
    pred[stray] = 1
    if stray_is_true:
        truth[stray] = 1
    return pred, truth


def tumour_case(tumour, false_tumour=False):
    """A kidney with (or without) a true tumour predicted exactly, and optionally an 8-voxel
    false tumour elsewhere."""
    truth = np.zeros((12, 12, 12), np.uint8)
    truth[1:9, 1:9, 1:9] = 1
    if tumour:
        truth[2:6, 2:6, 2:6] = 2  # 64 voxels
    pred = truth.copy()
    if false_tumour:
        pred[9:11, 9:11, 9:11] = 2
    return pred, truth


def test_a_small_false_structure_on_a_case_without_the_class_is_dropped_by_volume():
    # a third of the cases tumour-free, one of them with a small false tumour: keeping
    # the largest component cannot remove it, a volume threshold can
    cases = [tumour_case(True), tumour_case(True), tumour_case(False, false_tumour=True)]
    spacing = (1.0, 2.0, 2.0)  # 4 mm³ voxels: false tumour 32 mm³, true ones 256 mm³
    tables = [component_tables(p, t, [1, 2], spacing) for p, t in cases]
    assert [t[2].dice() for t in tables] == [1.0, 1.0, 0.0]
    decision = decide_postprocessing(tables, ["background", "kidney", "tumour"])
    tumour = decision["classes"][2]
    assert tumour["rule"] == "min_volume" and tumour["name"] == "tumour"
    assert tumour["dice_before"] == pytest.approx(2 / 3) and tumour["dice_after"] == 1.0
    # between the false (32) and the true (256) volume, at most half the smallest true one
    assert decision["min_component_mm3"] == {2: pytest.approx(math.sqrt(32 * 256))}
    assert decision["keep_largest_component"] == [] and not decision["classes"][1]["apply"]
    pred, truth = cases[2]
    np.testing.assert_array_equal(apply_postprocessing(pred, decision, spacing), truth)
    with pytest.raises(ValueError, match="spacing is needed"):
        apply_postprocessing(pred, decision)
    assert "tumour: drop components < 91 mm³ (Dice 0.667 → 1.000" in describe_postprocessing(
        decision
    )

    # a false tumour larger than half the smallest true one is out of the threshold's reach
    big = tumour_case(False)
    big[0][9:12, 9:12, 0:6] = 2  # 54 voxels = 216 mm³ > 256 / 2
    tables = [component_tables(p, t, [2], spacing) for p, t in [*cases[:2], big]]
    assert decide_postprocessing(tables)["classes"][2]["rule"] == "none"
    # a class no validation case has: nothing says how large it may be, no rule
    tables = [component_tables(*tumour_case(False, false_tumour=True), [2], spacing)]
    assert decide_postprocessing(tables)["min_component_mm3"] == {}


def test_decision_applies_only_when_it_improves_the_metric():
    # a small stray false positive: a volume threshold removes it (the milder rule wins
    # the tie with keeping the largest component)
    cases = [component_tables(*two_component_case(False), [1, 2]) for _ in range(2)]
    assert cases[0][1].dice() == pytest.approx(2 * 64 / (72 + 64))
    assert cases[0][2].dice() == 1.0  # tumour absent from both
    decision = decide_postprocessing(cases, ["background", "kidney", "tumor"])
    assert decision["classes"][1]["rule"] == "min_volume"
    assert decision["classes"][1]["name"] == "kidney" and decision["classes"][1]["apply"]
    assert not decision["classes"][2]["apply"]

    # a false positive too large for the threshold (40 > 64 / 2 voxels): keep the largest
    stray = (slice(5, 8), slice(6, 10), slice(6, 10))  # 48 voxels
    cases = [component_tables(*two_component_case(False, stray), [1]) for _ in range(2)]
    decision = decide_postprocessing(cases)
    assert decision["keep_largest_component"] == [1] and decision["min_component_mm3"] == {}
    pred, truth = two_component_case(False, stray)
    np.testing.assert_array_equal(apply_postprocessing(pred, decision), truth)

    # the second component is real: removing it lowers Dice -> no rule
    cases = [component_tables(*two_component_case(True), [1]) for _ in range(2)]
    assert cases[0][1].dice() == 1.0
    assert cases[0][1].dice(cases[0][1].largest()) == pytest.approx(2 * 64 / (64 + 72))
    decision = decide_postprocessing(cases)
    assert decision["classes"][1]["rule"] == "none" and decision["keep_largest_component"] == []
    assert describe_postprocessing(decision) == "none (no rule raised the validation Dice)"

    # keeping the largest helps one case (a 40-voxel false blob) less than it hurts
    # another (a real 48-voxel one) -> the mean decides, no rule
    helped = component_tables(
        *two_component_case(False, (slice(6, 8), slice(5, 10), slice(6, 10))), [1]
    )
    hurt = component_tables(*two_component_case(True, stray), [1])
    gain = helped[1].dice(helped[1].largest()) - helped[1].dice()
    loss = hurt[1].dice() - hurt[1].dice(hurt[1].largest())
    assert 0 < gain < loss
    assert decide_postprocessing([helped, hurt])["classes"][1]["rule"] == "none"


def test_apply_postprocessing_and_json_round_trip(tmp_path):
    pred, truth = two_component_case(False, (slice(5, 8), slice(6, 10), slice(6, 10)))
    cases = [component_tables(pred, truth, [1])]
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
    (tmp_path / "bad.json").write_text('{"keep_largest_component": [], "min_component_mm3": [3]}')
    with pytest.raises(ValueError, match="bad.json: 'min_component_mm3' must map"):
        load_postprocessing(tmp_path / "bad.json")
