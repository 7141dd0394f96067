"""Concurrent builds of one dataset build it once: the others wait for the build lock."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time

import pytest
import tensorflow_datasets as tfds

from medseg.datasets import build_lock_path, get_builder

BUILD = [sys.executable, "-m", "medseg.cli", "build", "kits_phantom", "--config", "tiny"]


def _start_build(data_dir, log):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(log, "w") as out:
        return subprocess.Popen(
            [*BUILD, "--data-dir", str(data_dir)], stdout=out, stderr=subprocess.STDOUT, env=env
        )


def _wait_for(text, logs, procs, timeout=180.0):
    deadline = time.time() + timeout
    while not all(text in log.read_text() for log in logs):
        for proc, log in zip(procs, logs, strict=True):
            assert proc.poll() is None, f"build ended before {text!r}:\n{log.read_text()}"
        assert time.time() < deadline, f"no {text!r} in time"
        time.sleep(0.2)


def _check_built_once(data_dir):
    builder = get_builder("kits_phantom", "tiny", str(data_dir))
    assert builder.is_prepared()
    ids = [ex["case_id"].decode() for ex in tfds.as_numpy(builder.as_dataset(split="train"))]
    assert sorted(ids) == [f"case_{i:05d}" for i in range(4)]
    # one version folder beside its lock: no second (incomplete) build was left behind
    config_dir = data_dir / "kits_phantom" / "tiny"
    assert sorted(p.name for p in config_dir.iterdir()) == ["1.1.0", "1.1.0.lock"]


def test_lock_path_is_beside_the_version_folder(tmp_path):
    builder = get_builder("kits_phantom", "tiny", str(tmp_path))
    assert build_lock_path(builder) == tmp_path / "kits_phantom" / "tiny" / "1.1.0.lock"


@pytest.mark.slow  # two medseg processes on a shared CPU: ~30 s
def test_concurrent_builds_build_once_and_the_waiter_reads_it(tmp_path):
    data_dir = tmp_path / "tfds"
    lock = build_lock_path(get_builder("kits_phantom", "tiny", str(data_dir)))
    lock.parent.mkdir(parents=True)
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    procs = []
    try:
        # the test takes the lock first, so both builds are sure to meet it
        with open(lock, "a+") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            procs = [_start_build(data_dir, log) for log in logs]
            _wait_for("medseg: waiting for", logs, procs)
            fcntl.flock(held, fcntl.LOCK_UN)
        codes = [proc.wait(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], outputs
    for out in outputs:
        assert out.count("medseg: waiting for") == 1  # one line while waiting
        assert f"(lock {lock})" in out
        # both read the built dataset: its fingerprint is printed
        assert "built kits_phantom/tiny/1.1.0" in out and "cases: 4" in out
    # one of them wrote the cases, the other only read them
    writers = [out for out in outputs if "kits_phantom: case 1/4" in out]
    assert len(writers) == 1, outputs
    _check_built_once(data_dir)


def test_a_killed_lock_holder_does_not_block_the_build(tmp_path):
    data_dir = tmp_path / "tfds"
    lock = build_lock_path(get_builder("kits_phantom", "tiny", str(data_dir)))
    lock.parent.mkdir(parents=True)
    hold = (
        "import fcntl, sys, time\n"
        "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.write('pid 1 on elsewhere'); f.flush(); print('held', flush=True); time.sleep(600)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(lock)], stdout=subprocess.PIPE, text=True
    )
    log = tmp_path / "build.log"
    build = None
    try:
        assert holder.stdout.readline().strip() == "held"
        build = _start_build(data_dir, log)
        _wait_for("medseg: waiting for pid 1 on elsewhere", [log], [build])
        os.kill(holder.pid, signal.SIGKILL)  # a build killed mid-way: the kernel frees its lock
        assert build.wait(timeout=300) == 0, log.read_text()
    finally:
        for proc in (holder, build):
            if proc is not None and proc.poll() is None:
                proc.kill()
        holder.wait()
    assert "kits_phantom: case 4/4" in log.read_text()
    _check_built_once(data_dir)
