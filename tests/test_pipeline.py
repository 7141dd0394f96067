"""The tf.data pipeline on the tiny phantom dataset."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from numpy.lib.stride_tricks import sliding_window_view

from medseg import datasets
from medseg.config import AugmentConfig, PatchConfig, PreprocessConfig
from medseg.pipeline import (
    CaseTable,
    cache_key,
    case_order,
    check_patch_config,
    check_patch_fits,
    plan_preprocessing,
    preprocessed_cases,
    read_case_ids,
    read_cases,
    split_cases,
    training_dataset,
    validation_dataset,
)


@pytest.fixture(scope="module")
def setup(tiny_data_dir):
    builder = datasets.get_builder("kits_phantom", "tiny", tiny_data_dir)
    fingerprint = datasets.read_fingerprint(builder)
    plan = plan_preprocessing(PreprocessConfig(target_spacing=(4.0, 2.0, 2.0)), fingerprint)
    return builder, fingerprint, plan


def test_split_is_seeded_disjoint_and_complete():
    ids = [f"case_{i:05d}" for i in range(10)]
    train, val = split_cases(ids, 0.25, seed=1)
    assert sorted(train + val) == ids and not set(train) & set(val)
    assert len(val) == 2
    assert split_cases(ids, 0.25, seed=1) == (train, val)
    assert split_cases(ids, 0.25, seed=2) != (train, val)
    assert split_cases(ids[:2], 0.01, seed=0)[1]  # at least one validation case
    with pytest.raises(ValueError, match="validation_fraction"):
        split_cases(ids, 1.0, seed=0)


def test_read_cases_filters_by_id(setup):
    builder, _, _ = setup
    ids = read_case_ids(builder, "train")
    assert len(ids) == 4
    got = [
        ex["case_id"].decode() for ex in read_cases(builder, "train", ids[1:3]).as_numpy_iterator()
    ]
    assert sorted(got) == sorted(ids[1:3])


def test_patch_larger_than_volume_is_a_clear_error(setup):
    builder, fingerprint, plan = setup
    with pytest.raises(
        ValueError, match=r"patch size \(64, 64, 64\) is larger than the preprocessed"
    ):
        check_patch_fits(fingerprint, plan, (64, 64, 64), builder.info.full_name)
    check_patch_fits(fingerprint, plan, (4, 8, 8))


def _cases(builder, plan, ids, seed=0, **kwargs):
    return preprocessed_cases(builder, "train", ids, plan, num_classes=3, seed=seed, **kwargs)


@pytest.fixture(scope="module")
def table(setup):
    """The tiny training cases, preprocessed once, in memory."""
    builder, _, plan = setup
    return CaseTable.from_dataset(_cases(builder, plan, read_case_ids(builder, "train")))


def _blocks(volume, size):
    """Every ``size`` block of a (D, H, W[, C]) volume, flattened per position."""
    size = tuple(size) + volume.shape[3:]
    return sliding_window_view(volume, size).reshape(-1, int(np.prod(size)))


def _locate(table, image, size):
    """(case, flat position) of every case block equal to ``image`` (brute force)."""
    hits = []
    for k, volume in enumerate(table.images):
        blocks = _blocks(volume.numpy(), size)
        hits += [(k, int(i)) for i in np.flatnonzero((blocks == image.ravel()).all(axis=1))]
    return hits


def test_training_batches_shapes_one_hot_and_foreground(setup):
    builder, _, plan = setup
    ids = read_case_ids(builder, "train")
    patch = PatchConfig(patch_size=(4, 8, 8), batch_size=2, foreground_share=1.0)
    ds = training_dataset(_cases(builder, plan, ids), len(ids), patch, 3, seed=0)
    n_fg = 0
    for image, onehot in ds.take(10):
        assert image.shape == (2, 4, 8, 8, 1) and image.dtype == tf.float32
        assert onehot.shape == (2, 4, 8, 8, 3)
        np.testing.assert_array_equal(tf.reduce_sum(onehot, -1).numpy(), 1.0)
        n_fg += int(np.sum(np.any(onehot.numpy()[..., 1:] > 0, axis=(1, 2, 3, 4))))
    assert n_fg == 20  # every patch centred on foreground


def test_same_seed_same_batches_other_seed_other_batches(setup):
    builder, _, plan = setup
    ids = read_case_ids(builder, "train")
    patch = PatchConfig(patch_size=(4, 8, 8), batch_size=2)

    def first_batches(seed):
        ds = training_dataset(_cases(builder, plan, ids, seed), len(ids), patch, 3, seed=seed)
        return [b[0].numpy() for b in ds.take(3)]

    a, b, c = first_batches(5), first_batches(5), first_batches(6)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_validation_patches_are_fixed(setup):
    builder, _, plan = setup
    ids = read_case_ids(builder, "train")[:2]
    patch = PatchConfig(patch_size=(4, 8, 8), batch_size=2, validation_patches=3)
    ds = validation_dataset(_cases(builder, plan, ids), 2, patch, 3, seed=0)
    first = [x.numpy() for x, _ in ds]
    second = [x.numpy() for x, _ in ds]
    assert sum(len(x) for x in first) == 6
    # an odd patch count is rounded up to whole batches by cycling
    odd = PatchConfig(patch_size=(4, 8, 8), batch_size=4, validation_patches=3)
    batches = [x.numpy() for x, _ in validation_dataset(_cases(builder, plan, ids), 2, odd, 3, 0)]
    assert [len(b) for b in batches] == [4, 4]
    np.testing.assert_array_equal(batches[1][2:], batches[0][:2])
    for x, y in zip(first, second, strict=True):
        np.testing.assert_array_equal(x, y)


def _orders(count, num_cases, seed):
    """The case of each of the first ``count`` stream elements."""
    return np.array(
        [int(case_order(tf.constant(e, tf.int64), num_cases, seed)) for e in range(count)]
    )


def _batches(ds, count):
    return [(x.numpy(), y.numpy()) for x, y in ds.take(count)]


def test_batch_at_step_s_depends_only_on_seed_and_s(table):
    patch = PatchConfig(patch_size=(4, 8, 8), batch_size=3, foreground_share=0.5)
    full = _batches(training_dataset(table, len(table), patch, 3, seed=9), 7)
    for start in (1, 4):
        resumed = _batches(training_dataset(table, len(table), patch, 3, 9, start_step=start), 3)
        for (x, y), (rx, ry) in zip(full[start : start + 3], resumed, strict=True):
            np.testing.assert_array_equal(x, rx)
            np.testing.assert_array_equal(y, ry)
    # the patches are genuinely random: no two batches of the stream coincide
    assert len({x.tobytes() for x, _ in full}) == len(full)


def test_case_order_visits_every_case_once_per_round():
    n = 5
    order = _orders(40, n, seed=3)
    rounds = order.reshape(-1, n)
    for r in rounds:
        assert sorted(r.tolist()) == list(range(n))
    assert len({tuple(r) for r in rounds}) > 1  # reshuffled each round
    assert not np.array_equal(order, _orders(40, n, seed=4))


def test_training_patches_are_blocks_of_the_cached_cases(table):
    patch = PatchConfig(patch_size=(4, 8, 8), batch_size=2)
    n = 3
    batches = _batches(training_dataset(table, len(table), patch, 3, seed=1), n)
    expected_cases = _orders(2 * n, len(table), 1)
    elements = [pair for x, y in batches for pair in zip(x, y, strict=True)]
    for e, (image, onehot) in enumerate(elements):
        hits = _locate(table, image, (4, 8, 8))
        assert hits and {k for k, _ in hits} == {expected_cases[e]}
        k, i = hits[0]
        label = _blocks(table.labels[k].numpy(), (4, 8, 8))[i]
        np.testing.assert_array_equal(np.argmax(onehot, -1).ravel(), label)


def test_case_without_foreground_neither_hangs_nor_fails_in_the_pipeline(table):
    blank = CaseTable(
        case_ids=("blank", table.case_ids[0]),
        images=(table.images[1], table.images[0]),
        labels=(tf.zeros_like(table.labels[1]), table.labels[0]),
        coords=(tf.zeros([0, 3], tf.int32), table.coords[0]),
        classes=(tf.zeros([0], tf.int32), table.classes[0]),
    )
    patch = PatchConfig(
        patch_size=(4, 8, 8),
        batch_size=2,
        foreground_share=1.0,
        min_foreground=0.5,
        max_redraws=8,
    )
    order = _orders(16, 2, 0).reshape(8, 2)
    for (x, y), cases in zip(
        _batches(training_dataset(blank, 2, patch, 3, 0), 8), order, strict=True
    ):
        assert x.shape == (2, 4, 8, 8, 1)
        for b, case in enumerate(cases):
            has_foreground = bool(np.any(np.argmax(y[b], -1) > 0))
            assert has_foreground == (case == 1)  # the real case is centred on foreground


def test_slice_mode_gives_2d_inputs_of_slabs(table):
    patch = PatchConfig(patch_size=(3, 8, 8), batch_size=2, mode="slice")
    x, y = _batches(training_dataset(table, len(table), patch, 3, seed=2), 1)[0]
    assert x.shape == (2, 8, 8, 3) and y.shape == (2, 8, 8, 3)
    for image, onehot in zip(x, y, strict=True):
        slab = np.transpose(image.reshape(8, 8, 3, 1), (2, 0, 1, 3))  # back to (k, H, W, C)
        hits = _locate(table, slab, (3, 8, 8))
        assert hits
        k, i = hits[0]
        labels = _blocks(table.labels[k].numpy(), (3, 8, 8))[i].reshape(3, 8, 8)
        np.testing.assert_array_equal(np.argmax(onehot, -1), labels[1])  # the centre slice
    # 2D inputs go through augmentation too (its 2D path: axes the slice lacks are ignored)
    augmented = training_dataset(table, len(table), patch, 3, 2, augment=AugmentConfig(jit=False))
    ax, ay = _batches(augmented, 1)[0]
    assert ax.shape == x.shape and ay.shape == y.shape and np.isfinite(ax).all()
    np.testing.assert_array_equal(ay.sum(-1), 1.0)


def test_full_mode_gives_whole_padded_cases(table):
    patch = PatchConfig(patch_size=(4, 8, 8), batch_size=1, mode="full", pad_multiple=8)
    batches = _batches(training_dataset(table, len(table), patch, 3, seed=4), 3)
    cases = _orders(3, len(table), 4)
    for (x, y), case in zip(batches, cases, strict=True):
        image, label = table.images[case].numpy(), table.labels[case].numpy()
        target = [-(-max(s, 4) // 8) * 8 for s in label.shape]
        pads = [(0, t - s) for t, s in zip(target, label.shape, strict=True)]
        np.testing.assert_array_equal(x[0], np.pad(image, pads + [(0, 0)]))
        np.testing.assert_array_equal(np.argmax(y[0], -1), np.pad(label, pads))
    with pytest.raises(ValueError, match=r"patch.mode='full' cannot be augmented"):
        training_dataset(table, len(table), patch, 3, 4, augment=AugmentConfig())
    # a batch of differently shaped cases is padded to its largest
    patch2 = dataclasses.replace(patch, batch_size=2)
    x, _ = _batches(training_dataset(table, len(table), patch2, 3, seed=4), 1)[0]
    largest = [max(table.labels[c].shape[a] for c in cases[:2]) for a in range(3)]
    assert list(x.shape[1:4]) == [-(-s // 8) * 8 for s in largest]


def test_patch_config_errors_name_the_key(table):
    # refused when the config is made
    refused = {
        "mode": ("volume", "'patch.mode': 'volume' is not one of 'patch', 'slice', 'full'"),
        "min_foreground": (1.5, r"'patch.min_foreground': 1.5 is not in \[0, 1\]"),
        "max_redraws": (-1, "'patch.max_redraws': -1 is not ≥ 0"),
    }
    for key, (value, message) in refused.items():
        with pytest.raises(ValueError, match=message):
            PatchConfig(**{key: value})
    # a combination only the pipeline knows to be wrong
    config = PatchConfig(patch_size=(2, 8, 8), mode="slice")
    with pytest.raises(ValueError, match="slice mode needs an odd slab"):
        check_patch_config(config)
    with pytest.raises(ValueError, match="slice mode needs an odd slab"):
        training_dataset(table, len(table), config, 3, 0)


def _cache_entries(root):
    return sorted(p.name for p in Path(root).glob("*/*"))


def test_file_cache_is_reused_and_a_new_plan_gets_its_own(setup, tmp_path, monkeypatch):
    builder, fingerprint, plan = setup
    ids = read_case_ids(builder, "train")[:2]
    memory = CaseTable.from_dataset(_cases(builder, plan, ids))
    first = CaseTable.from_dataset(_cases(builder, plan, ids, cache_dir=tmp_path))
    entries = _cache_entries(tmp_path)
    assert (
        len(entries) == 1
        and (
            Path(tmp_path) / builder.info.full_name.replace("/", "_") / entries[0] / "cases.index"
        ).is_file()
    )
    for a, b in zip(memory.images, first.images, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    # a second pipeline with the same plan reads the cache: preprocessing is not run
    import medseg.pipeline.cache as cache_module

    real = cache_module.preprocess_case

    def poisoned(image, label, spacing, plan, **kwargs):
        image, label = real(image, label, spacing, plan, **kwargs)
        return image + 1e4, label

    monkeypatch.setattr(cache_module, "preprocess_case", poisoned)
    again = CaseTable.from_dataset(_cases(builder, plan, ids, cache_dir=tmp_path))
    assert _cache_entries(tmp_path) == entries
    for a, b in zip(first.images, again.images, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    # another plan (another clip) is another key: preprocessed afresh, not the stale cache
    other = plan_preprocessing(
        PreprocessConfig(target_spacing=(4.0, 2.0, 2.0), clip=(-50.0, 200.0)), fingerprint
    )
    fresh = CaseTable.from_dataset(_cases(builder, other, ids, cache_dir=tmp_path))
    assert len(_cache_entries(tmp_path)) == 2
    assert all(float(tf.reduce_min(image)) > 5e3 for image in fresh.images)  # poisoned: fresh


def test_interrupted_file_cache_write_is_not_taken_for_a_cache(setup, tmp_path, monkeypatch):
    builder, _, plan = setup
    ids = read_case_ids(builder, "train")
    import medseg.pipeline.cache as cache_module

    real = cache_module.read_cases

    def failing_after_two(*args, **kwargs):
        ds = real(*args, **kwargs)

        def fail(ex):
            tf.debugging.assert_equal(1, 0, message="simulated crash while caching")
            return ex

        return ds.take(2).concatenate(ds.skip(2).map(fail))

    monkeypatch.setattr(cache_module, "read_cases", failing_after_two)
    with pytest.raises(tf.errors.InvalidArgumentError, match="simulated crash"):
        _cases(builder, plan, ids, cache_dir=tmp_path)
    assert _cache_entries(tmp_path) == []  # neither a cache nor a partial one is left
    monkeypatch.setattr(cache_module, "read_cases", real)
    # what tf.data leaves after a kill mid-write: a lockfile and a temp shard, no index
    key = cache_key(builder, "train", ids, plan, 3, 0)
    killed = Path(tmp_path) / builder.info.full_name.replace("/", "_") / f"{key}.partial-4999999-0"
    killed.mkdir(parents=True)
    (killed / "cases_0.lockfile").write_text("")
    (killed / "cases_0.data-00000-of-00001.tempstate1").write_bytes(b"half")
    complete = CaseTable.from_dataset(_cases(builder, plan, ids, cache_dir=tmp_path))
    assert len(complete) == len(ids)
    assert _cache_entries(tmp_path) == [key]  # the dead run's partial write is cleared


def test_augmentation_applies_to_each_sampled_patch_and_its_labels(table):
    # only mirroring along the last axis, always: the augmented stream is the plain one
    # flipped, patch for patch (augmentation has its own seed stream, placement is unchanged)
    never = {
        f.name: 0.0 for f in dataclasses.fields(AugmentConfig) if f.name.endswith("probability")
    }
    flip = AugmentConfig(**{**never, "flip_probability": 1.0, "flip_axes": (2,), "jit": False})
    patch = PatchConfig(patch_size=(4, 8, 8), batch_size=2)
    plain = _batches(training_dataset(table, len(table), patch, 3, seed=5), 2)
    flipped = _batches(training_dataset(table, len(table), patch, 3, 5, augment=flip), 2)
    for (x, y), (fx, fy) in zip(plain, flipped, strict=True):
        np.testing.assert_array_equal(fx, x[:, :, :, ::-1])
        np.testing.assert_array_equal(fy, y[:, :, :, ::-1])
    off = dataclasses.replace(flip, enabled=False)
    unchanged = _batches(training_dataset(table, len(table), patch, 3, 5, augment=off), 2)
    np.testing.assert_array_equal(unchanged[0][0], plain[0][0])


# --- the file cache's writer lock ------------------------------------------------------

SLOW_CACHE_WRITER = """
import sys, time
from pathlib import Path
import tensorflow as tf
from medseg.pipeline import cache

cache.HEARTBEAT_S = 0.2  # refreshed often, so the test sees a beat

def cases():
    yield 1
    time.sleep(600)  # hangs mid-write until killed
    yield 2

ds = tf.data.Dataset.from_generator(cases, output_signature=tf.TensorSpec((), tf.int64))
root = Path(sys.argv[1])
cache._write_file_cache(ds, root, root / "k")
"""


def _writer_lock_record(lock):
    import json

    return json.loads(lock.read_text())


def test_cache_writer_killed_with_sigkill_is_stale_and_its_partial_removed(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import medseg.pipeline.cache as cache_module

    root = tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CACHE_WRITER, str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 120
        while not (list(root.glob("k.partial-*.writer")) and list(root.glob("k.partial-*/"))):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "the writer never started"
            time.sleep(0.1)
        (lock,) = root.glob("k.partial-*.writer")
        (partial,) = (p for p in root.glob("k.partial-*") if p.is_dir())
        first = _writer_lock_record(lock)
        assert first["pid"] == proc.pid
        # the heartbeat is refreshed while the writer writes
        while _writer_lock_record(lock)["heartbeat"] <= first["heartbeat"]:
            assert time.time() < deadline, "the heartbeat was never refreshed"
            time.sleep(0.1)
        # a live writer of this host: kept
        assert not cache_module._writer_is_stale(lock)
        cache_module._remove_stale_partials(root, "k")
        assert partial.is_dir() and lock.is_file()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # killed: its heartbeat is still recent, but its PID on this host is dead
    assert time.time() - _writer_lock_record(lock)["heartbeat"] < cache_module.WRITER_TIMEOUT_S
    assert cache_module._writer_is_stale(lock)
    # the next writer clears the dead one's partial write and writes the cache
    cache_module._write_file_cache(tf.data.Dataset.range(3), root, root / "k")
    assert sorted(p.name for p in root.iterdir()) == ["k"]
    assert (root / "k" / "cases.index").is_file()
    read = tf.data.Dataset.range(0).cache(str(root / "k" / "cases"))  # input unused: cached
    assert [int(x) for x in read.as_numpy_iterator()] == [0, 1, 2]


def test_cache_writer_lock_of_another_host_is_judged_by_its_heartbeat(tmp_path):
    import json
    import os
    import time

    import medseg.pipeline.cache as cache_module

    root = tmp_path / "cache"
    partial = root / "k.partial-elsewhere"
    partial.mkdir(parents=True)
    (partial / "cases_0.lockfile").write_text("")
    lock = root / "k.partial-elsewhere.writer"
    dead_pid = 2**22 + 12345  # above Linux's pid_max: no such process here

    def write(host, pid, age):
        record = {"host": host, "boot_id": "b", "pid": pid, "heartbeat": time.time() - age}
        lock.write_text(json.dumps(record))

    # another host's writer with a fresh heartbeat: its PID means nothing here, kept
    write("node-17", dead_pid, age=5.0)
    assert not cache_module._writer_is_stale(lock)
    cache_module._remove_stale_partials(root, "k")
    assert partial.is_dir() and lock.is_file()
    # ... with a heartbeat older than the timeout: dead, removed with its partial write
    write("node-17", dead_pid, age=cache_module.WRITER_TIMEOUT_S + 60)
    assert cache_module._writer_is_stale(lock)
    # this host, a live PID (ours) but no heartbeat for long: stale too (a reused PID)
    mine = cache_module._host()
    lock.write_text(json.dumps({**mine, "pid": os.getpid(), "heartbeat": time.time() - 1e4}))
    assert cache_module._writer_is_stale(lock)
    lock.write_text(json.dumps({**mine, "pid": os.getpid(), "heartbeat": time.time()}))
    assert not cache_module._writer_is_stale(lock)
    write("node-17", dead_pid, age=cache_module.WRITER_TIMEOUT_S + 60)
    cache_module._remove_stale_partials(root, "k")
    assert list(root.iterdir()) == []
    # a partial folder without a lock is never a live writer's (an older medseg's, or
    # its writer's lock was already cleared): removed
    partial.mkdir()
    cache_module._remove_stale_partials(root, "k")
    assert list(root.iterdir()) == []
