"""The tf.data pipeline on the tiny phantom dataset."""

import numpy as np
import pytest
import tensorflow as tf

from medseg import datasets
from medseg.config import PatchConfig, PreprocessConfig
from medseg.pipeline import (
    check_patch_fits,
    plan_preprocessing,
    preprocessed_cases,
    read_case_ids,
    read_cases,
    split_cases,
    training_dataset,
    validation_dataset,
)


@pytest.fixture(scope="module")
def setup(tiny_data_dir):
    builder = datasets.get_builder("kits_phantom", "tiny", tiny_data_dir)
    fingerprint = datasets.read_fingerprint(builder)
    plan = plan_preprocessing(PreprocessConfig(target_spacing=(4.0, 2.0, 2.0)), fingerprint)
    return builder, fingerprint, plan


def test_split_is_seeded_disjoint_and_complete():
    ids = [f"case_{i:05d}" for i in range(10)]
    train, val = split_cases(ids, 0.25, seed=1)
    assert sorted(train + val) == ids and not set(train) & set(val)
    assert len(val) == 2
    assert split_cases(ids, 0.25, seed=1) == (train, val)
    assert split_cases(ids, 0.25, seed=2) != (train, val)
    assert split_cases(ids[:2], 0.01, seed=0)[1]  # at least one validation case
    with pytest.raises(ValueError, match="validation_fraction"):
        split_cases(ids, 1.0, seed=0)


def test_read_cases_filters_by_id(setup):
    builder, _, _ = setup
    ids = read_case_ids(builder, "train")
    assert len(ids) == 4
    got = [ex["case_id"].decode() for ex in read_cases(builder, "train", ids[1:3]).as_numpy_iterator()]
    assert sorted(got) == sorted(ids[1:3])


def test_patch_larger_than_volume_is_a_clear_error(setup):
    builder, fingerprint, plan = setup
    with pytest.raises(ValueError, match=r"patch size \(64, 64, 64\) is larger than the preprocessed"):
        check_patch_fits(fingerprint, plan, (64, 64, 64), builder.info.full_name)
    check_patch_fits(fingerprint, plan, (4, 8, 8))


def _cases(builder, plan, ids, seed=0):
    return preprocessed_cases(builder, "train", ids, plan, num_classes=3, seed=seed)


def test_training_batches_shapes_one_hot_and_foreground(setup):
    builder, _, plan = setup
    ids = read_case_ids(builder, "train")
    patch = PatchConfig(patch_size=(4, 8, 8), batch_size=2, foreground_share=1.0)
    ds = training_dataset(_cases(builder, plan, ids), len(ids), patch, 3, seed=0)
    n_fg = 0
    for image, onehot in ds.take(10):
        assert image.shape == (2, 4, 8, 8, 1) and image.dtype == tf.float32
        assert onehot.shape == (2, 4, 8, 8, 3)
        np.testing.assert_array_equal(tf.reduce_sum(onehot, -1).numpy(), 1.0)
        n_fg += int(np.sum(np.any(onehot.numpy()[..., 1:] > 0, axis=(1, 2, 3, 4))))
    assert n_fg == 20  # every patch centred on foreground


def test_same_seed_same_batches_other_seed_other_batches(setup):
    builder, _, plan = setup
    ids = read_case_ids(builder, "train")
    patch = PatchConfig(patch_size=(4, 8, 8), batch_size=2)

    def first_batches(seed):
        ds = training_dataset(_cases(builder, plan, ids, seed), len(ids), patch, 3, seed=seed)
        return [b[0].numpy() for b in ds.take(3)]

    a, b, c = first_batches(5), first_batches(5), first_batches(6)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_validation_patches_are_fixed(setup):
    builder, _, plan = setup
    ids = read_case_ids(builder, "train")[:2]
    patch = PatchConfig(patch_size=(4, 8, 8), batch_size=2, validation_patches=3)
    ds = validation_dataset(_cases(builder, plan, ids), 2, patch, 3, seed=0)
    first = [x.numpy() for x, _ in ds]
    second = [x.numpy() for x, _ in ds]
    assert sum(len(x) for x in first) == 6
    # an odd patch count is rounded up to whole batches by cycling
    odd = PatchConfig(patch_size=(4, 8, 8), batch_size=4, validation_patches=3)
    batches = [x.numpy() for x, _ in validation_dataset(_cases(builder, plan, ids), 2, odd, 3, 0)]
    assert [len(b) for b in batches] == [4, 4]
    np.testing.assert_array_equal(batches[1][2:], batches[0][:2])
    for x, y in zip(first, second, strict=True):
        np.testing.assert_array_equal(x, y)
