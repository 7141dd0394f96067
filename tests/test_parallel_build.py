"""Builds whose cases are read by a pool of processes (``medseg build --workers N``)."""

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tensorflow_datasets as tfds

from medseg import cli
from medseg.datasets import prepare, read_fingerprint
from medseg.datasets.builder import _check_workers


def _write_folder(root: Path, cases: int = 5) -> str:
    """``cases`` NIfTI cases of different shapes (nibabel reads them Fortran-ordered)."""
    rng = np.random.default_rng(7)
    (root / "data" / "imagesTr").mkdir(parents=True)
    (root / "data" / "labelsTr").mkdir()
    for i in range(cases):
        shape = (4 + i, 6, 5 + i % 2)
        label = np.zeros(shape, np.uint8)
        label[1:3, 2:5, 1:4] = 1
        label[2, 3, 2:] = 2
        image = rng.integers(-1000, 1500, size=shape).astype(np.int16)
        affine = np.diag([0.8 + 0.1 * i, 0.8, 2.5, 1.0])
        nib.save(nib.Nifti1Image(image, affine), root / f"data/imagesTr/c{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / f"data/labelsTr/c{i}.nii.gz")
    config = root / "cfg.json"
    config.write_text(
        '{"name": "pool", "root": "data", "images": "imagesTr/*.nii.gz",'
        ' "label_template": "labelsTr/{case}.nii.gz",'
        ' "class_names": ["background", "kidney", "tumour"]}'
    )
    return str(config)


def _records(builder) -> list[dict]:
    return list(tfds.as_numpy(builder.as_dataset(split="train")))


def _shards(builder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(builder.data_dir).glob("*.tfrecord*"))}


def test_two_workers_write_the_records_and_fingerprint_of_one(tmp_path, caplog):
    config = _write_folder(tmp_path)
    one = prepare("nifti_folder", config, str(tmp_path / "one"), workers=1)
    with caplog.at_level(logging.INFO, logger="medseg.datasets"):
        two = prepare("nifti_folder", config, str(tmp_path / "two"), workers=2)
    assert "reading 5 cases in 2 processes" in caplog.text

    # the very same bytes, shard by shard
    shards = _shards(one)
    assert shards and shards == _shards(two)
    assert read_fingerprint(one) == read_fingerprint(two)
    assert read_fingerprint(one).hash == read_fingerprint(two).hash
    assert one.info.splits["train"].shard_lengths == two.info.splits["train"].shard_lengths

    # and decoded, the examples are the files' contents in the same order
    decoded_one, decoded_two = _records(one), _records(two)
    assert [r["case_id"] for r in decoded_two] == [f"c{i}".encode() for i in range(5)]
    for a, b in zip(decoded_one, decoded_two, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    for i, record in enumerate(decoded_two):
        expected = np.asanyarray(nib.load(tmp_path / f"data/imagesTr/c{i}.nii.gz").dataobj)
        np.testing.assert_array_equal(record["image"], expected)


def test_failing_case_in_a_worker_names_its_file_and_leaves_nothing(tmp_path):
    config = _write_folder(tmp_path)
    broken = tmp_path / "data" / "imagesTr" / "c3.nii.gz"
    broken.write_bytes(b"this is not a NIfTI file")
    data_dir = tmp_path / "tfds"
    with pytest.raises(Exception) as info:
        prepare("nifti_folder", config, str(data_dir), workers=2)
    assert str(broken) in str(info.value)
    assert "pickl" not in str(info.value).lower()
    # TFDS's incomplete folder is removed: no record, shard or dataset info remains
    left = [p for p in data_dir.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert left == []


def test_label_out_of_range_in_a_worker_is_the_builders_error(tmp_path):
    config = _write_folder(tmp_path)
    path = tmp_path / "data" / "labelsTr" / "c1.nii.gz"
    label = np.zeros((5, 6, 6), np.uint8)
    label[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(label, nib.load(path).affine), path)
    with pytest.raises(ValueError, match=r"label values \[7\]") as info:
        prepare("nifti_folder", config, str(tmp_path / "tfds"), workers=2)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("workers", [0, -2, 1.5, True])
def test_workers_must_be_a_positive_whole_number(tmp_path, workers):
    config = _write_folder(tmp_path, cases=1)
    data_dir = tmp_path / "tfds"
    with pytest.raises(ValueError, match="must be a whole number of processes >= 1"):
        prepare("nifti_folder", config, str(data_dir), workers=workers)
    assert not data_dir.exists()  # refused before anything is made


def test_cli_refuses_zero_workers(tmp_path, capsys):
    config = _write_folder(tmp_path, cases=1)
    data_dir = tmp_path / "tfds"
    code = cli.main(
        ["build", "nifti_folder", "--config", config, "--data-dir", str(data_dir), "--workers", "0"]
    )
    assert code == 2
    assert "--workers must be a whole number of processes >= 1, got 0" in capsys.readouterr().err
    assert not data_dir.exists()


def test_check_workers_passes_numpy_integers():
    assert _check_workers(np.int64(3), "workers") == 3
