"""kits_phantom builder: TFDS's standard checks on `tiny`, determinism and fingerprint;
the pinned default phantom stream and the knobs of the `hard` config's phantom."""

import dataclasses
import hashlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from medseg_datasets import kits_phantom
from medseg_datasets.kits_phantom.phantom import HU, PhantomSpec, make_case
from scipy import ndimage

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


CONFIGS = {config.name: config for config in kits_phantom.Builder.BUILDER_CONFIGS}
# the hard phantom at 64 px and 60-80 mm: the same knobs, small and fast cases
HARD = dataclasses.replace(CONFIGS["hard"].phantom_spec(), inplane=64, z_extent_mm=(60.0, 80.0))
DEFAULT = PhantomSpec(inplane=64, z_extent_mm=(60.0, 80.0))


def sha256(array):
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


@pytest.mark.parametrize(
    ("config", "shape", "spacing", "image_sha", "label_sha"),
    [
        (
            "tiny",
            (15, 48, 48),
            (3.2908, 0.8829, 0.8829),
            "abdf00ddd781085915651110eb640c1d5f178e44b9b1bd9106c13eb9c9804902",
            "12f32be17f070558256da136bd1054f483705e72572e6470a99c2da29e07fe6d",
        ),
        (
            "small",
            (37, 160, 160),
            (3.2908, 0.8829, 0.8829),
            "247d9c79cac04c75b30c484cede1626d81cee980019b5a8b156c3db61dc0f217",
            "5ce32ff894500ee5b5586e8492fa74605cb514c7c01d271742f9770c6f467946",
        ),
    ],
    ids=["tiny", "small"],
)
def test_default_phantom_stream_is_pinned(config, shape, spacing, image_sha, label_sha):
    # Pins the default phantom stream: these hashes of case 0 were computed before the
    # hard knobs were added to PhantomSpec, so tiny/small/kits/bench cases are unchanged
    # bit for bit. A change here changes every built dataset (bump the builder VERSION).
    image, label, case_spacing = make_case((0, 0), CONFIGS[config].phantom_spec())
    assert image.shape == shape and case_spacing == spacing
    assert sha256(image) == image_sha
    assert sha256(label) == label_sha


def test_only_the_hard_config_turns_the_knobs_on():
    knobs = ("tumour_probability", "noise_sigma", "tumour_hu", "tumour_texture_hu")
    knobs += ("tumour_size", "kidney_shape_noise", "renal_sinus_size", "bias_field")
    default = PhantomSpec()
    for name in ("tiny", "small", "kits", "bench"):
        spec = CONFIGS[name].phantom_spec()
        assert all(getattr(spec, knob) == getattr(default, knob) for knob in knobs), name
    hard = CONFIGS["hard"].phantom_spec()
    assert (hard.inplane, hard.z_extent_mm, CONFIGS["hard"].num_cases) == (160, (115.0, 125.0), 24)
    assert hard.tumour_probability == 0.67 and hard.noise_sigma == 20.0
    assert (hard.tumour_hu, hard.tumour_texture_hu, hard.tumour_size) == (125.0, 22.0, (0.3, 0.95))
    assert hard.kidney_shape_noise == 0.15 and hard.renal_sinus_size == (0.35, 0.5)
    assert hard.bias_field == 0.015
    assert kits_phantom.Builder(config="hard").builder_config.name == "hard"


def test_hard_tumours_are_slightly_darker_than_the_kidney():
    differences = {}
    for seed in range(20):
        image, label, _ = make_case((5, seed), HARD)
        if (label == 2).sum() >= 20:
            differences[seed] = image[label == 2].mean() - image[label == 1].mean()
        if len(differences) == 5:
            break
    assert len(differences) == 5
    for seed, difference in differences.items():
        assert -40 < difference < -10, (seed, difference)
    assert np.mean(list(differences.values())) == pytest.approx(-25.0, abs=8)
    # a default case's tumour is 60 HU darker: outside the hard range
    image, label, _ = make_case((5, next(iter(differences))), DEFAULT)
    assert image[label == 2].mean() - image[label == 1].mean() < -45


def test_renal_sinus_fat_makes_the_kidney_medially_hollow():
    no_sinus = dataclasses.replace(HARD, renal_sinus_size=(0.0, 0.0))
    for seed in range(3):
        image, label, _ = make_case((5, seed), HARD)
        plain_image, plain_label, _ = make_case((5, seed), no_sinus)
        # the sinus takes kidney voxels away, as background fat; nothing else changes
        sinus = (plain_label == 1) & (label == 0)
        assert 0.03 < sinus.sum() / (plain_label == 1).sum() < 0.25
        assert image[sinus].mean() < -50
        assert not ((label == 1) & (plain_label != 1)).any()
        unchanged = ~sinus & (label != 2)
        np.testing.assert_array_equal(image[unchanged], plain_image[unchanged])
        # at the medial side: closer to the spine (the middle column) than the kidney
        kidney_cols = np.nonzero(plain_label == 1)[2]
        assert np.abs(np.nonzero(sinus)[2] - 31.5).mean() < np.abs(kidney_cols - 31.5).mean() - 2
        # inside each kidney's bounding box, more background is fat than without it
        components, _ = ndimage.label(plain_label > 0)
        for box in ndimage.find_objects(components)[:2]:
            fat = np.mean((label[box] == 0) & (image[box] < -50))
            plain_fat = np.mean((plain_label[box] == 0) & (plain_image[box] < -50))
            assert fat > plain_fat + 0.01


def test_hard_kidney_outlines_are_irregular():
    smooth = dataclasses.replace(HARD, kidney_shape_noise=0.0)
    for seed in range(3):
        kidney = make_case((5, seed), HARD)[1] > 0
        ellipsoid = make_case((5, seed), smooth)[1] > 0
        assert 0.8 < kidney.sum() / ellipsoid.sum() < 1.3  # about the same size ...
        assert (kidney ^ ellipsoid).sum() > 0.15 * ellipsoid.sum()  # ... but another shape


def test_a_third_of_hard_cases_are_tumour_free():
    small = dataclasses.replace(HARD, inplane=32, z_extent_mm=(30.0, 40.0))
    seeds = range(120)
    # every drawn tumour shows in the label, so the label counts the draw
    certain = dataclasses.replace(small, tumour_probability=1.0)
    assert all((make_case((6, seed), certain)[1] == 2).any() for seed in seeds[:30])
    free = np.mean([not (make_case((6, seed), small)[1] == 2).any() for seed in seeds])
    assert 0.22 < free < 0.45
    default = dataclasses.replace(DEFAULT, inplane=32, z_extent_mm=(30.0, 40.0))
    free_default = np.mean([not (make_case((6, seed), default)[1] == 2).any() for seed in seeds])
    assert free_default < 0.27 < free


def soft_tissue_block_std(image, label, block=8):
    """Std over 8^3 blocks of their mean soft-tissue HU: noise averages out, a bias stays."""
    soft = (label == 0) & (image > -40) & (image < 130)
    means = []
    for z in range(0, image.shape[0] - block + 1, block):
        for y in range(0, image.shape[1] - block + 1, block):
            for x in range(0, image.shape[2] - block + 1, block):
                part = (slice(z, z + block), slice(y, y + block), slice(x, x + block))
                if soft[part].sum() >= 100:
                    means.append(image[part][soft[part]].mean())
    assert len(means) > 20
    return float(np.std(means))


def test_hard_bias_field_varies_smoothly_and_spares_air():
    no_bias = dataclasses.replace(HARD, bias_field=0.0)
    for seed in range(3):
        image, label, _ = make_case((5, seed), HARD)
        biased = soft_tissue_block_std(image, label)
        assert biased > 2.5 * soft_tissue_block_std(*make_case((5, seed), no_bias)[:2])
        assert biased > 2.5 * soft_tissue_block_std(*make_case((5, seed), DEFAULT)[:2])
        assert biased > 2.0
        # air is scaled by nothing: HU + 1000 is 0 there
        assert np.median(image[:, 0, 0]) == pytest.approx(HU["air"], abs=15)


def test_hard_spec_validation():
    with pytest.raises(ValueError, match="renal_sinus_size"):
        PhantomSpec(renal_sinus_size=(0.5, 1.2))
    with pytest.raises(ValueError, match="tumour_size"):
        PhantomSpec(tumour_size=(0.0, 0.5))
    with pytest.raises(ValueError, match="bias_field"):
        PhantomSpec(bias_field=-0.1)


if __name__ == "__main__":
    tfds.testing.test_main()
