"""kits_phantom builder: TFDS's standard checks on `tiny`, determinism and fingerprint."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from medseg_datasets import kits_phantom

from medseg.datasets import get_builder, read_fingerprint
from medseg.datasets.fingerprint import FingerprintAccumulator, fingerprint_hash
from medseg.io import kits19_affine


class KitsPhantomTest(tfds.testing.DatasetBuilderTestCase):
    """Builds `tiny` into a temporary dir, reads it back and reloads it."""

    DATASET_CLASS = kits_phantom.Builder
    BUILDER_CONFIG_NAMES_TO_TEST = ["tiny"]
    SPLITS = {"train": 4}


def build_tiny(data_dir):
    builder = kits_phantom.Builder(config="tiny", data_dir=str(data_dir))
    builder.download_and_prepare()
    return builder


def read_records(builder):
    """Every example of `train`, keyed by case id, as numpy."""
    records = {}
    for example in tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False)):
        records[example["case_id"].decode()] = example
    return records


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Two independent builds of `tiny` with the same seed."""
    first = tmp_path_factory.mktemp("tfds_a")
    second = tmp_path_factory.mktemp("tfds_b")
    build_tiny(first)
    build_tiny(second)
    return first, second


def test_records(tiny_dirs):
    records = read_records(get_builder("kits_phantom", "tiny", data_dir=str(tiny_dirs[0])))
    assert sorted(records) == [f"case_{i:05d}" for i in range(4)]
    for example in records.values():
        image, label = example["image"], example["label"]
        assert image.dtype == np.int16 and label.dtype == np.uint8
        assert image.shape == label.shape and image.shape[1:] == (48, 48)
        assert 10 <= image.shape[0] <= 21
        assert set(np.unique(label).tolist()) <= {0, 1, 2}
        assert example["spacing"].dtype == np.float32
        np.testing.assert_array_equal(example["affine"], kits19_affine(example["spacing"]))


def test_two_builds_with_one_seed_are_identical(tiny_dirs):
    first, second = (
        read_records(get_builder("kits_phantom", "tiny", data_dir=str(d))) for d in tiny_dirs
    )
    assert first.keys() == second.keys()
    for case_id, example in first.items():
        assert example.keys() == second[case_id].keys()
        for key, value in example.items():
            other = second[case_id][key]
            assert np.asarray(value).dtype == np.asarray(other).dtype, (case_id, key)
            np.testing.assert_array_equal(value, other, err_msg=f"{case_id}/{key}")


def test_stored_fingerprint_matches_the_records(tiny_dirs):
    fresh = get_builder("kits_phantom", "tiny", data_dir=str(tiny_dirs[0]))
    stored = read_fingerprint(fresh)

    recomputed = FingerprintAccumulator(["background", "kidney", "tumour"], seed=0)
    records = read_records(fresh)
    for case_id in sorted(records):  # generation order: the per-case sample seeds follow it
        example = records[case_id]
        recomputed.add(example["image"], example["label"], example["spacing"])
    assert stored == recomputed.result()
    assert stored["num_cases"] == 4
    assert fresh.info.metadata["fingerprint_hash"] == fingerprint_hash(stored)
    assert fresh.info.metadata["class_names"] == ["background", "kidney", "tumour"]
    # both builds of one seed store the same fingerprint
    other = read_fingerprint(get_builder("kits_phantom", "tiny", data_dir=str(tiny_dirs[1])))
    assert fingerprint_hash(other) == fingerprint_hash(stored)


def test_fingerprint_of_an_unbuilt_dataset_is_a_clear_error(tmp_path):
    builder = get_builder("kits_phantom", "tiny", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not built") as err:
        read_fingerprint(builder)
    assert str(tmp_path) in str(err.value)


def test_capped_build_stores_the_fingerprint_of_what_it_wrote(tmp_path):
    builder = kits_phantom.Builder(config="tiny", data_dir=str(tmp_path))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(max_examples_per_split=2)
    )
    fresh = get_builder("kits_phantom", "tiny", data_dir=str(tmp_path))
    assert fresh.info.splits["train"].num_examples == 2
    assert read_fingerprint(fresh)["num_cases"] == 2


def test_unknown_dataset_and_config_errors_list_the_choices():
    with pytest.raises(ValueError, match="'nope'.*known datasets: .*kits_phantom"):
        get_builder("nope")
    with pytest.raises(ValueError, match="'huge'.*tiny, small, kits"):
        get_builder("kits_phantom", "huge")


def test_default_config_is_small():
    assert get_builder("kits_phantom").builder_config.name == "small"


if __name__ == "__main__":
    tfds.testing.test_main()
