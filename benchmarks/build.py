"""Benchmark: building a nifti_folder dataset against a bare nibabel read of its files.

Generates ``--cases`` KiTS19-sized int16 CT volumes (phantom anatomy with CT noise, so
they compress like real CT) as ``.nii.gz`` into a cached work dir, then measures, each
in a fresh subprocess so its peak RSS (``ru_maxrss``) is its own:

* ``read``: ``np.asanyarray(nib.load(p).dataobj)`` of every image and label;
* ``build``: ``nifti_folder`` ``download_and_prepare`` of the same files into a fresh
  data dir, with the time split into read (``read_nifti_case``), fingerprint, serialize
  (``medseg.datasets.records``: C-order volume bytes into a ``tf.train.Example``) and
  write (TFRecord shards). ``read`` runs in CaseBuilder's lookahead thread, overlapping
  the rest, so "other" is the build's time less the main thread's parts only.

With ``--workers 1 2`` the build is measured once per worker count (``CaseBuilder.workers``:
cases read by a process pool, in order, the parent fingerprinting and writing); with
more than one worker the reads happen in the pool's processes, so the "read" part is
not timed: "wait" is the main thread waiting for the next case (from the lookahead
thread or the pool), "map" mapping a pool process's shared memory block, and the
build process's own CPU time (user, system) is printed beside (the pool's is not in it).

Usage::

    python benchmarks/build.py --cases 4 --shape 100 256 256   # quick check
    python benchmarks/build.py --cases 20 --shape 64 256 256 --workers 1 2
    python benchmarks/build.py --cases 10 && python benchmarks/build.py --cases 20

MB/s counts uncompressed image voxel bytes (labels excluded) per second.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_WORK_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medseg-bench"


def case_dir(work_dir: Path, shape) -> Path:
    return work_dir / "cases_{}x{}x{}".format(*shape)


def generate(work_dir: Path, shape, count: int) -> Path:
    """Write the missing cases ``case_000 .. case_{count-1}`` (cached between runs)."""
    import nibabel as nib
    import numpy as np
    from medseg_datasets.kits_phantom.phantom import PhantomSpec, make_case

    from medseg.io import kits19_affine

    slices, rows, cols = shape
    if rows != cols:
        raise ValueError(f"the phantom is square in-plane; got {rows} x {cols}")
    root = case_dir(work_dir, shape)
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    # a fixed 2.5 mm slice step makes the scan length give the slice count
    spec = PhantomSpec(
        inplane=rows,
        z_extent_mm=(slices * 2.5, slices * 2.5),
        slice_spacing_mm=(2.5, 2.5),
    )
    for index in range(count):
        image_path = root / "imagesTr" / f"case_{index:03d}.nii.gz"
        label_path = root / "labelsTr" / f"case_{index:03d}.nii.gz"
        if image_path.exists() and label_path.exists():
            continue
        start = time.perf_counter()
        image, label, spacing = make_case((1234, index), spec)
        image, label = _fit(image, slices, -1000), _fit(label, slices, 0)
        affine = kits19_affine(spacing)
        # write to a temporary name first: an interrupted run leaves no half file cached
        for array, path in ((label, label_path), (image, image_path)):
            partial = path.with_name("partial_" + path.name)
            nib.save(nib.Nifti1Image(np.ascontiguousarray(array), affine), partial)
            partial.rename(path)
        print(f"generated {image_path} ({time.perf_counter() - start:.1f} s)", flush=True)
    return root


def _fit(array, slices, fill):
    """Crop or pad (with ``fill``) axis 0 to ``slices``."""
    import numpy as np

    if array.shape[0] >= slices:
        return array[:slices]
    pad = np.full((slices - array.shape[0], *array.shape[1:]), fill, array.dtype)
    return np.concatenate([array, pad])


def run_dir(work_dir: Path, shape, count: int) -> Path:
    """A folder of symlinks to the first ``count`` cases, so a glob selects exactly them."""
    source = case_dir(work_dir, shape)
    root = work_dir / "runs" / "{}x{}x{}_n{}".format(*shape, count)
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            link = root / sub / f"case_{index:03d}.nii.gz"
            if not link.exists():
                link.symlink_to(source / sub / link.name)
    return root


def peak_rss_mb() -> float:
    # Linux reports ru_maxrss in kilobytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_read(root: Path) -> dict:
    import nibabel as nib
    import numpy as np

    image_bytes = 0
    start = time.perf_counter()
    for path in sorted((root / "imagesTr").glob("*.nii.gz")):
        image = np.asanyarray(nib.load(path).dataobj)
        label = np.asanyarray(nib.load(root / "labelsTr" / path.name).dataobj)
        image_bytes += image.nbytes
        del image, label
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "image_bytes": image_bytes, "peak_rss_mb": peak_rss_mb()}


class _Timer:
    """Accumulated wall time of wrapped functions, by name."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, name, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

        return timed


def measure_build(root: Path, data_dir: Path, workers: int = 1) -> dict:
    import concurrent.futures

    import psutil
    import tensorflow as tf
    from medseg_datasets.nifti_folder import Builder, NiftiFolderConfig

    import medseg.io
    from medseg.datasets import builder as case_builder
    from medseg.datasets import records
    from medseg.datasets.fingerprint import FingerprintAccumulator

    baseline_mb = psutil.Process().memory_info().rss / 2**20
    # instrument without touching the code under test: each wrapper adds its wall time
    timer = _Timer()
    medseg.io.read_nifti_case = timer.wrap("read", medseg.io.read_nifti_case)
    FingerprintAccumulator.add = timer.wrap("fingerprint", FingerprintAccumulator.add)
    serializer = records.CaseSerializer
    serializer.serialize = timer.wrap("serialize", serializer.serialize)

    class TimedWriter(tf.io.TFRecordWriter):
        write = timer.wrap("write", tf.io.TFRecordWriter.write)

    records._record_writer = TimedWriter
    # the main thread waiting for a case: on the lookahead thread (1 worker) or the pool
    future = concurrent.futures.Future
    future.result = timer.wrap("wait", future.result)
    # mapping a pool process's shared memory block (workers > 1)
    from_shared = timer.wrap("map", case_builder._from_shared)

    def first_mapped(result):
        # how long the pool takes to start and deliver its first case
        timer.seconds.setdefault("first_case", time.perf_counter() - start)
        return from_shared(result)

    case_builder._from_shared = first_mapped

    config = NiftiFolderConfig(
        name="bench",
        root=str(root),
        images="imagesTr/*.nii.gz",
        label_template="labelsTr/{case}.nii.gz",
        class_names=("background", "kidney", "tumour"),
    )
    builder = Builder(config=config, data_dir=str(data_dir))
    builder.workers = workers
    start = time.perf_counter()
    cpu_start = resource.getrusage(resource.RUSAGE_SELF)
    builder.download_and_prepare()
    seconds = time.perf_counter() - start
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    # this process's own CPU (the pool processes' is not counted)
    timer.seconds["cpu_user"] = cpu.ru_utime - cpu_start.ru_utime
    timer.seconds["cpu_system"] = cpu.ru_stime - cpu_start.ru_stime
    num_cases = builder.info.splits["train"].num_examples
    stored = sum(f.stat().st_size for f in Path(builder.data_dir).glob("*.tfrecord*"))
    return {
        "seconds": seconds,
        "num_cases": num_cases,
        "stored_bytes": stored,
        "workers": workers,
        "parts": timer.seconds,
        "baseline_rss_mb": baseline_mb,
        "peak_rss_mb": peak_rss_mb(),
    }


def _subprocess(mode: str, args, workers: int = 1) -> dict:
    command = [
        sys.executable,
        __file__,
        "--measure",
        mode,
        "--workers",
        str(workers),
        "--cases",
        str(args.cases),
        "--shape",
        *map(str, args.shape),
        "--work-dir",
        str(args.work_dir),
    ]
    return _run(mode, command)


def _run(mode: str, command: list[str]) -> dict:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr[-5000:])
        raise SystemExit(f"{mode} measurement failed ({done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(args, read: dict, build: dict) -> dict:
    megabytes = read["image_bytes"] / 1e6
    parts = build["parts"]
    # read runs in the lookahead thread, overlapping the main thread's parts
    accounted = sum(parts.get(k, 0.0) for k in ("fingerprint", "serialize", "write", "wait", "map"))
    summary = {
        "cases": args.cases,
        "shape": list(args.shape),
        "image_mb": megabytes,
        "read_s": read["seconds"],
        "read_mb_s": megabytes / read["seconds"],
        "read_peak_rss_mb": read["peak_rss_mb"],
        "workers": build["workers"],
        "build_s": build["seconds"],
        "build_mb_s": megabytes / build["seconds"],
        "build_peak_rss_mb": build["peak_rss_mb"],
        "build_baseline_rss_mb": build["baseline_rss_mb"],
        "build_over_read": build["seconds"] / read["seconds"],
        "stored_mb": build["stored_bytes"] / 1e6,
        "parts_s": {**parts, "other": build["seconds"] - accounted},
    }
    print(f"{args.cases} cases of {' x '.join(map(str, args.shape))} int16 ({megabytes:.0f} MB)")
    print(
        f"  bare nibabel read: {read['seconds']:7.1f} s  {summary['read_mb_s']:7.1f} MB/s"
        f"  peak RSS {read['peak_rss_mb']:7.0f} MB"
    )
    print(
        f"  build, {build['workers']} worker(s):{build['seconds']:6.1f} s  {summary['build_mb_s']:7.1f} MB/s"
        f"  peak RSS {build['peak_rss_mb']:7.0f} MB"
        f" (TF imported: {build['baseline_rss_mb']:.0f} MB)"
    )
    target = 1.5 if build["workers"] == 1 else 1.3
    print(f"  build / read: {summary['build_over_read']:.2f}  (target <= {target})")
    print(f"  records on disk: {summary['stored_mb']:.0f} MB")
    print("  where the build's time goes:")
    labels = {
        "read": "read (read_nifti_case; lookahead thread)",
        "fingerprint": "fingerprint",
        "serialize": "serialize (tf.train.Example, C order)",
        "write": "write (TFRecord shards)",
        "wait": "wait (for the next case to be read)",
        "map": "map (a worker's shared memory block)",
        "other": "other (buffer, info, metadata)",
    }
    for key, label in labels.items():
        value = summary["parts_s"].get(key, 0.0)
        share = 100 * value / build["seconds"]
        print(f"    {label:42s} {value:7.1f} s  {share:5.1f} %")
    if "first_case" in parts:
        print(f"  first case from the pool after {parts['first_case']:.1f} s")
    print(
        f"  this process's CPU: {parts.get('cpu_user', 0.0):.1f} s user, "
        f"{parts.get('cpu_system', 0.0):.1f} s system"
    )
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--shape", type=int, nargs=3, default=[200, 512, 512])
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1],
        help="build with each of these worker counts (CaseBuilder.workers)",
    )
    parser.add_argument("--measure", choices=["read", "build"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.measure:  # inside a measurement subprocess
        root = run_dir(args.work_dir, args.shape, args.cases)
        if args.measure == "read":
            result = measure_read(root)
        else:
            data_dir = Path(tempfile.mkdtemp(prefix="tfds_", dir=args.work_dir))
            try:
                result = measure_build(root, data_dir, args.workers[0])
            finally:
                shutil.rmtree(data_dir, ignore_errors=True)
        print(json.dumps(result))
        return 0

    args.work_dir.mkdir(parents=True, exist_ok=True)
    generate(args.work_dir, args.shape, args.cases)
    run_dir(args.work_dir, args.shape, args.cases)
    read = _subprocess("read", args)
    summaries = [report(args, read, _subprocess("build", args, n)) for n in args.workers]
    if args.json:
        figures = summaries if len(summaries) > 1 else summaries[0]
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
