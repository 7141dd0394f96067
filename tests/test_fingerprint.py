"""FingerprintAccumulator against numpy computed on all cases at once."""

import json

import numpy as np
import pytest

from medseg.datasets.fingerprint import FingerprintAccumulator, fingerprint_hash

CLASSES = ["background", "kidney", "tumour"]


def random_cases(seed=0, count=4):
    """Cases of different shapes with int16 images and labels 0..2 (one without tumour)."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        shape = (int(rng.integers(3, 7)), int(rng.integers(5, 9)), int(rng.integers(5, 9)))
        image = rng.normal(100, 300, size=shape).round().astype(np.int16)
        label = rng.choice(3, size=shape, p=[0.7, 0.2, 0.1]).astype(np.uint8)
        if i == 1:
            label[label == 2] = 0
        spacing = (float(rng.uniform(2.5, 5)), *[float(rng.uniform(0.6, 0.9))] * 2)
        cases.append((image, label, spacing))
    return cases


def accumulate(cases, **kwargs):
    acc = FingerprintAccumulator(CLASSES, **kwargs)
    for image, label, spacing in cases:
        acc.add(image, label, spacing)
    return acc.result()


def test_matches_numpy_on_concatenation():
    cases = random_cases()
    fp = accumulate(cases, samples_per_case=10_000)  # above every case's foreground

    labels = np.concatenate([label.ravel() for _, label, _ in cases])
    foreground = np.concatenate([image[label > 0] for image, label, _ in cases]).astype(float)
    assert fp["num_cases"] == 4
    assert fp["class_names"] == CLASSES
    assert fp["class_voxel_counts"] == np.bincount(labels, minlength=3).tolist()
    assert fp["class_case_counts"] == [4, 4, 3]
    assert fp["shapes"] == [list(label.shape) for _, label, _ in cases]
    assert fp["spacings"] == [list(spacing) for *_, spacing in cases]
    np.testing.assert_array_equal(fp["spacing_median"], np.median([s for *_, s in cases], axis=0))
    np.testing.assert_array_equal(
        fp["shape_median"], np.median([label.shape for _, label, _ in cases], axis=0)
    )

    stats = fp["foreground_intensity"]
    assert stats["num_voxels"] == stats["num_samples"] == foreground.size
    assert stats["mean"] == pytest.approx(foreground.mean(), rel=1e-12)
    assert stats["std"] == pytest.approx(foreground.std(), rel=1e-12)
    assert stats["min"] == foreground.min()
    assert stats["max"] == foreground.max()
    # every foreground voxel is in the sample, so the percentiles are exact
    assert stats["percentile_00_5"] == np.percentile(foreground, 0.5)
    assert stats["percentile_99_5"] == np.percentile(foreground, 99.5)
    assert stats["median"] == np.median(foreground)
    json.dumps(fp, allow_nan=False)  # plain JSON types only


def test_mean_and_std_stay_exact_for_offset_intensities():
    # a large common offset is where sum-of-squares formulas lose precision
    rng = np.random.default_rng(3)
    cases = [
        (rng.normal(30000.0, 1.0, size=(4, 50, 50)), np.ones((4, 50, 50), np.uint8), (1, 1, 1))
        for _ in range(3)
    ]
    fp = accumulate(cases)
    foreground = np.concatenate([image.ravel() for image, _, _ in cases])
    stats = fp["foreground_intensity"]
    assert stats["mean"] == pytest.approx(foreground.mean(), rel=1e-12)
    assert stats["std"] == pytest.approx(foreground.std(), rel=1e-9)


def test_sampling_is_seeded_and_bounded():
    cases = random_cases(seed=1)
    small = accumulate(cases, samples_per_case=5, seed=5)
    assert small["foreground_intensity"]["num_samples"] == 5 * len(cases)
    assert small == accumulate(cases, samples_per_case=5, seed=5)
    exact = accumulate(cases, samples_per_case=10_000)
    for key in ("mean", "std", "min", "max", "num_voxels"):  # not sampled
        assert small["foreground_intensity"][key] == exact["foreground_intensity"][key]
    lo, hi = exact["foreground_intensity"]["min"], exact["foreground_intensity"]["max"]
    for key in ("percentile_00_5", "percentile_99_5", "median"):
        assert lo <= small["foreground_intensity"][key] <= hi


def test_case_without_foreground_contributes_no_intensities():
    cases = random_cases()
    empty = (np.full((3, 4, 4), 500, np.int16), np.zeros((3, 4, 4), np.uint8), (3.0, 1, 1))
    with_empty = accumulate([cases[0], empty, *cases[1:]])
    without = accumulate(cases)
    assert with_empty["num_cases"] == 5
    assert with_empty["class_case_counts"] == [5, 4, 3]
    assert with_empty["class_voxel_counts"][0] == without["class_voxel_counts"][0] + 48
    intensity_keys = ("mean", "std", "min", "max", "num_voxels")
    for key in intensity_keys:
        assert with_empty["foreground_intensity"][key] == without["foreground_intensity"][key]


def test_no_foreground_at_all_gives_none_statistics():
    label = np.zeros((2, 3, 3), np.uint8)
    fp = accumulate([(np.zeros((2, 3, 3), np.int16), label, (2.0, 1.0, 1.0))] * 2)
    stats = fp["foreground_intensity"]
    for key in ("mean", "std", "min", "max", "percentile_00_5", "percentile_99_5", "median"):
        assert stats[key] is None
    assert stats["num_voxels"] == 0
    assert fp["class_case_counts"] == [2, 0, 0]
    json.dumps(fp, allow_nan=False)


def test_no_cases():
    fp = FingerprintAccumulator(CLASSES).result()
    assert fp["num_cases"] == 0 and fp["spacing_median"] is None
    assert fp["foreground_intensity"]["mean"] is None


def test_rejects_bad_input():
    acc = FingerprintAccumulator(CLASSES)
    with pytest.raises(ValueError, match="label values \\[3\\]"):
        acc.add(np.zeros((2, 2, 2)), np.full((2, 2, 2), 3, np.uint8), (1, 1, 1))
    with pytest.raises(ValueError, match="shape"):
        acc.add(np.zeros((2, 2, 2)), np.zeros((2, 2, 3), np.uint8), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        acc.add(np.zeros((2, 2, 2)), np.zeros((2, 2, 2), np.uint8), (1, 1))
    assert acc.num_cases == 0


def test_hash_is_stable_and_content_sensitive():
    fp = accumulate(random_cases())
    digest = fingerprint_hash(fp)
    assert len(digest) == 16 and int(digest, 16) >= 0
    # key order and a JSON round trip do not change it
    reordered = json.loads(json.dumps(dict(reversed(list(fp.items())))))
    assert fingerprint_hash(reordered) == digest
    changed = json.loads(json.dumps(fp))
    changed["foreground_intensity"]["mean"] += 1e-9
    assert fingerprint_hash(changed) != digest
    changed = json.loads(json.dumps(fp))
    changed["spacings"][0][0] = 1.0
    assert fingerprint_hash(changed) != digest


def test_the_fingerprint_record_reads_typed_values_and_names_a_missing_key(tiny_data_dir):
    from medseg import datasets
    from medseg.datasets import Fingerprint

    builder = datasets.get_builder("kits_phantom", "tiny", tiny_data_dir)
    fp = datasets.read_fingerprint(builder)
    assert isinstance(fp, Fingerprint) and isinstance(fp, dict)
    assert json.loads(json.dumps(fp)) == dict(fp)  # still the JSON object it was
    assert fp.hash == fingerprint_hash(dict(fp))
    assert fp.num_cases == fp["num_cases"] == len(fp.spacings)
    assert fp.class_names == ["background", "kidney", "tumour"] and fp.num_classes == 3
    np.testing.assert_array_equal(fp.spacings, np.asarray(fp["spacings"], float))
    assert fp.shapes.shape == fp.spacings.shape  # channels dropped
    assert fp.intensity_channels == [fp["foreground_intensity"]]
    assert Fingerprint.of(fp) is fp
    older = Fingerprint.of({k: v for k, v in fp.items() if k != "spacings"}, "fingerprint of x")
    with pytest.raises(ValueError, match="fingerprint of x has no 'spacings'"):
        _ = older.spacings
    with pytest.raises(ValueError, match="expected a JSON object"):
        Fingerprint.of([1, 2])
