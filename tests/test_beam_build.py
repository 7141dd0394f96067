"""Builds through an Apache Beam pipeline (``medseg build --beam``).

The build tests need apache_beam (``pip install 'medseg[beam]'``, ``nox -s beam``); they
are skipped without it. The missing-Beam error is tested everywhere.
"""

import importlib.util
import re
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_parallel_build import _records, _shards, _write_folder

from medseg import cli
from medseg.config import ConfigError
from medseg.datasets import prepare, read_fingerprint, records

needs_beam = pytest.mark.skipif(
    importlib.util.find_spec("apache_beam") is None,
    reason="apache_beam is not installed (pip install 'medseg[beam]', or nox -s beam)",
)

MULTI_PROCESS = "--direct_num_workers=2 --direct_running_mode=multi_processing"


def _canonical_shards(builder) -> dict[str, list[bytes]]:
    """Each shard's records, each re-serialized with its feature map in key order.

    protobuf (upb) writes a map's entries in an order that differs between processes,
    so records serialized by other processes (Beam's workers) may differ in that order
    only; the record count, sizes and contents must not.
    """
    import tensorflow as tf

    return {
        name: [
            tf.train.Example.FromString(record.numpy()).SerializeToString(deterministic=True)
            for record in tf.data.TFRecordDataset(str(Path(builder.data_dir) / name))
        ]
        for name in _shards(builder)
    }


def _assert_same_build(local, beam, same_process: bool = True) -> None:
    """The same shards (byte for byte when serialized in one process), split infos,
    fingerprint and decoded examples."""
    shards = _shards(local)
    assert shards and shards.keys() == _shards(beam).keys()
    if same_process:
        assert shards == _shards(beam)
    assert _canonical_shards(local) == _canonical_shards(beam)
    assert {k: len(v) for k, v in shards.items()} == {k: len(v) for k, v in _shards(beam).items()}
    assert local.info.splits["train"].shard_lengths == beam.info.splits["train"].shard_lengths
    assert local.info.splits["train"].num_bytes == beam.info.splits["train"].num_bytes
    assert read_fingerprint(local) == read_fingerprint(beam)
    assert read_fingerprint(local).hash == read_fingerprint(beam).hash
    for a, b in zip(_records(local), _records(beam), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


@needs_beam
@pytest.mark.slow
def test_beam_build_writes_the_records_and_fingerprint_of_a_local_build(
    tmp_path, monkeypatch, capsys
):
    config = _write_folder(tmp_path)
    # small shards, so the split spans several and their boundaries are compared too
    monkeypatch.setattr(records, "MAX_SHARD_BYTES", 1500)
    start = time.perf_counter()
    local = prepare("nifti_folder", config, str(tmp_path / "local"), workers=1)
    local_time = time.perf_counter() - start
    start = time.perf_counter()
    beam = prepare("nifti_folder", config, str(tmp_path / "beam"), beam_options=MULTI_PROCESS)
    beam_time = time.perf_counter() - start
    with capsys.disabled():
        print(f"\nbuild time: local {local_time:.1f} s, Beam (2 processes) {beam_time:.1f} s")
    assert len(local.info.splits["train"].shard_lengths) > 1
    _assert_same_build(local, beam, same_process=False)
    decoded = _records(beam)
    assert [r["case_id"] for r in decoded] == [f"c{i}".encode() for i in range(5)]
    for i, record in enumerate(decoded):
        expected = np.asanyarray(nib.load(tmp_path / f"data/imagesTr/c{i}.nii.gz").dataobj)
        np.testing.assert_array_equal(record["image"], expected)
    # nothing but the dataset is left in its folder (no temporary shard or summary)
    assert not [p.name for p in (tmp_path / "beam").rglob(".*") if p.is_file()]


@needs_beam
def test_beam_fingerprint_samples_large_foregrounds_as_the_local_build(tmp_path, monkeypatch):
    # a case with more foreground than samples_per_case draws its sample by case index
    from medseg.datasets import fingerprint

    config = _write_folder(tmp_path, cases=3)
    default = fingerprint.FingerprintAccumulator.__init__.__defaults__
    monkeypatch.setattr(
        fingerprint.FingerprintAccumulator.__init__, "__defaults__", (default[0], 5)
    )
    local = prepare("nifti_folder", config, str(tmp_path / "local"))
    beam = prepare("nifti_folder", config, str(tmp_path / "beam"), beam_options="")
    assert read_fingerprint(beam)["foreground_intensity"]["num_samples"] == 15
    _assert_same_build(local, beam)


def _beam_config(flags: str = ""):
    import tensorflow_datasets as tfds

    from medseg.datasets.beam import pipeline_options

    return tfds.download.DownloadConfig(beam_options=pipeline_options(flags))


@needs_beam
def test_tfds_beam_options_build_fortran_ordered_cases_as_locally(tmp_path):
    # TFDS's own DownloadConfig(beam_options=...) takes the Beam path too (tfds build)
    from test_builder_base import CASES, ToyCases, loaders_of

    local = ToyCases(loaders=loaders_of(CASES), data_dir=str(tmp_path / "local"))
    local.download_and_prepare()
    beam = ToyCases(loaders=loaders_of(CASES), data_dir=str(tmp_path / "beam"))
    beam.download_and_prepare(download_config=_beam_config())
    assert _shards(local) and _shards(local) == _shards(beam)
    assert local.info.metadata["fingerprint"] == beam.info.metadata["fingerprint"]
    assert local.info.metadata["fingerprint_hash"] == beam.info.metadata["fingerprint_hash"]
    assert beam.info.splits["train"].num_examples == len(CASES)


@needs_beam
def test_repeated_case_id_is_an_error_in_a_beam_build(tmp_path):
    from test_builder_base import CASES, ToyCases, loaders_of

    builder = ToyCases(loaders=loaders_of([CASES[0], CASES[1], CASES[0]]), data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"case id 'zeta' of case 3 .* repeats case 1"):
        builder.download_and_prepare(download_config=_beam_config())
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".lock")]


@needs_beam
def test_cli_build_with_beam(tmp_path, capsys):
    config = _write_folder(tmp_path, cases=2)
    data_dir = str(tmp_path / "tfds")
    code = cli.main(["build", "nifti_folder", "--config", config, "--data-dir", data_dir,
                     "--beam", "--beam-options=--runner=DirectRunner"])
    assert code == 0
    out = capsys.readouterr().out
    local = prepare("nifti_folder", config, str(tmp_path / "local"))
    assert f"fingerprint: {read_fingerprint(local).hash}" in out
    assert "splits: train 2" in out


def _break_image(root: Path) -> None:
    (root / "data" / "imagesTr" / "c1.nii.gz").write_bytes(b"this is not a NIfTI file")


def _break_label(root: Path) -> None:
    path = root / "data" / "labelsTr" / "c2.nii.gz"
    label = np.zeros((6, 6, 5), np.uint8)
    label[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(label, nib.load(path).affine), path)


@needs_beam
@pytest.mark.parametrize("fault", [_break_image, _break_label])
def test_failing_case_in_a_beam_build_raises_the_local_builds_error(tmp_path, fault):
    config = _write_folder(tmp_path, cases=3)
    fault(tmp_path)
    with pytest.raises(Exception) as local:
        prepare("nifti_folder", config, str(tmp_path / "local"))
    data_dir = tmp_path / "tfds"
    with pytest.raises(Exception) as beam:
        prepare("nifti_folder", config, str(data_dir), beam_options="")
    # the same class and message (naming the case's file), not a Beam wrapper
    assert type(beam.value) is type(local.value)
    assert str(beam.value) == str(local.value)
    assert str(tmp_path / "data") in str(beam.value)
    # TFDS's incomplete folder is removed: no record, shard or dataset info remains
    left = [p for p in data_dir.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert left == []


@needs_beam
def test_unknown_runner_is_refused_before_anything_is_built(tmp_path):
    config = _write_folder(tmp_path, cases=1)
    data_dir = tmp_path / "tfds"
    with pytest.raises(ConfigError, match="runner 'NoSuchRunner' cannot be used"):
        prepare("nifti_folder", config, str(data_dir), beam_options="--runner=NoSuchRunner")
    assert not data_dir.exists()


def test_beam_options_without_apache_beam_say_how_to_install_it(tmp_path, monkeypatch, capsys):
    # an import of apache_beam fails as in an environment without it
    monkeypatch.setitem(sys.modules, "apache_beam", None)
    from medseg.datasets import beam

    monkeypatch.setattr(beam, "beam", None)
    config = _write_folder(tmp_path, cases=1)
    data_dir = tmp_path / "tfds"
    with pytest.raises(ConfigError, match=r"pip install 'medseg\[beam\]'"):
        prepare("nifti_folder", config, str(data_dir), beam_options="")
    code = cli.main(["build", "nifti_folder", "--config", config, "--data-dir", str(data_dir),
                     "--beam"])
    assert code == 2
    err = capsys.readouterr().err
    assert "medseg build --beam" in err and "pip install 'medseg[beam]'" in err
    assert not data_dir.exists()


def test_cli_refuses_beam_options_without_beam(tmp_path, capsys):
    config = _write_folder(tmp_path, cases=1)
    data_dir = tmp_path / "tfds"
    code = cli.main(["build", "nifti_folder", "--config", config, "--data-dir", str(data_dir),
                     "--beam-options=--runner=DirectRunner"])
    assert code == 2
    assert "--beam-options needs --beam" in capsys.readouterr().err
    assert not data_dir.exists()


@needs_beam
@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (5, "expected flags as strings"),
        (["--runner", 3], "expected flags as strings"),
        ('--runner="DirectRunner', "cannot be split into flags (No closing quotation)"),
    ],
)
def test_unusable_beam_flags_are_refused_before_anything_is_built(tmp_path, flags, fragment):
    config = _write_folder(tmp_path, cases=1)
    data_dir = tmp_path / "tfds"
    with pytest.raises(ConfigError, match=re.escape(fragment)) as info:
        prepare("nifti_folder", config, str(data_dir), beam_options=flags)
    assert "prepare(beam_options=...) / medseg build --beam-options" in str(info.value)
    assert not data_dir.exists()
