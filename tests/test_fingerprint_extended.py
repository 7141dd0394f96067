"""Fingerprint extensions: spacing and shape distribution, multi-channel intensities."""

import json

import numpy as np
import pytest

from medseg.datasets.fingerprint import FingerprintAccumulator

CLASSES = ["background", "a", "b"]


def random_cases(seed=0, count=7, channels=None):
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(count):
        shape = tuple(int(n) for n in rng.integers(3, 9, size=3))
        image_shape = shape if channels is None else (*shape, channels)
        image = rng.normal(50, 200, size=image_shape).astype(np.float32)
        if channels is not None:
            image += np.arange(channels, dtype=np.float32) * 1000  # channels differ
        label = rng.choice(3, size=shape, p=[0.6, 0.3, 0.1]).astype(np.uint8)
        spacing = tuple(float(v) for v in rng.uniform([1.0, 0.5, 0.5], [5.0, 1.0, 1.0]))
        cases.append((image, label, spacing))
    return cases


def accumulate(cases, **kwargs):
    acc = FingerprintAccumulator(CLASSES, **kwargs)
    for case in cases:
        acc.add(*case)
    return acc.result()


def test_spacing_and_shape_distribution_match_numpy():
    cases = random_cases()
    fp = accumulate(cases)
    spacings = np.array([s for *_, s in cases])
    shapes = np.array([label.shape for _, label, _ in cases])
    assert fp["spacing_min"] == spacings.min(axis=0).tolist()
    assert fp["spacing_max"] == spacings.max(axis=0).tolist()
    np.testing.assert_array_equal(fp["spacing_percentile_10"], np.percentile(spacings, 10, axis=0))
    np.testing.assert_array_equal(fp["spacing_percentile_90"], np.percentile(spacings, 90, axis=0))
    assert fp["shape_min"] == shapes.min(axis=0).tolist()
    assert fp["shape_max"] == shapes.max(axis=0).tolist()
    assert all(type(v) is int for v in fp["shape_min"] + fp["shape_max"])
    json.dumps(fp, allow_nan=False)


def test_no_cases_gives_none_ranges():
    fp = FingerprintAccumulator(CLASSES).result()
    for key in ("spacing_min", "spacing_max", "spacing_percentile_10", "shape_min", "shape_max"):
        assert fp[key] is None
    assert "foreground_intensity_per_channel" not in fp


def test_single_channel_keys_unchanged_by_a_trailing_channel_axis():
    cases = random_cases(count=3)
    plain = accumulate(cases, samples_per_case=20)
    with_axis = accumulate([(i[..., None], lab, s) for i, lab, s in cases], samples_per_case=20)
    assert plain == with_axis
    assert "foreground_intensity_per_channel" not in plain


@pytest.mark.parametrize("samples_per_case", [10_000, 15])
def test_multichannel_intensities_per_channel(samples_per_case):
    cases = random_cases(channels=3)
    fp = accumulate(cases, samples_per_case=samples_per_case)
    per_channel = fp["foreground_intensity_per_channel"]
    assert len(per_channel) == 3
    assert fp["foreground_intensity"] == per_channel[0]
    for channel, stats in enumerate(per_channel):
        foreground = np.concatenate(
            [image[..., channel][label > 0] for image, label, _ in cases]
        ).astype(np.float64)
        assert stats["num_voxels"] == foreground.size
        assert stats["mean"] == pytest.approx(foreground.mean(), rel=1e-12)
        assert stats["std"] == pytest.approx(foreground.std(), rel=1e-9)
        assert stats["min"] == foreground.min() and stats["max"] == foreground.max()
        if samples_per_case >= foreground.size:  # everything sampled: exact percentiles
            assert stats["median"] == np.median(foreground)
            assert stats["percentile_99_5"] == np.percentile(foreground, 99.5)
        else:
            sizes = [int((label > 0).sum()) for _, label, _ in cases]
            assert stats["num_samples"] == sum(min(n, samples_per_case) for n in sizes)
            assert stats["min"] <= stats["median"] <= stats["max"]
    # the channel-0 statistics equal those of the channel-0 images alone: the sampled
    # voxels are drawn the same way with one channel or many
    alone = accumulate(
        [(i[..., 0], lab, s) for i, lab, s in cases], samples_per_case=samples_per_case
    )
    assert alone["foreground_intensity"] == fp["foreground_intensity"]


def test_multichannel_shape_and_channel_count_are_checked():
    acc = FingerprintAccumulator(CLASSES)
    label = np.zeros((2, 3, 4), np.uint8)
    with pytest.raises(ValueError, match="shape"):
        acc.add(np.zeros((2, 3, 5, 2)), label, (1, 1, 1))
    acc.add(np.zeros((2, 3, 4, 2)), label, (1, 1, 1))
    with pytest.raises(ValueError, match="channel"):
        acc.add(np.zeros((2, 3, 4, 3)), label, (1, 1, 1))
    assert acc.num_cases == 1


def _layout_by_hand(label, num_classes):
    """class_layout's definition, voxel by voxel with np.nonzero."""
    out = []
    for axis in range(label.ndim):
        where = np.nonzero(label > 0)
        coords = where[axis].astype(np.float64)
        classes = label[where]
        centre, spread = coords.mean(), coords.std()
        present = [c for c in range(1, num_classes) if (classes == c).any()]
        if len(present) < 2 or spread == 0:
            out.append(0.0)
            continue
        distance = sum((classes == c).sum() * abs(coords[classes == c].mean() - centre)
                       for c in present)
        out.append(distance / (len(coords) * spread))
    return out


def test_class_layout_is_its_definition_and_tells_bilateral_from_front_to_back():
    from medseg.datasets.fingerprint import class_layout

    rng = np.random.default_rng(5)
    label = rng.integers(0, 4, size=(9, 11, 7)).astype(np.uint8)
    np.testing.assert_allclose(class_layout(label, 4), _layout_by_hand(label, 4), rtol=1e-9)
    np.testing.assert_allclose(  # Fortran order (as NIfTI reads) changes nothing
        class_layout(np.asfortranarray(label), 4), _layout_by_hand(label, 4), rtol=1e-9
    )
    # two "lobes" one behind the other along axis 1, each spanning both halves of axis 0
    lobes = np.zeros((20, 30, 10), np.uint8)
    lobes[2:18, 3:14, 2:8] = 1
    lobes[2:18, 16:27, 2:8] = 2
    layout = class_layout(lobes, 3)
    assert layout[1] > 0.8 and layout[0] < 0.05 and layout[2] < 0.05
    # one class on both sides (kidneys): no layout along any axis
    kidneys = np.zeros((20, 30, 10), np.uint8)
    kidneys[2:8, 5:25, 2:8] = 1
    kidneys[12:18, 5:25, 2:8] = 1
    assert class_layout(kidneys, 3) == [0.0, 0.0, 0.0]


def test_class_layout_subsamples_large_labels_with_one_stride():
    from medseg.datasets.fingerprint import LAYOUT_VOXELS, class_layout

    lobes = np.zeros((80, 80, 80), np.uint8)  # 512 000 voxels: stride 2
    assert lobes.size > LAYOUT_VOXELS
    lobes[10:70, 10:38, 10:70] = 1
    lobes[10:70, 42:70, 10:70] = 2
    np.testing.assert_allclose(
        class_layout(lobes, 3), _layout_by_hand(lobes[::2, ::2, ::2], 3), rtol=1e-9
    )


def test_fingerprint_records_each_cases_class_layout():
    from medseg.datasets.fingerprint import Fingerprint, FingerprintAccumulator, class_layout

    acc = FingerprintAccumulator(["background", "a", "b"])
    rng = np.random.default_rng(2)
    labels = [rng.integers(0, 3, size=(6, 7, 8)).astype(np.uint8) for _ in range(3)]
    for label in labels:
        acc.add(np.zeros(label.shape, np.int16), label, (1.0, 1.0, 1.0))
    fp = Fingerprint.of(acc.result())
    np.testing.assert_allclose(fp.class_layouts, [class_layout(lab, 3) for lab in labels])
    # a fingerprint of an older build has none
    old = {k: v for k, v in acc.result().items() if k != "class_layouts"}
    assert Fingerprint.of(old).class_layouts is None
