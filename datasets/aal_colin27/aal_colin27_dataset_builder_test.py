"""aal_colin27 builder: real anatomy checks on Debian's mricron-data (skipped without it)."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tensorflow_datasets as tfds
from medseg_datasets.aal_colin27 import Builder
from medseg_datasets.aal_colin27 import aal_colin27_dataset_builder as module

from medseg.datasets import read_fingerprint

TEMPLATES = Path("/usr/share/mricron/templates")
DUMMY = Path(__file__).parent / "dummy_data"
needs_mricron = pytest.mark.skipif(
    not (TEMPLATES / "aal.nii.gz").is_file(),
    reason="needs Debian's mricron-data (apt-get install mricron-data)",
)


def build(config, data_dir, manual_dir=None):
    builder = Builder(config=config, data_dir=str(data_dir))
    download_config = tfds.download.DownloadConfig(manual_dir=str(manual_dir or TEMPLATES))
    builder.download_and_prepare(download_config=download_config)
    (example,) = tfds.as_numpy(builder.as_dataset(split="train"))
    return builder, example


class AalColin27DummyTest(tfds.testing.DatasetBuilderTestCase):
    """TFDS's standard checks on the synthetic stand-in in dummy_data/ (no mricron-data)."""

    DATASET_CLASS = Builder
    BUILDER_CONFIG_NAMES_TO_TEST = ["hemispheres", "lobes", "all"]
    SPLITS = {"train": 1}


def left_right_counts(example):
    """Voxels of class 1 and 2 and whether each lies left (x < 0) in world millimetres."""
    affine = example["affine"]
    out = {}
    for value in (1, 2):
        index = np.argwhere(example["label"] == value)
        world = index @ affine[:3, :3].T + affine[:3, 3]
        out[value] = (len(index), world[:, 0])
    return out


@needs_mricron
@pytest.mark.parametrize("config", ["hemispheres", "lobes", "all"])
def test_real_atlas(config, tmp_path):
    builder, example = build(config, tmp_path)
    image_file = nib.load(TEMPLATES / module.IMAGE_FILE)
    atlas_file = nib.load(TEMPLATES / module.ATLAS_FILE)
    image = np.asanyarray(image_file.dataobj)

    names = builder.info.metadata["class_names"]
    assert set(np.unique(example["label"]).tolist()) == set(range(len(names)))
    expected = {"hemispheres": 3, "lobes": len(module.LOBE_NAMES), "all": 117}[config]
    assert len(names) == expected
    # label grid == image grid == the files' grid
    assert example["label"].shape == example["image"].shape == image.shape
    np.testing.assert_allclose(example["affine"], image_file.affine)
    np.testing.assert_allclose(atlas_file.affine, image_file.affine)
    np.testing.assert_array_equal(example["image"], image)
    np.testing.assert_allclose(example["spacing"], [1.0, 1.0, 1.0])

    fingerprint = read_fingerprint(builder)
    stats = fingerprint["foreground_intensity"]
    assert image.min() <= stats["min"] <= stats["percentile_00_5"] <= stats["median"]
    assert stats["median"] <= stats["percentile_99_5"] <= stats["max"] <= image.max()
    assert image.min() < stats["mean"] < image.max()
    assert (
        fingerprint["class_voxel_counts"]
        == np.bincount(example["label"].ravel(), minlength=len(names)).tolist()
    )


@needs_mricron
def test_hemispheres_are_balanced_and_on_their_side(tmp_path):
    _, example = build("hemispheres", tmp_path)
    counts = left_right_counts(example)
    (n_left, x_left), (n_right, x_right) = counts[1], counts[2]
    assert abs(n_left - n_right) / max(n_left, n_right) < 0.15
    # RAS+: the subject's left is x < 0. Colin27's midline is not exactly the plane x = 0:
    # 2.2 % of the left regions' voxels (medial frontal and cingulate) reach x = 0..6 mm,
    # 0.2 % of the right ones x = -2..0 mm
    assert (x_left < 0).mean() > 0.97 and (x_right > 0).mean() > 0.99
    assert x_left.max() < 10 and x_right.min() > -10
    assert np.median(x_left) < -20 and np.median(x_right) > 20


@needs_mricron
def test_lobes_mapping_follows_aal_codes(tmp_path):
    _, example = build("lobes", tmp_path)
    atlas = np.asanyarray(nib.load(TEMPLATES / module.ATLAS_FILE).dataobj)
    regions = {r.name: r.value for r in module.read_regions(TEMPLATES / module.NAMES_FILE)}
    lobe = module.LOBE_NAMES.index
    for region, expected in [
        ("Frontal_Sup_L", "frontal"),
        ("Temporal_Mid_R", "temporal"),
        ("Angular_L", "parietal"),
        ("Calcarine_R", "occipital"),
        ("Hippocampus_L", "insula_and_limbic"),
        ("Thalamus_R", "subcortical"),
        ("Vermis_6", "cerebellum"),
    ]:
        assert set(np.unique(example["label"][atlas == regions[region]])) == {lobe(expected)}


def test_dummy_data_hemispheres(tmp_path):
    """The synthetic stand-in: left regions at x < 0, the midline vermis is background."""
    builder, example = build("hemispheres", tmp_path, manual_dir=DUMMY)
    atlas = np.asanyarray(nib.load(DUMMY / module.ATLAS_FILE).dataobj)
    expected = np.zeros_like(atlas)
    expected[np.isin(atlas, [1, 81])] = 1
    expected[np.isin(atlas, [2, 82])] = 2
    np.testing.assert_array_equal(example["label"], expected)
    counts = left_right_counts(example)
    assert (counts[1][1] < 0).all() and (counts[2][1] > 0).all()
    assert read_fingerprint(builder)["class_case_counts"] == [1, 1, 1]


def test_dummy_data_all_keeps_region_numbers(tmp_path):
    builder, example = build("all", tmp_path, manual_dir=DUMMY)
    atlas = np.asanyarray(nib.load(DUMMY / module.ATLAS_FILE).dataobj)
    np.testing.assert_array_equal(example["label"], atlas)  # AAL values are 1..116 already
    names = builder.info.metadata["class_names"]
    assert len(names) == 117 and names[1] == "Precentral_L" and names[116] == "Vermis_10"


def test_missing_files_say_to_install_mricron_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install mricron-data") as err:
        build("hemispheres", tmp_path / "tfds", manual_dir=tmp_path)
    assert str(tmp_path) in str(err.value)


if __name__ == "__main__":
    tfds.testing.test_main()
