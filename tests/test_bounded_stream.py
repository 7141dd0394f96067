"""The bounded-memory training stream: cases in shards on disk, a sliding resident window."""

import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf

from medseg import datasets
from medseg.config import PatchConfig, PreprocessConfig
from medseg.io import MedsegIOError
from medseg.pipeline import (
    CaseTable,
    ShardedCases,
    describe_stream_memory,
    plan_preprocessing,
    preprocessed_cases,
    read_case_ids,
    resident_cases,
    sharded_cases,
    stream_memory,
    training_dataset,
    validation_dataset,
    write_case_shards,
)
from medseg.pipeline.patches import foreground_locations

SHAPE = (6, 8, 8)
SPEC = {
    "case_id": tf.TensorSpec([], tf.string),
    "image": tf.TensorSpec([None, None, None, 1], tf.float32),
    "label": tf.TensorSpec([None, None, None], tf.uint8),
    "coords": tf.TensorSpec([None, 3], tf.int32),
    "classes": tf.TensorSpec([None], tf.int32),
}


def _numbered_cases(count, shape=SHAPE):
    """Cases whose every voxel holds the case's number (a patch tells its case), one
    foreground block each; extents differ per case (cases keep their own shapes)."""

    def generate():
        for i in range(count):
            size = (shape[0] + i % 2, shape[1], shape[2] + i % 3)
            label = np.zeros(size, np.uint8)
            label[2:4, 2:5, 3:6] = 1
            coords, classes = foreground_locations(tf.constant(label), 2, tf.constant([0, i]))
            yield {
                "case_id": f"case_{i:03d}",
                "image": np.full(size + (1,), float(i), np.float32),
                "label": label,
                "coords": coords,
                "classes": classes,
            }

    return tf.data.Dataset.from_generator(generate, output_signature=SPEC)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_case_shards(_numbered_cases(10), tmp_path_factory.mktemp("cache") / "shards")


PATCH = PatchConfig(
    patch_size=(2, 4, 4), batch_size=2, cases_in_memory=3, replace_every=2, replace_share=0.34
)


def _batches(ds, count):
    return [(x.numpy(), y.numpy()) for x, y in ds.take(count)]


def test_shards_hold_the_cases_sorted_and_read_back_exactly(shards, tmp_path):
    cases = list(_numbered_cases(10))
    assert shards.case_ids == tuple(f"case_{i:03d}" for i in range(10))
    table = shards.table()
    for case, image, label, coords in zip(
        cases, table.images, table.labels, table.coords, strict=True
    ):
        np.testing.assert_array_equal(image.numpy(), case["image"].numpy())
        np.testing.assert_array_equal(label.numpy(), case["label"].numpy())
        np.testing.assert_array_equal(coords.numpy(), case["coords"].numpy())
    expected = [
        sum(case[k].numpy().nbytes for k in ("image", "label", "coords", "classes"))
        for case in cases
    ]
    assert list(shards.nbytes) == expected
    # nothing left beside the shards but the folder itself (partial folder and lock gone)
    assert [p.name for p in shards.folder.parent.iterdir()] == ["shards"]


def test_resumed_bounded_stream_yields_the_uninterrupted_batches(shards):
    whole = _batches(training_dataset(shards, 10, PATCH, 2, seed=3), 9)
    # resume mid-phase (step 5 of phases of 2 steps) and at a phase boundary (step 4)
    for start in (5, 4):
        resumed = _batches(training_dataset(shards, 10, PATCH, 2, seed=3, start_step=start), 4)
        for (x, y), (xr, yr) in zip(whole[start:], resumed, strict=False):
            np.testing.assert_array_equal(x, xr)
            np.testing.assert_array_equal(y, yr)
    other = _batches(training_dataset(shards, 10, PATCH, 2, seed=4), 9)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(whole, other, strict=True))


@dataclasses.dataclass(frozen=True)
class _CountingShards(ShardedCases):
    """The real shards, recording each case the stream reads from disk (in read order)."""

    def load(self, index):
        record = tf.py_function(lambda i: READS.append(int(i)) or 0, [index], tf.int32)
        with tf.control_dependencies([record]):
            index = tf.identity(index)
        return super().load(index)


READS = []


def test_at_most_cases_in_memory_resident_and_every_case_visited(shards):
    counting = _CountingShards(
        **{f.name: getattr(shards, f.name) for f in dataclasses.fields(shards)}
    )
    READS.clear()
    phases = 12  # r = round(3 * 0.34) = 1 new case per phase: 10 phases go round all 10
    batches = _batches(training_dataset(counting, 10, PATCH, 2, seed=3), phases * 2)
    cases_seen = [x[:, 0, 0, 0, 0].astype(int) for x, _ in batches]
    visited = set()
    for phase in range(phases):
        drawn = set(np.concatenate(cases_seen[2 * phase : 2 * phase + 2]).tolist())
        resident = resident_cases(phase, 10, 3, 0.34, seed=3)
        assert len(set(resident.tolist())) == 3 and drawn <= set(resident.tolist())
        visited |= drawn
    assert visited == set(range(10))
    # shard reads: the 3 cases of phase 0, then only the 1 new case of each later phase
    # (the stream may run a few phases ahead of the batches taken)
    expected = list(resident_cases(0, 10, 3, 0.34, 3))
    expected += [resident_cases(p, 10, 3, 0.34, 3)[-1] for p in range(1, phases + 20)]
    assert len(READS) >= 2 + phases
    assert READS == expected[: len(READS)]


def test_window_covering_every_case_is_the_in_memory_stream(shards):
    table = shards.table()
    memory = _batches(
        training_dataset(table, 10, dataclasses.replace(PATCH, cases_in_memory=None), 2, 1), 4
    )
    full = _batches(
        training_dataset(shards, 10, dataclasses.replace(PATCH, cases_in_memory=10), 2, 1), 4
    )
    for (x, y), (xs, ys) in zip(memory, full, strict=True):
        np.testing.assert_array_equal(x, xs)
        np.testing.assert_array_equal(y, ys)


def test_validation_from_shards_equals_in_memory_validation(shards):
    patch = dataclasses.replace(PATCH, validation_patches=3)
    from_disk = _batches(validation_dataset(shards, 10, patch, 2, seed=5), 100)
    memory = _batches(validation_dataset(shards.table(), 10, patch, 2, seed=5), 100)
    assert len(from_disk) == len(memory) == 15  # 10 cases x 3 patches / batch 2
    for (x, y), (xm, ym) in zip(from_disk, memory, strict=True):
        np.testing.assert_array_equal(x, xm)
        np.testing.assert_array_equal(y, ym)


def test_planned_memory_is_the_largest_resident_cases(shards):
    # window 3 + 1 loading ahead: the four largest shards
    resident, nbytes = stream_memory(shards, 10, PATCH)
    assert resident == 4 and nbytes == sum(sorted(shards.nbytes)[-4:])
    line = describe_stream_memory(shards, 10, PATCH)
    assert "at most 4 of 10" in line and f"{nbytes / 2**20:.1f} MiB ({nbytes} bytes)" in line
    everything = dataclasses.replace(PATCH, cases_in_memory=None)
    assert stream_memory(shards, 10, everything) == (10, sum(shards.nbytes))
    table = shards.table()
    assert stream_memory(table, 10, everything) == (10, sum(shards.nbytes))
    assert "all 7 preprocessed cases" in describe_stream_memory(_numbered_cases(7), 7, everything)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("cases_in_memory", 0, "patch.cases_in_memory=0 must be ≥ 1"),
        ("replace_every", 0, "patch.replace_every=0 must be ≥ 1"),
        ("replace_share", 0.0, r"patch.replace_share=0.0 must be in \(0, 1\]"),
        ("replace_share", 1.5, r"patch.replace_share=1.5 must be in \(0, 1\]"),
    ],
)
def test_bounded_stream_config_errors_name_the_key(shards, key, value, fragment):
    with pytest.raises(ValueError, match=fragment):
        training_dataset(shards, 10, dataclasses.replace(PATCH, **{key: value}), 2, 0)


def test_bounded_stream_needs_cases_on_disk(shards, tmp_path):
    with pytest.raises(ValueError, match=r"patch.cases_in_memory=3 streams cases from shards"):
        training_dataset(shards.table(), 10, PATCH, 2, 0)
    with pytest.raises(ValueError, match="num_cases=9 but the case dataset holds 10"):
        training_dataset(shards, 9, PATCH, 2, 0)


def test_damaged_shards_are_clear_errors(shards, tmp_path):
    folder = tmp_path / "shards"
    write_case_shards(_numbered_cases(3), folder)
    with pytest.raises(FileExistsError, match="case shards are already written here"):
        write_case_shards(_numbered_cases(3), folder)
    index = json.loads((folder / "index.json").read_text())
    image = folder / f"{index['cases'][0]['file']}.image"
    image.write_bytes(image.read_bytes()[:-8])
    with pytest.raises(MedsegIOError, match=r"the image of case case_000 holds \d+ bytes, .* says"):
        ShardedCases.open(folder)
    (folder / f"{index['cases'][1]['file']}.coords").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"1 case shard file\(s\) listed in .*index.json are missing"
    ):
        ShardedCases.open(folder)
    (folder / "index.json").write_text("{not json")
    with pytest.raises(MedsegIOError, match=r"index.json is not a shard index"):
        ShardedCases.open(folder)
    with pytest.raises(FileNotFoundError, match="no case shards here"):
        ShardedCases.open(tmp_path / "elsewhere")


@pytest.fixture(scope="module")
def setup(tiny_data_dir):
    builder = datasets.get_builder("kits_phantom", "tiny", tiny_data_dir)
    fingerprint = datasets.read_fingerprint(builder)
    plan = plan_preprocessing(PreprocessConfig(target_spacing=(4.0, 2.0, 2.0)), fingerprint)
    return builder, plan


def test_sharded_cases_are_written_once_into_the_file_cache(setup, tmp_path):
    builder, plan = setup
    ids = read_case_ids(builder, "train")
    memory = CaseTable.from_dataset(preprocessed_cases(builder, "train", ids, plan, 3, 0))
    first = sharded_cases(builder, "train", ids, plan, 3, 0, cache_dir=tmp_path)
    # inside the plan-keyed file cache folder, beside its tf.data cache files
    assert (first.folder.parent / "cases.index").is_file()
    assert first.case_ids == memory.case_ids
    for a, b in zip(memory.images, first.table().images, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    written = {p: p.stat().st_mtime_ns for p in first.folder.iterdir()}
    assert len(written) == 4 * len(ids) + 1  # four field files per case and the index
    again = sharded_cases(builder, "train", ids, plan, 3, 0, cache_dir=tmp_path)
    assert again == first
    assert {p: p.stat().st_mtime_ns for p in again.folder.iterdir()} == written
    with pytest.raises(ValueError, match="preprocess.cache_dir is not set"):
        sharded_cases(builder, "train", ids, plan, 3, 0, cache_dir=None)


def test_train_reports_the_planned_stream_memory_and_trains_from_shards(
    tiny_config, tmp_path, capsys
):
    from medseg.workflows.experiment import prepare_data, train_model

    overrides = {
        "patch.cases_in_memory": 1,
        "patch.replace_every": 1,
        "train.epochs": 1,
        "augment.enabled": False,
    }
    config = tiny_config(**overrides, **{"preprocess.cache_dir": str(tmp_path)})
    setup = prepare_data(config)
    n = len(setup.train_ids)
    assert n >= 3
    _, history = train_model(config, setup)
    assert np.isfinite(history["loss"]).all()
    out = capsys.readouterr().out
    folders = [ShardedCases.open(p.parent) for p in tmp_path.glob("*/*/shards/index.json")]
    (shards,) = [s for s in folders if s.case_ids == tuple(setup.train_ids)]
    assert len(folders) == 2  # training and validation cases, each as shards
    planned = sum(sorted(shards.nbytes)[-2:])
    assert f"training stream: at most 2 of {n} preprocessed cases in memory" in out
    assert f"({planned} bytes)" in out
    with pytest.raises(ValueError, match="preprocess.cache_dir is not set"):
        train_model(tiny_config(**overrides), setup)
