"""Peak memory of the bounded training stream as the dataset grows, and its speed.

Generated KiTS-like cases (float32 CT-like intensities, a uint8 label with two kidneys and
a tumour) are preprocessed-case shards written once into a cache folder
(:func:`medseg.pipeline.write_case_shards`) and reused by later runs. For each case count
a fresh subprocess sets up :func:`medseg.pipeline.training_dataset` with
``patch.cases_in_memory`` and iterates ``--steps`` batches (the stream only, no model),
reporting its peak resident set size (``ru_maxrss``), the resident size just before the
set-up (the TensorFlow runtime) and the steps per second after the first tenth of the
steps (set-up, tracing and tf.data's autotuning are not timed; at small shapes 200 steps
take well under a second, so use more ``--steps`` for a steady speed). The
all-in-memory stream (``cases_in_memory=None``) on the smallest count is the speed
reference. Targets: peaks within +10 % of each other; bounded speed ≥ 80 % of the
reference.

Usage::

    python benchmarks/memory_scale.py [--cases 20,100,200] [--shape 96,256,256]
        [--cases-in-memory 8] [--steps 200] [--cache DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PEAK_SPREAD = 1.10
MIN_SPEED_RATIO = 0.8


def make_case(shape: tuple[int, int, int], seed: int):
    """Image ``(D, H, W, 1)`` and label ``(D, H, W)`` of a kidney-like case."""
    rng = np.random.default_rng(seed)
    depth, rows, cols = shape
    z, y, x = np.ogrid[:depth, :rows, :cols]
    label = np.zeros(shape, np.uint8)
    for side in (0.3, 0.7):  # two kidneys, jittered per case
        cz, cy, cx = (np.array([0.5, 0.55, side]) + rng.uniform(-0.05, 0.05, 3)) * shape
        rz, ry, rx = np.array([0.25, 0.12, 0.08]) * shape
        label[((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1] = 1
    tz, ty, tx = np.array([0.5, 0.55, 0.3]) * shape
    label[((z - tz) ** 2 + (y - ty) ** 2 + (x - tx) ** 2) <= (0.04 * rows) ** 2] = 2
    image = rng.normal(0.0, 0.3, shape).astype(np.float32)
    image += label.astype(np.float32)
    return image[..., None], label


def write_cases(folder: Path, count: int, shape: tuple[int, int, int]):
    """The shards of ``count`` generated cases in ``folder`` (written unless already there)."""
    import tensorflow as tf

    from medseg.pipeline import ShardedCases, write_case_shards
    from medseg.pipeline.patches import foreground_locations

    if (folder / "index.json").is_file():
        shards = ShardedCases.open(folder)
        if len(shards) >= count:
            return shards
        raise SystemExit(f"{folder} holds {len(shards)} cases, fewer than {count}: use --cache")

    def generate():
        for i in range(count):
            image, label = make_case(shape, i)
            coords, classes = foreground_locations(tf.constant(label), 3, tf.constant([0, i]))
            yield {
                "case_id": f"case_{i:05d}",
                "image": image,
                "label": label,
                "coords": coords,
                "classes": classes,
            }

    spec = {
        "case_id": tf.TensorSpec([], tf.string),
        "image": tf.TensorSpec([None, None, None, 1], tf.float32),
        "label": tf.TensorSpec([None, None, None], tf.uint8),
        "coords": tf.TensorSpec([None, 3], tf.int32),
        "classes": tf.TensorSpec([None], tf.int32),
    }
    return write_case_shards(
        tf.data.Dataset.from_generator(generate, output_signature=spec), folder
    )


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(folder: Path, count: int, args) -> dict:
    """Inside a fresh process: set up the stream on the first ``count`` cases, iterate."""
    import tensorflow as tf

    from medseg.config import PatchConfig
    from medseg.pipeline import ShardedCases, describe_stream_memory, training_dataset

    tf.constant(0.0) + 1  # start the runtime before the baseline
    every = ShardedCases.open(folder)
    shards = dataclasses.replace(
        every,
        case_ids=every.case_ids[:count],
        files=every.files[:count],
        shapes=every.shapes[:count],
        locations=every.locations[:count],
    )
    patch = PatchConfig(
        patch_size=args.patch,
        batch_size=args.batch_size,
        cases_in_memory=args.cases_in_memory,
        replace_every=args.replace_every,
    )
    baseline = _rss_mib()
    ds = training_dataset(shards, count, patch, num_classes=3, seed=0)
    iterator = iter(ds)
    warmup = max(1, args.steps // 10)  # set-up, tracing, tf.data's autotuning: not timed
    for _ in range(warmup):
        next(iterator)
    begin = time.perf_counter()
    for _ in range(args.steps - warmup):
        next(iterator)
    seconds = time.perf_counter() - begin
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
    return {
        "cases": count,
        "cases_in_memory": args.cases_in_memory,
        "baseline_mib": round(baseline, 1),
        "peak_mib": round(peak, 1),
        "stream_mib": round(peak - baseline, 1),
        "steps_per_s": round((args.steps - warmup) / seconds, 2),
        "planned": describe_stream_memory(shards, count, patch),
    }


def _subprocess(folder: Path, count: int, args, bounded: bool) -> dict:
    command = [
        sys.executable,
        __file__,
        "--measure",
        str(count),
        "--cache",
        str(folder),
        "--steps",
        str(args.steps),
        "--patch",
        ",".join(map(str, args.patch)),
        "--batch-size",
        str(args.batch_size),
        "--replace-every",
        str(args.replace_every),
        "--cases-in-memory",
        str(args.cases_in_memory) if bounded else "none",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"measurement of {count} cases failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=_ints, default=(20, 100, 200))
    parser.add_argument("--shape", type=_ints, default=(96, 256, 256))
    parser.add_argument("--patch", type=_ints, default=(32, 64, 64))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument(
        "--cases-in-memory", type=lambda v: None if v == "none" else int(v), default=8
    )
    parser.add_argument("--replace-every", type=int, default=50)
    parser.add_argument("--cache", type=Path, help="folder of the generated shards (reused)")
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:  # inside a measurement subprocess
        print(json.dumps(measure(args.cache, args.measure, args)))
        return 0
    shape = "x".join(map(str, args.shape))
    folder = args.cache or Path(tempfile.gettempdir()) / f"medseg-memory-scale-{shape}"
    begin = time.perf_counter()
    shards = write_cases(folder, max(args.cases), args.shape)
    print(f"{len(shards)} cases of {shape} in {folder} ({time.perf_counter() - begin:.0f} s)")
    rows = [_subprocess(folder, n, args, bounded=True) for n in args.cases]
    reference = _subprocess(folder, min(args.cases), args, bounded=False)
    for row in [*rows, reference]:
        print(json.dumps(row))
    peaks = [r["peak_mib"] for r in rows]
    spread = max(peaks) / min(peaks)
    smallest = min(rows, key=lambda r: r["cases"])
    speed = smallest["steps_per_s"] / reference["steps_per_s"]
    ok = spread <= PEAK_SPREAD and speed >= MIN_SPEED_RATIO
    print(
        f"peak RSS {min(peaks):.0f}-{max(peaks):.0f} MiB over {list(args.cases)} cases "
        f"(max/min {spread:.3f}, target ≤ {PEAK_SPREAD}); bounded/all-in-memory speed on "
        f"{min(args.cases)} cases {speed:.2f} (target ≥ {MIN_SPEED_RATIO}): "
        f"{'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
