"""kits19 builder: TFDS's standard checks on a tiny KiTS19-layout tree, geometry and errors.

The tree in ``dummy_data/`` is written by :func:`make_kits19_tree`; regenerate it with::

    python -c "from medseg_datasets.kits19.kits19_dataset_builder_test import \
make_kits19_tree, DUMMY_DATA; make_kits19_tree(DUMMY_DATA)"
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
import pytest
import tensorflow_datasets as tfds
from medseg_datasets.kits19 import kits19_dataset_builder

from medseg.datasets import get_builder, read_fingerprint
from medseg.datasets.fingerprint import FingerprintAccumulator
from medseg.io import MedsegIOError, kits19_affine

DUMMY_DATA = Path(__file__).resolve().parent / "dummy_data"


class KitsCase(NamedTuple):
    """One generated case: index, (slices, rows, cols) shape and spacing, file kind."""

    index: int
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    labelled: bool = True
    # KiTS19's quirky segmentations (cases 15, 23, ...): uint16, qform only
    qform_only_label: bool = False


DUMMY_CASES = (
    KitsCase(0, (6, 16, 16), (3.0, 0.78125, 0.78125)),
    KitsCase(1, (5, 16, 16), (5.0, 0.9, 0.9)),
    KitsCase(15, (4, 16, 16), (2.5, 0.703125, 0.703125), qform_only_label=True),
    KitsCase(210, (3, 16, 16), (3.0, 0.8, 0.8), labelled=False),
)


def make_kits19_tree(root, cases=DUMMY_CASES) -> Path:
    """Write a tiny KiTS19 ``data/`` tree with KiTS19's headers.

    Images are int16 with the anti-diagonal affine in the sform (sform_code=2,
    qform_code=0); segmentations are uint8 with the same header, except
    ``qform_only_label`` cases: uint16 with qform_code=1 and sform_code=0.

    Parameters
    ----------
    root : path-like
        The ``data/`` folder to write (created if missing).
    cases : sequence of KitsCase

    Returns
    -------
    Path
        ``root``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for case in cases:
        folder = root / f"case_{case.index:05d}"
        folder.mkdir(exist_ok=True)
        image, label = _case_arrays(case)
        affine = kits19_affine(case.spacing)
        _save(image, affine, folder / kits19_dataset_builder.IMAGE_FILE)
        if case.labelled:
            if case.qform_only_label:
                _save(
                    label.astype(np.uint16),
                    affine,
                    folder / kits19_dataset_builder.LABEL_FILE,
                    qform_only=True,
                )
            else:
                _save(label, affine, folder / kits19_dataset_builder.LABEL_FILE)
    # the repository's clinical data file sits beside the cases; the builder ignores it
    kits_json = [{"case_id": f"case_{c.index:05d}"} for c in cases]
    (root / "kits.json").write_text(json.dumps(kits_json, indent=1) + "\n")
    return root


def _case_arrays(case: KitsCase):
    """A body of soft tissue in air with a kidney holding a tumour; seeded by the index."""
    rng = np.random.default_rng(case.index)
    slices, rows, cols = case.shape
    y, x = np.mgrid[:rows, :cols]
    body = (y - rows / 2) ** 2 + (x - cols / 2) ** 2 < (rows / 2.2) ** 2
    kidney = (y - rows * 0.6) ** 2 + (x - cols * 0.3) ** 2 < (rows / 6) ** 2
    tumour = (y - rows * 0.6) ** 2 + (x - cols * 0.3) ** 2 < (rows / 12) ** 2
    label = np.zeros(case.shape, np.uint8)
    label[1:-1] = np.where(tumour, 2, np.where(kidney, 1, 0))
    hu = np.where(body, 40, -1000)[None] + np.array([0, 110, 60], np.int16)[label]
    image = (hu + rng.integers(-8, 9, size=case.shape)).astype(np.int16)
    return image, label


def _save(array, affine, path, qform_only=False):
    img = nib.Nifti1Image(array, affine)  # sform_code=2, qform_code=0, as KiTS19's files
    img.header.set_xyzt_units("mm", "sec")
    if qform_only:
        img.set_qform(affine, code=1)
        img.set_sform(None, code=0)
    nib.save(img, path)


class Kits19Test(tfds.testing.DatasetBuilderTestCase):
    """Builds `default` from dummy_data/ (the manual dir), reads it back and reloads it."""

    DATASET_CLASS = kits19_dataset_builder.Builder
    BUILDER_CONFIG_NAMES_TO_TEST = ["default"]
    SPLITS = {"train": 3, "test": 1}


class Kits19CleanTest(tfds.testing.DatasetBuilderTestCase):
    """`clean` leaves out case_00015."""

    DATASET_CLASS = kits19_dataset_builder.Builder
    BUILDER_CONFIG_NAMES_TO_TEST = ["clean"]
    SPLITS = {"train": 2, "test": 1}


def build(data_dir, manual_dir=DUMMY_DATA, config="default"):
    builder = kits19_dataset_builder.Builder(config=config, data_dir=str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder


def read_split(builder, split):
    """Every example of ``split``, keyed by case id, as numpy."""
    ds = builder.as_dataset(split=split, shuffle_files=False)
    return {ex["case_id"].decode(): ex for ex in tfds.as_numpy(ds)}


@pytest.fixture(scope="module")
def built_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("kits19_tfds")
    build(data_dir)
    return data_dir


@pytest.fixture(scope="module")
def built(built_dir):
    return kits19_dataset_builder.Builder(data_dir=str(built_dir))


def test_dummy_data_is_what_make_kits19_tree_writes(tmp_path):
    fresh = make_kits19_tree(tmp_path)
    committed = sorted(p.relative_to(DUMMY_DATA) for p in DUMMY_DATA.rglob("*") if p.is_file())
    assert committed == sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
    for rel in committed:
        if rel.name.endswith(".nii.gz"):
            a, b = nib.load(DUMMY_DATA / rel), nib.load(fresh / rel)
            np.testing.assert_array_equal(a.dataobj, b.dataobj, err_msg=str(rel))
            assert a.get_data_dtype() == b.get_data_dtype(), rel
            np.testing.assert_array_equal(a.affine, b.affine, err_msg=str(rel))
            for key in ("sform_code", "qform_code"):
                assert a.header[key] == b.header[key], (rel, key)


def test_records_keep_kits19_geometry(built):
    records = read_split(built, "train")
    assert sorted(records) == ["case_00000", "case_00001", "case_00015"]
    for case in DUMMY_CASES[:3]:
        example = records[f"case_{case.index:05d}"]
        folder = DUMMY_DATA / f"case_{case.index:05d}"
        image_file = nib.load(folder / "imaging.nii.gz")
        # the array stays in the file's (slices, rows, cols) order, int16
        assert example["image"].dtype == np.int16
        assert example["image"].shape == case.shape
        np.testing.assert_array_equal(example["image"], np.asarray(image_file.dataobj))
        np.testing.assert_array_equal(
            example["label"], np.asarray(nib.load(folder / "segmentation.nii.gz").dataobj)
        )
        # the anti-diagonal affine is stored as the file has it
        np.testing.assert_array_equal(example["affine"], image_file.affine)
        np.testing.assert_allclose(example["affine"], kits19_affine(case.spacing), atol=1e-6)
        assert np.all(np.diag(example["affine"])[[0, 2]] == 0)
        # spacing is the affine's column norms, (slice, row, col)
        np.testing.assert_allclose(example["spacing"], case.spacing, rtol=1e-6)
        np.testing.assert_allclose(
            example["spacing"], np.linalg.norm(image_file.affine[:3, :3], axis=0), rtol=1e-6
        )


def test_qform_only_uint16_segmentation_gets_the_image_affine(built):
    seg = nib.load(DUMMY_DATA / "case_00015" / "segmentation.nii.gz")
    # the fixture really has KiTS19's quirky header
    assert seg.get_data_dtype() == np.uint16
    assert int(seg.header["qform_code"]) == 1 and int(seg.header["sform_code"]) == 0
    example = read_split(built, "train")["case_00015"]
    assert example["label"].dtype == np.uint8
    assert set(np.unique(example["label"]).tolist()) == {0, 1, 2}
    image = nib.load(DUMMY_DATA / "case_00015" / "imaging.nii.gz")
    np.testing.assert_array_equal(example["affine"], image.affine)
    np.testing.assert_allclose(seg.affine, image.affine, atol=1e-6)


def test_test_split_is_unlabelled(built):
    records = read_split(built, "test")
    assert sorted(records) == ["case_00210"]
    example = records["case_00210"]
    assert example["label"].shape == (0, 0, 0)
    assert example["image"].shape == (3, 16, 16)


def test_fingerprint_has_the_train_cases_only(built, built_dir):
    fingerprint = read_fingerprint(get_builder("kits19", data_dir=str(built_dir)))
    assert fingerprint["num_cases"] == 3
    assert fingerprint["class_names"] == ["background", "kidney", "tumour"]
    records = read_split(built, "train")
    recomputed = FingerprintAccumulator(["background", "kidney", "tumour"], seed=0)
    for case_id in sorted(records):  # generation order
        ex = records[case_id]
        recomputed.add(ex["image"], ex["label"], ex["spacing"])
    assert fingerprint == recomputed.result()
    assert built.info.metadata["regions"] == {"kidney_and_tumour": [1, 2]}


def test_clean_config_excludes_the_listed_cases(tmp_path):
    config = kits19_dataset_builder.Builder.builder_configs["clean"]
    assert config.exclude == tuple(f"case_{i:05d}" for i in (15, 23, 37, 68, 125, 133))
    builder = build(tmp_path, config="clean")
    assert sorted(read_split(builder, "train")) == ["case_00000", "case_00001"]
    assert read_fingerprint(builder)["num_cases"] == 2


def test_labelled_case_without_segmentation_is_an_error_naming_it(tmp_path):
    data = make_kits19_tree(tmp_path / "data")
    (data / "case_00001" / "segmentation.nii.gz").unlink()
    with pytest.raises(MedsegIOError, match=r"case_00001.*segmentation\.nii\.gz"):
        build(tmp_path / "tfds", manual_dir=data)


def test_case_without_imaging_is_an_error_naming_it(tmp_path):
    data = make_kits19_tree(tmp_path / "data")
    (data / "case_00210" / "imaging.nii.gz").unlink()
    with pytest.raises(MedsegIOError, match=r"case_00210.*imaging\.nii\.gz"):
        build(tmp_path / "tfds", manual_dir=data)


def test_unreadable_case_is_an_error_naming_its_file(tmp_path):
    data = make_kits19_tree(tmp_path / "data")
    path = data / "case_00001" / "imaging.nii.gz"
    path.write_bytes(path.read_bytes()[:100])  # truncated download
    with pytest.raises(MedsegIOError, match=r"case_00001.imaging\.nii\.gz"):
        build(tmp_path / "tfds", manual_dir=data)


def test_manual_dir_without_cases_is_a_clear_error(tmp_path):
    # e.g. manual_dir pointing at the repository root instead of its data/ folder
    wrong = tmp_path / "kits19"
    (wrong / "starter_code").mkdir(parents=True)
    with pytest.raises(MedsegIOError, match="no case_XXXXX folders"):
        build(tmp_path / "tfds", manual_dir=wrong)


def test_test_case_with_a_segmentation_keeps_it(tmp_path):
    data = make_kits19_tree(tmp_path / "data")
    shutil.copy(data / "case_00000" / "imaging.nii.gz", data / "case_00210")
    shutil.copy(data / "case_00000" / "segmentation.nii.gz", data / "case_00210")
    builder = build(tmp_path / "tfds", manual_dir=data)
    assert read_split(builder, "test")["case_00210"]["label"].shape == (6, 16, 16)
    assert read_fingerprint(builder)["num_cases"] == 3  # the test split stays out


def test_folder_without_test_cases_builds_the_train_split_alone(tmp_path):
    # only the labelled cases downloaded (no case_00210+): the test split is left out
    data = make_kits19_tree(tmp_path / "data", cases=DUMMY_CASES[:3])
    build(tmp_path / "tfds", manual_dir=data)
    reloaded = kits19_dataset_builder.Builder(data_dir=str(tmp_path / "tfds"))
    assert reloaded.is_prepared()
    assert list(reloaded.info.splits) == ["train"]
    assert reloaded.info.splits["train"].num_examples == 3
    records = read_split(reloaded, "train")
    assert sorted(records) == ["case_00000", "case_00001", "case_00015"]
    image = nib.load(data / "case_00001" / "imaging.nii.gz")
    np.testing.assert_array_equal(records["case_00001"]["image"], np.asarray(image.dataobj))
    assert read_fingerprint(reloaded)["num_cases"] == 3
    assert not list(Path(reloaded.data_dir).glob("*-test.tfrecord*"))
    with pytest.raises(ValueError, match="test"):
        reloaded.as_dataset(split="test")


def test_medseg_build_of_a_folder_without_test_cases_lists_the_train_split(tmp_path, capsys):
    from medseg.cli import main

    data = make_kits19_tree(tmp_path / "data", cases=DUMMY_CASES[:3])
    argv = ["build", "kits19", "--data-dir", str(tmp_path / "tfds"), "--manual-dir", str(data)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "cases: 3" in out and out.rstrip().endswith("splits: train 3")


def test_folder_with_only_test_cases_is_refused_before_writing(tmp_path):
    data = make_kits19_tree(tmp_path / "data", cases=DUMMY_CASES[3:])
    with pytest.raises(MedsegIOError, match=r"data: no labelled KiTS19 case .*1 test case"):
        build(tmp_path / "tfds", manual_dir=data)
    builder = kits19_dataset_builder.Builder(data_dir=str(tmp_path / "tfds"))
    assert not builder.is_prepared()
    assert not list((tmp_path / "tfds").rglob("*.tfrecord*"))


def test_known_dataset_and_configs():
    builder = get_builder("kits19")
    assert builder.builder_config.name == "default"
    assert set(kits19_dataset_builder.Builder.builder_configs) == {"default", "clean"}
    assert "CC BY-NC-SA 4.0" in kits19_dataset_builder.Builder.MANUAL_DOWNLOAD_INSTRUCTIONS


if __name__ == "__main__":
    tfds.testing.test_main()
