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
    path = tmp_path / "data" / "labelsTr" / "c3.nii.gz"  # past the cases read here
    label = np.zeros(nib.load(path).shape, np.uint8)
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


# --- cases come back from the pool processes through shared memory -------------------

SHM = Path("/dev/shm")
needs_dev_shm = pytest.mark.skipif(not SHM.is_dir(), reason="POSIX shared memory shows in /dev/shm")


def _blocks_of_this_process() -> list[str]:
    from medseg.datasets.builder import block_prefix

    return sorted(p.name for p in SHM.glob(block_prefix() + "*"))


def _loaders(tmp_path, cases: int) -> list:
    import functools

    from medseg.io import read_nifti_case

    _write_folder(tmp_path, cases)
    data = tmp_path / "data"
    return [
        functools.partial(
            read_nifti_case,
            f"c{i}",
            data / f"imagesTr/c{i}.nii.gz",
            data / f"labelsTr/c{i}.nii.gz",
            num_classes=3,
        )
        for i in range(cases)
    ]


@needs_dev_shm
def test_pool_cases_are_the_files_in_c_order_and_leave_no_block(tmp_path):
    from medseg.datasets.builder import _pool_cases

    loaders = _loaders(tmp_path, cases=4)
    cases = list(_pool_cases(loaders, 3, np.int16, workers=2))
    assert [c.case_id for c in cases] == ["c0", "c1", "c2", "c3"]
    for i, case in enumerate(cases):
        image = np.asanyarray(nib.load(tmp_path / f"data/imagesTr/c{i}.nii.gz").dataobj)
        label = np.asanyarray(nib.load(tmp_path / f"data/labelsTr/c{i}.nii.gz").dataobj)
        assert case.image.flags.c_contiguous and case.label.flags.c_contiguous
        assert case.image.dtype == np.int16 and case.label.dtype == np.uint8
        np.testing.assert_array_equal(case.image, image)
        np.testing.assert_array_equal(case.label, label)
    # every block's name is unlinked once mapped, though its arrays are still in use
    assert _blocks_of_this_process() == []
    del cases


@needs_dev_shm
def test_pool_stopped_early_unlinks_the_blocks_of_cases_in_flight(tmp_path):
    from medseg.datasets.builder import _pool_cases

    loaders = _loaders(tmp_path, cases=6)
    cases = _pool_cases(loaders, 3, np.int16, workers=2)
    first = next(cases)
    assert first.case_id == "c0"
    cases.close()  # three more were loading or loaded into blocks
    assert _blocks_of_this_process() == []
    np.testing.assert_array_equal(  # the case taken is still readable
        first.image, np.asanyarray(nib.load(tmp_path / "data/imagesTr/c0.nii.gz").dataobj)
    )


@needs_dev_shm
def test_failing_case_in_a_worker_leaves_no_block(tmp_path):
    from medseg.datasets.builder import HEAD_CASES, _pool_cases

    loaders = _loaders(tmp_path, cases=6)
    broken = HEAD_CASES + 1  # read by a pool process, not by this one
    (tmp_path / f"data/imagesTr/c{broken}.nii.gz").write_bytes(b"not a NIfTI file")
    cases = _pool_cases(loaders, 3, np.int16, workers=2)
    assert [next(cases).case_id for _ in range(broken)] == [f"c{i}" for i in range(broken)]
    with pytest.raises(Exception, match=f"c{broken}.nii.gz"):
        next(cases)
    assert _blocks_of_this_process() == []


@needs_dev_shm
def test_first_cases_are_read_here_while_the_pool_starts_then_by_the_pool(tmp_path):
    from medseg.datasets.builder import HEAD_CASES, _Mapped, _pool_cases

    loaders = _loaders(tmp_path, cases=HEAD_CASES + 2)
    cases = list(_pool_cases(loaders, 3, np.int16, workers=2))
    # a pooled case's volumes are mapped from the worker's shared memory block
    mapped = [isinstance(c.image.base, _Mapped) for c in cases]
    assert mapped == [False] * HEAD_CASES + [True, True]
    for i, case in enumerate(cases):
        assert case.image.flags.c_contiguous and case.label.flags.c_contiguous
        np.testing.assert_array_equal(
            case.image, np.asanyarray(nib.load(tmp_path / f"data/imagesTr/c{i}.nii.gz").dataobj)
        )
    assert _blocks_of_this_process() == []


@needs_dev_shm
def test_failing_case_read_here_stops_the_starting_pool_and_leaves_no_block(tmp_path):
    from medseg.datasets.builder import _pool_cases

    loaders = _loaders(tmp_path, cases=6)
    (tmp_path / "data/imagesTr/c0.nii.gz").write_bytes(b"not a NIfTI file")
    cases = _pool_cases(loaders, 3, np.int16, workers=2)
    with pytest.raises(Exception, match="c0.nii.gz"):
        next(cases)
    assert _blocks_of_this_process() == []


@needs_dev_shm
def test_build_with_workers_in_a_fresh_process_warns_of_no_leak(tmp_path):
    import subprocess
    import sys

    config = _write_folder(tmp_path)
    script = (
        "from medseg.datasets import prepare\n"
        f"prepare('nifti_folder', {config!r}, {str(tmp_path / 'tfds')!r}, workers=2)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # the resource tracker reports blocks left, or unlinked twice, on stderr
    assert "resource_tracker" not in done.stderr
    assert "leaked" not in done.stderr
    assert "shared_memory" not in done.stderr


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
@pytest.mark.parametrize("shape", [(7,), (5, 3), (37, 19, 70), (3, 40, 4, 2), (65, 2, 33)], ids=str)
def test_copy_c_order_equals_numpy(shape, dtype):
    from medseg.datasets.builder import _c_order, _copy_c_order

    rng = np.random.default_rng(0)
    values = rng.integers(0, 200, size=shape).astype(dtype)
    for array in (np.asfortranarray(values), values, values[::2] if values.ndim else values):
        out = np.empty(array.shape, array.dtype)
        _copy_c_order(array, out)
        np.testing.assert_array_equal(out, array)
        assert out.tobytes() == np.ascontiguousarray(array).tobytes()
        converted = _c_order(array)
        assert converted.flags.c_contiguous
        assert converted.tobytes() == np.ascontiguousarray(array).tobytes()


def test_case_without_shared_memory_comes_back_c_ordered(tmp_path):
    from medseg.datasets.builder import _checked_case, _from_shared, _to_shared

    loader = _loaders(tmp_path, cases=1)[0]
    case = _checked_case(loader(), 3, np.int16)
    assert case.image.flags.f_contiguous and not case.image.flags.c_contiguous
    # a name shm_open refuses (EINVAL) stands for shared memory that cannot be had
    returned = _from_shared(_to_shared(case, "no/such/prefix"))
    assert returned.image.flags.c_contiguous and returned.label.flags.c_contiguous
    np.testing.assert_array_equal(returned.image, case.image)
    np.testing.assert_array_equal(returned.label, case.label)
    assert returned.case_id == case.case_id and returned.labelled


@needs_dev_shm
def test_unlabelled_case_travels_through_shared_memory(tmp_path):
    from medseg.datasets.builder import NO_LABEL_SHAPE, _checked_case, _from_shared, _to_shared

    loader = _loaders(tmp_path, cases=1)[0]
    import dataclasses

    record = dataclasses.replace(loader(), label=None)
    shared = _to_shared(_checked_case(record, 3, np.int16), "medsegtest_")
    assert (SHM / shared.block).exists()
    case = _from_shared(shared)
    assert not (SHM / shared.block).exists()
    assert case.label.shape == NO_LABEL_SHAPE and not case.labelled
    np.testing.assert_array_equal(case.image, record.image)
