"""HD95, average surface distance and surface Dice against a brute-force numpy reference.

The reference finds surfaces by looking at the six face neighbours of every voxel (outside
the array counts as background: the definition in medseg.evaluation.surface), takes every
pairwise distance between surface-voxel centres in mm, and reduces those with numpy.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import ndimage

from medseg.evaluation import (
    dice_region,
    directed_surface_distances,
    score_case,
    surface_distance_metrics,
    surface_voxels,
)


def reference_surface(mask):
    """Voxels of ``mask`` with a face neighbour outside it, by explicit neighbour checks."""
    padded = np.pad(mask, 1, constant_values=False)
    surface = np.zeros_like(mask)
    for index in itertools.product(*(range(n) for n in mask.shape)):
        if not mask[index]:
            continue
        centre = np.array(index) + 1
        for axis in range(mask.ndim):
            for step in (-1, 1):
                neighbour = centre.copy()
                neighbour[axis] += step
                if not padded[tuple(neighbour)]:
                    surface[index] = True
    return surface


def reference_metrics(a, b, spacing, tolerance, percentile=95):
    pa = np.argwhere(reference_surface(a)) * np.asarray(spacing)
    pb = np.argwhere(reference_surface(b)) * np.asarray(spacing)
    pairwise = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    a_to_b, b_to_a = pairwise.min(axis=1), pairwise.min(axis=0)
    pooled = np.concatenate([a_to_b, b_to_a])
    return {
        "hd95": np.percentile(pooled, percentile),
        "asd": pooled.mean(),
        "surface_dice": ((a_to_b <= tolerance).sum() + (b_to_a <= tolerance).sum()) / pooled.size,
    }, (a_to_b, b_to_a)


def random_blob(rng, shape, density=0.5):
    """A lumpy random mask (it may touch the array border, which counts as surface)."""
    noise = ndimage.uniform_filter(rng.random(shape), size=3)
    return noise > np.quantile(noise, 1 - density)


def test_surface_matches_neighbour_definition():
    rng = np.random.default_rng(1)
    for _ in range(3):
        mask = random_blob(rng, (5, 6, 7), 0.4)
        np.testing.assert_array_equal(surface_voxels(mask), reference_surface(mask))
    # a solid 3x3x3 cube has one interior voxel; at the array border every voxel is surface
    cube = np.zeros((5, 5, 5), bool)
    cube[1:4, 1:4, 1:4] = True
    assert surface_voxels(cube).sum() == 26 and not surface_voxels(cube)[2, 2, 2]
    assert surface_voxels(np.ones((3, 3, 3), bool)).sum() == 26
    assert surface_voxels(np.ones((4, 4, 4), bool)).sum() == 64 - 8


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.7, 1.3)])
def test_metrics_match_brute_force_on_random_shapes(spacing):
    rng = np.random.default_rng(7)
    for trial in range(4):
        shape = (6, 7, 8)
        a = random_blob(rng, shape, 0.3)
        b = random_blob(rng, shape, 0.35) if trial % 2 else np.roll(a, 1, axis=trial % 3)
        for tolerance in (0.5, 1.45, 3.1):  # no ties with a voxel distance
            got = surface_distance_metrics(a, b, spacing, tolerance)
            want, (a_to_b, b_to_a) = reference_metrics(a, b, spacing, tolerance)
            assert got["hd95"] == pytest.approx(want["hd95"], rel=1e-9)
            assert got["asd"] == pytest.approx(want["asd"], rel=1e-9)
            assert got["surface_dice"] == pytest.approx(want["surface_dice"], rel=1e-12)
        directed = directed_surface_distances(a, b, spacing)
        np.testing.assert_allclose(directed[0], a_to_b, rtol=1e-12)
        np.testing.assert_allclose(directed[1], b_to_a, rtol=1e-12)
        # the same as scipy's distance transform to the other surface, read at the surface
        to_b = ndimage.distance_transform_edt(~reference_surface(b), sampling=spacing)
        np.testing.assert_allclose(directed[0], to_b[reference_surface(a)], rtol=1e-9)
        hausdorff = surface_distance_metrics(a, b, spacing, percentile=100)["hd95"]
        assert hausdorff == pytest.approx(max(a_to_b.max(), b_to_a.max()))


def test_two_cubes_offset_by_one_slice_by_hand():
    # cubes of side 5, the second one slice further along axis 0 (1.5 mm slices, 1 mm pixels)
    a = np.zeros((9, 9, 9), bool)
    a[2:7, 2:7, 2:7] = True
    b = np.roll(a, 1, axis=0)
    spacing = (1.5, 1.0, 1.0)
    # each cube has 5^3 - 3^3 = 98 surface voxels; the side walls of the 4 shared slices
    # (4 * 16 voxels) are surface of both, every other surface voxel is >= 1 mm away
    shared = 4 * 16
    tight = surface_distance_metrics(a, b, spacing, tolerance=0.5, percentile=100)
    assert tight["surface_dice"] == pytest.approx(shared / 98)
    # the farthest surface points are the end faces' centres: one slice (1.5 mm) away,
    # closer than the side walls (2 mm)
    assert tight["hd95"] == pytest.approx(1.5)
    assert surface_distance_metrics(a, b, spacing, tolerance=1.5)["surface_dice"] == 1.0
    # identical masks: every distance 0
    same = surface_distance_metrics(a, a, spacing, tolerance=0.0)
    assert same == {"hd95": 0.0, "asd": 0.0, "surface_dice": 1.0}


def test_single_voxels_by_hand():
    a = np.zeros((4, 5, 6), bool)
    b = a.copy()
    a[0, 0, 0] = True
    b[3, 4, 5] = True
    spacing = (2.0, 1.0, 0.5)
    distance = math.sqrt(6.0**2 + 4.0**2 + 2.5**2)
    got = surface_distance_metrics(a, b, spacing, tolerance=distance - 1e-6)
    assert got["hd95"] == pytest.approx(distance)
    assert got["asd"] == pytest.approx(distance)
    assert got["surface_dice"] == 0.0


def test_empty_masks():
    empty = np.zeros((3, 4, 5), bool)
    full = empty.copy()
    full[1, 1, 1] = True
    both = surface_distance_metrics(empty, empty, (1, 1, 1))
    assert all(math.isnan(v) for v in both.values())
    diagonal = math.sqrt((3 * 2.0) ** 2 + 4**2 + 5**2)
    for pred, truth in ((full, empty), (empty, full)):
        one = surface_distance_metrics(pred, truth, (2.0, 1.0, 1.0))
        assert one == {"hd95": pytest.approx(diagonal), "asd": pytest.approx(diagonal),
                       "surface_dice": 0.0}
    with pytest.raises(ValueError, match="non-empty"):
        directed_surface_distances(empty, full, (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        directed_surface_distances(full, full, (1, 1))
    with pytest.raises(ValueError, match="shape"):
        surface_distance_metrics(full, full[:2], (1, 1, 1))


def test_score_case_uses_every_class_and_nan_for_absent_ones():
    rng = np.random.default_rng(3)
    truth = np.zeros((6, 7, 8), np.uint8)
    truth[random_blob(rng, truth.shape, 0.3)] = 1
    pred = np.roll(truth, 1, axis=2)
    pred[0, 0, 0] = 3  # class 3 predicted, absent from the truth
    spacing = (2.0, 1.0, 0.8)
    names = ["background", "kidney", "tumor", "cyst"]
    scores = score_case(pred, truth, spacing, names, {"foreground": [1, 2]}, tolerance=1.0)
    want, _ = reference_metrics(pred == 1, truth == 1, spacing, 1.0)
    assert scores["hd95_kidney"] == pytest.approx(want["hd95"])
    assert scores["asd_kidney"] == pytest.approx(want["asd"])
    assert scores["surface_dice_kidney"] == pytest.approx(want["surface_dice"])
    # tumour: absent from both maps, so every metric is NaN (as dice_per_class)
    tumor = [v for k, v in scores.items() if k.endswith("_tumor")]
    assert len(tumor) == 7 and all(math.isnan(v) for v in tumor)
    assert scores["dice_cyst"] == 0.0 and scores["surface_dice_cyst"] == 0.0
    assert scores["volume_diff_mm3_cyst"] == pytest.approx(1.6)
    assert math.isnan(scores["volume_diff_rel_cyst"])
    assert scores["dice_foreground"] == pytest.approx(dice_region(pred, truth, [1, 2]))
