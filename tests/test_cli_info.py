"""``medseg info``: a readable fingerprint summary from metadata only, ``--json`` raw."""

import json
import shutil
from pathlib import Path

import pytest

from medseg import datasets
from medseg.cli import main
from medseg.datasets.fingerprint import format_fingerprint


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds_info")
    builder = datasets.prepare("kits_phantom", "tiny", str(data_dir))
    return str(data_dir), datasets.read_fingerprint(builder)


def info(capsys, *argv):
    assert main(["info", "kits_phantom", "--config", "tiny", *argv]) == 0
    return capsys.readouterr().out


def test_summary_numbers_match_the_fingerprint(capsys, built):
    data_dir, fp = built
    out = info(capsys, "--data-dir", data_dir)
    lines = out.splitlines()
    assert "kits_phantom/tiny/1.1.0" in lines[0]
    assert f"cases: {fp['num_cases']}" in lines
    for index, name in enumerate(fp["class_names"]):
        (row,) = [line for line in lines if line.split()[:2] == [str(index), name]]
        fields = row.split()
        assert int(fields[2]) == fp["class_voxel_counts"][index]
        assert int(fields[-1]) == fp["class_case_counts"][index]
    spacing = " x ".join(f"{v:.3g}" for v in fp["spacing_median"])
    low = " x ".join(f"{v:.3g}" for v in fp["spacing_min"])
    high = " x ".join(f"{v:.3g}" for v in fp["spacing_max"])
    assert f"spacing (mm): median {spacing}   range {low} .. {high}" in out
    shape_low = " x ".join(str(v) for v in fp["shape_min"])
    shape_high = " x ".join(str(v) for v in fp["shape_max"])
    assert f"range {shape_low} .. {shape_high}" in out
    stats = fp["foreground_intensity"]
    assert f"mean {stats['mean']:.4g}  std {stats['std']:.4g}" in out
    assert f"min {stats['min']:.4g}  max {stats['max']:.4g}" in out
    assert (
        f"{stats['percentile_00_5']:.4g} / {stats['median']:.4g} / "
        f"{stats['percentile_99_5']:.4g}" in out
    )
    assert "{" not in out  # a summary, not the JSON


def test_json_prints_the_raw_fingerprint(capsys, built):
    data_dir, fp = built
    assert json.loads(info(capsys, "--data-dir", data_dir, "--json")) == fp


def test_reads_metadata_only(capsys, built, tmp_path):
    """Without any record file the summary is unchanged: info never opens the records."""
    data_dir, _ = built
    copy = tmp_path / "tfds"
    shutil.copytree(data_dir, copy)
    records = list(Path(copy).rglob("*.tfrecord*"))
    assert records
    for path in records:
        path.unlink()
    original = info(capsys, "--data-dir", data_dir).splitlines()[1:]
    assert info(capsys, "--data-dir", str(copy)).splitlines()[1:] == original


def test_unbuilt_dataset_is_a_clear_error(capsys, tmp_path):
    assert main(["info", "kits_phantom", "--config", "tiny", "--data-dir", str(tmp_path)]) == 2
    assert "not built" in capsys.readouterr().err


def test_format_multichannel_and_older_fingerprints():
    stats = {
        "mean": 1.0,
        "std": 2.0,
        "min": 0.0,
        "max": 3.0,
        "percentile_00_5": 0.1,
        "percentile_99_5": 2.9,
        "median": 1.5,
        "num_voxels": 10,
        "num_samples": 10,
    }
    fp = {
        "num_cases": 1,
        "class_names": ["background", "lesion"],
        "class_voxel_counts": [90, 10],
        "class_case_counts": [1, 1],
        "spacing_median": [1.0, 1.0, 1.0],
        "shape_median": [4.0, 5.0, 5.0],
        "foreground_intensity": stats,
        "foreground_intensity_per_channel": [stats, {**stats, "mean": 7.0}],
    }
    text = format_fingerprint(fp)  # no spacing_min etc.: an older build's fingerprint
    assert "range n/a .. n/a" in text
    assert "(channel 1): mean 7" in text and "(channel 0): mean 1" in text
