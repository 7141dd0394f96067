"""nifti_folder builder: glob, CSV and DICOM layouts read back against nibabel/pydicom.

No ``tfds.testing.DatasetBuilderTestCase`` here: it builds the class's declared configs,
and nifti_folder has none (every config is a user's, with a ``root``); the dummy data is
built through a config in ``test_dummy_data_builds`` instead.
"""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import tensorflow_datasets as tfds
from medseg_datasets.nifti_folder import Builder, NiftiFolderConfig
from medseg_datasets.nifti_folder import nifti_folder_dataset_builder as module

from medseg.datasets import read_fingerprint
from medseg.datasets.fingerprint import FingerprintAccumulator
from medseg.io import MedsegIOError, read_dicom_series

DUMMY = Path(__file__).parent / "dummy_data"
CT5N = Path(pydicom.__file__).parent / "data/test_files/dicomdirtests/98892001/CT5N"


def oblique_affine(spacing, origin):
    """A rotated, flipped affine, so a reader that rebuilt it from spacing would fail."""
    angle = np.deg2rad(20)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, -1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.asarray(spacing)
    affine[:3, 3] = origin
    return affine


def write_cases(root, count=3, image_dir="imagesTr", label_dir="labelsTr", seed=0):
    """NIfTI cases ``case_i`` with int16 images and labels 0..2; returns their paths."""
    rng = np.random.default_rng(seed)
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    (root / label_dir).mkdir(parents=True, exist_ok=True)
    paths = {}
    for i in range(count):
        shape = (int(rng.integers(4, 8)), int(rng.integers(6, 10)), int(rng.integers(5, 9)))
        image = rng.integers(-1000, 1500, size=shape).astype(np.int16)
        label = rng.choice(3, size=shape, p=[0.6, 0.3, 0.1]).astype(np.uint8)
        affine = oblique_affine(rng.uniform(0.5, 3, 3), rng.uniform(-50, 50, 3))
        image_path = root / image_dir / f"case_{i}.nii.gz"
        label_path = root / label_dir / f"case_{i}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), image_path)
        nib.save(nib.Nifti1Image(label, affine), label_path)
        paths[f"case_{i}"] = (image_path, label_path)
    return paths


def build(data_dir, **fields):
    fields.setdefault("name", "test")
    fields.setdefault("class_names", ("background", "a", "b"))
    builder = Builder(config=NiftiFolderConfig(**fields), data_dir=str(data_dir))
    builder.download_and_prepare()
    return builder


def records(builder):
    out = {}
    for example in tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False)):
        out[example["case_id"].decode()] = example
    return out


def nifti(path):
    img = nib.load(path)
    return np.asanyarray(img.dataobj), img.affine


def assert_matches_files(example, image_path, label_path):
    image, affine = nifti(image_path)
    np.testing.assert_array_equal(example["image"], image)
    np.testing.assert_allclose(example["affine"], affine, rtol=0, atol=1e-5)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    np.testing.assert_allclose(example["spacing"], spacing, rtol=1e-6)
    if label_path is None:
        assert example["label"].shape == (0, 0, 0)
    else:
        np.testing.assert_array_equal(example["label"], nifti(label_path)[0])


def test_glob_layout_with_label_template(tmp_path):
    paths = write_cases(tmp_path / "data")
    builder = build(
        tmp_path / "tfds",
        root=str(tmp_path / "data"),
        images="imagesTr/*.nii.gz",
        label_template="labelsTr/{case}.nii.gz",
    )
    got = records(builder)
    assert sorted(got) == sorted(paths)
    for case, example in got.items():
        assert example["image"].dtype == np.int16 and example["label"].dtype == np.uint8
        assert_matches_files(example, *paths[case])

    # the stored fingerprint is that of the files, in build (sorted) order
    expected = FingerprintAccumulator(["background", "a", "b"])
    for case in sorted(paths):
        image, affine = nifti(paths[case][0])
        # CaseBuilder fingerprints the spacing as the records store it: float32
        spacing = np.linalg.norm(affine[:3, :3], axis=0).astype(np.float32)
        expected.add(image, nifti(paths[case][1])[0], spacing)
    fingerprint = read_fingerprint(builder)
    assert fingerprint == expected.result()
    assert builder.info.metadata["class_names"] == ["background", "a", "b"]
    # a built dataset reads back without its config (e.g. in another process)
    reread = tfds.builder_from_directory(builder.data_dir)
    assert reread.info.splits["train"].num_examples == 3


def test_labels_glob_skips_resource_forks_and_unlabelled_layout(tmp_path):
    root = tmp_path / "data"
    paths = write_cases(root, count=2)
    # macOS resource forks from the Decathlon tarballs are not cases
    (root / "imagesTr" / "._case_0.nii.gz").write_bytes(b"\x00\x05\x16\x07junk")
    builder = build(
        tmp_path / "a", root=str(root), images="imagesTr/*.nii.gz", labels="labelsTr/*.nii*"
    )
    got = records(builder)
    assert sorted(got) == ["case_0", "case_1"]
    for case, example in got.items():
        assert_matches_files(example, *paths[case])

    unlabelled = records(build(tmp_path / "b", root=str(root), images="imagesTr/case_*"))
    for case, example in unlabelled.items():
        assert_matches_files(example, paths[case][0], None)


def test_csv_layout_float32(tmp_path):
    root = tmp_path / "data"
    paths = write_cases(root, count=2, image_dir="img", label_dir="seg")
    (root / "cases.csv").write_text(
        "case_id,image,label\n"
        "first,img/case_0.nii.gz,seg/case_0.nii.gz\n"
        "second,img/case_1.nii.gz,\n"
    )
    builder = build(tmp_path / "tfds", root=str(root), csv="cases.csv", image_dtype="float32")
    got = records(builder)
    assert sorted(got) == ["first", "second"]
    assert got["first"]["image"].dtype == np.float32
    assert_matches_files(got["first"], *paths["case_0"])
    assert_matches_files(got["second"], paths["case_1"][0], None)
    assert read_fingerprint(builder)["num_cases"] == 1  # only labelled cases count


def test_multichannel_images(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "img").mkdir()
    (tmp_path / "seg").mkdir()
    image = rng.normal(size=(4, 5, 6, 2)).astype(np.float32)
    label = np.zeros((4, 5, 6), np.uint8)
    label[1:3, 1:4, 2:5] = 1
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "img" / "mr.nii.gz")
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "seg" / "mr.nii.gz")
    builder = build(
        tmp_path / "tfds",
        root=str(tmp_path),
        images="img/*.nii.gz",
        label_template="seg/{case}.nii.gz",
        class_names=("background", "lesion"),
        modalities=("t1", "t2"),
        image_dtype="float32",
    )
    example = records(builder)["mr"]
    np.testing.assert_array_equal(example["image"], image)
    per_channel = read_fingerprint(builder)["foreground_intensity_per_channel"]
    for channel, stats in enumerate(per_channel):
        assert stats["mean"] == pytest.approx(image[..., channel][label > 0].mean(), rel=1e-6)


def dicom_reference(folder):
    """The series as pydicom reads it, slices sorted along the slice normal."""
    slices = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    normal = np.cross(*np.reshape(np.array(slices[0].ImageOrientationPatient, float), (2, 3)))
    slices.sort(key=lambda ds: float(np.dot(normal, np.array(ds.ImagePositionPatient, float))))
    return np.stack(
        [
            ds.pixel_array * float(getattr(ds, "RescaleSlope", 1))
            + float(getattr(ds, "RescaleIntercept", 0))
            for ds in slices
        ]
    )


def test_dicom_series_layout_with_nifti_label(tmp_path):
    root = tmp_path / "data"
    shutil.copytree(CT5N, root / "ct5n")
    reference = dicom_reference(root / "ct5n")
    label = (reference > np.median(reference)).astype(np.uint8)
    # labels outside root: every subfolder of root is taken for a series
    (tmp_path / "labels").mkdir()
    # on the series' grid: the builder compares the label's affine with the series'
    affine = read_dicom_series(root / "ct5n").affine
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "labels" / "ct5n.nii.gz")

    builder = build(
        tmp_path / "tfds",
        root=str(root),
        dicom_series=True,
        label_template="../labels/{case}.nii.gz",
        class_names=("background", "bright"),
    )
    example = records(builder)["ct5n"]
    np.testing.assert_array_equal(example["image"], reference)
    np.testing.assert_array_equal(example["label"], label)
    first = pydicom.dcmread(sorted((root / "ct5n").iterdir())[0])
    row, col = (float(v) for v in first.PixelSpacing)
    np.testing.assert_allclose(example["spacing"][1:], [row, col], rtol=1e-6)
    assert read_fingerprint(builder)["class_case_counts"] == [1, 1]


def test_dicom_series_layout_checks_label_grid_like_csv(tmp_path):
    root = tmp_path / "data"
    shutil.copytree(CT5N, root / "ct5n")
    (tmp_path / "labels").mkdir()
    label_path = tmp_path / "labels" / "ct5n.nii.gz"
    fields = dict(
        name="x",
        root=str(root),
        dicom_series=True,
        label_template="../labels/{case}.nii.gz",
        class_names=("background", "bright"),
    )
    series = read_dicom_series(root / "ct5n")
    shifted = series.affine.copy()
    shifted[:3, 3] += (0.0, 0.0, 5.0)  # same grid shape, 5 mm off along z
    nib.save(nib.Nifti1Image(np.zeros(series.image.shape, np.uint8), shifted), label_path)
    (load,) = module._loaders(NiftiFolderConfig(**fields))
    with pytest.raises(MedsegIOError) as err:
        load()
    message = str(err.value)
    assert "labels/ct5n.nii.gz: label affine differs" in message
    assert str(root / "ct5n") in message and "max difference 5 mm" in message

    # the CSV layout gives the same message for the same files
    (root / "cases.csv").write_text("case_id,image,label\nct5n,ct5n,../labels/ct5n.nii.gz\n")
    (csv_load,) = module._loaders(NiftiFolderConfig(**{**fields, "csv": "cases.csv"}))
    with pytest.raises(MedsegIOError) as csv_err:
        csv_load()
    assert str(csv_err.value) == message

    wrong_shape = np.zeros(series.image.shape[::-1], np.uint8)
    nib.save(nib.Nifti1Image(wrong_shape, series.affine), label_path)
    with pytest.raises(MedsegIOError, match=r"ct5n\.nii\.gz: label shape \(16, 16, 5\)"):
        load()


def test_dummy_data_builds(tmp_path):
    builder = build(
        tmp_path,
        name="dummy",
        root=str(DUMMY),
        images="imagesTr/*.nii.gz",
        label_template="labelsTr/{case}.nii.gz",
        class_names=("background", "foreground"),
    )
    got = records(builder)
    assert sorted(got) == ["case_000", "case_001"]
    for case, example in got.items():
        assert_matches_files(
            example, DUMMY / "imagesTr" / f"{case}.nii.gz", DUMMY / "labelsTr" / f"{case}.nii.gz"
        )


def test_cases_are_read_lazily(tmp_path, monkeypatch):
    import medseg.io

    write_cases(tmp_path, count=3)
    calls = []
    real = medseg.io.read_nifti_case

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(medseg.io, "read_nifti_case", counting)
    config = NiftiFolderConfig(
        name="x",
        root=str(tmp_path),
        images="imagesTr/*",
        label_template="labelsTr/{case}.nii.gz",
        class_names=("background", "a", "b"),
    )
    loaders = module._loaders(config)
    assert len(loaders) == 3 and calls == []
    assert loaders[1]().case_id == "case_1" and calls == ["case_1"]


def error_of(tmp_path, **fields):
    fields.setdefault("name", "x")
    with pytest.raises((FileNotFoundError, ValueError)) as err:
        module._loaders(NiftiFolderConfig(**fields))
    return str(err.value)


def test_empty_folder_or_glob_names_folder_and_pattern(tmp_path):
    message = error_of(tmp_path, root=str(tmp_path), images="imagesTr/*.nii.gz")
    assert str(tmp_path) in message and "imagesTr/*.nii.gz" in message
    message = error_of(tmp_path, root=str(tmp_path / "nope"), images="*.nii.gz")
    assert str(tmp_path / "nope") in message
    message = error_of(tmp_path, root=str(tmp_path), dicom_series=True)
    assert str(tmp_path) in message


def test_missing_label_names_image_and_expected_path(tmp_path):
    paths = write_cases(tmp_path, count=2)
    paths["case_1"][1].unlink()
    message = error_of(
        tmp_path, root=str(tmp_path), images="imagesTr/*", label_template="labelsTr/{case}.nii.gz"
    )
    assert str(paths["case_1"][0]) in message and str(paths["case_1"][1]) in message
    message = error_of(tmp_path, root=str(tmp_path), images="imagesTr/*", labels="labelsTr/*")
    assert str(paths["case_1"][0]) in message and "case_1.nii.gz" in message


def test_bad_csv_row_names_the_row(tmp_path):
    write_cases(tmp_path, count=1)
    (tmp_path / "cases.csv").write_text(
        "case_id,image,label\n"
        "a,imagesTr/case_0.nii.gz,labelsTr/case_0.nii.gz\n"
        "b,imagesTr/missing.nii.gz,\n"
    )
    message = error_of(tmp_path, root=str(tmp_path), csv="cases.csv")
    assert "line 3" in message and "missing.nii.gz" in message and "cases.csv" in message


def test_config_from_json(tmp_path):
    write_cases(tmp_path / "data", count=1)
    path = tmp_path / "data" / "mydata.json"
    path.write_text(
        json.dumps(
            {
                "name": "mydata",
                "root": ".",
                "images": "imagesTr/*.nii.gz",
                "label_template": "labelsTr/{case}.nii.gz",
                "class_names": ["background", "a", "b"],
            }
        )
    )
    config = NiftiFolderConfig.from_json(path)
    assert Path(config.root) == (tmp_path / "data").resolve()
    assert config.class_names == ("background", "a", "b")
    assert len(module._loaders(config)) == 1
    path.write_text(json.dumps({"name": "x", "rooot": "."}))
    with pytest.raises(ValueError, match="rooot"):
        NiftiFolderConfig.from_json(path)


if __name__ == "__main__":
    tfds.testing.test_main()
