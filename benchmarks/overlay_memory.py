"""Peak memory of a run's overlay GIF and slice montage for a whole CT-sized case.

A synthetic 600 x 512 x 512 case (float32 CT-like intensities, uint8 truth and prediction
with two kidneys and a tumour, 0.8 x 0.78 x 0.78 mm) is drawn as ``medseg train`` draws its
example case (:func:`medseg.tracking.artifacts.log_result`: visuals' default crop and caps,
the spacing correction). The measurement runs in a fresh subprocess, so that nothing
allocated before counts, and reports the peak resident set size (``ru_maxrss``) while
drawing minus the resident size just before it, which holds the inputs themselves
(~0.94 GB here, built slice by slice so that building them peaks no higher). The budget is
1 GB; drawing the whole case in float RGB, as before, took ~140 bytes per voxel.

Usage::

    python benchmarks/overlay_memory.py [--shape 600 512 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BUDGET_BYTES = 1_000_000_000
OLD_BYTES_PER_VOXEL = 142  # the previous overlay_frames, measured on a 60 x 512 x 512 case


def make_case(shape: tuple[int, int, int], seed: int = 0):
    """Image, truth and prediction of a kidney-like case, built one slice at a time."""
    depth, rows, cols = shape
    rng = np.random.default_rng(seed)
    image = np.empty(shape, np.float32)
    # written slice by slice (np.zeros pages would stay unmapped and not count as inputs)
    truth = np.empty(shape, np.uint8)
    pred = np.empty(shape, np.uint8)
    y, x = np.ogrid[:rows, :cols]
    body = ((y - rows / 2) / (0.42 * rows)) ** 2 + ((x - cols / 2) / (0.46 * cols)) ** 2 <= 1
    centre_z, half_z = 0.45 * depth, 0.12 * depth  # kidneys over ~a quarter of the slices
    kidneys = [(0.55 * rows, 0.30 * cols), (0.55 * rows, 0.70 * cols)]
    for z in range(depth):
        plane = rng.normal(40.0, 20.0, (rows, cols)).astype(np.float32)
        plane[~body] = -1000.0
        truth[z] = pred[z] = 0
        dz = (z - centre_z) / half_z
        if abs(dz) < 1:
            for i, (cy, cx) in enumerate(kidneys):
                scale = np.sqrt(1 - dz * dz)
                kidney = ((y - cy) / (0.12 * rows * scale)) ** 2 + (
                    (x - cx) / (0.08 * cols * scale)
                ) ** 2 <= 1
                truth[z][kidney] = 1
                # the model is off by a few voxels
                pred[z][np.roll(kidney, 3, axis=1)] = 1
                if i == 0 and abs(dz) < 0.3:
                    tumour = (y - cy) ** 2 + (x - cx - 0.04 * cols) ** 2 <= (0.03 * rows) ** 2
                    truth[z][tumour] = 2
                    pred[z][np.roll(tumour, 2, axis=0)] = 2
            plane[truth[z] > 0] = 160.0
        image[z] = plane
    return image, truth, pred


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(shape: tuple[int, int, int]) -> dict:
    """Draw the overlay and the montage in this process; memory figures in bytes."""
    from medseg.evaluation.visuals import write_overlay_gif, write_slice_montage

    image, truth, pred = make_case(shape)
    inputs = image.nbytes + truth.nbytes + pred.nbytes
    before_rss, before_peak = _rss_bytes(), _peak_bytes()
    view = {"axis": 0, "spacing": (0.8, 0.78, 0.78), "window": (-300.0, 400.0)}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        gif = write_overlay_gif(Path(tmp) / "overlay.gif", image, truth, pred, **view)
        png = write_slice_montage(Path(tmp) / "montage.png", image, truth, pred, **view)
        sizes = {"gif_bytes": gif.stat().st_size, "png_bytes": png.stat().st_size}
    seconds = time.perf_counter() - start
    peak = _peak_bytes()
    return {
        "shape": list(shape),
        "inputs_bytes": inputs,
        "rss_before_bytes": before_rss,
        "peak_before_bytes": before_peak,
        "peak_bytes": peak,
        "drawing_bytes": peak - before_rss,
        "seconds": seconds,
        **sizes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[600, 512, 512])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    if args.child:
        print(json.dumps(measure(shape)))
        return 0
    # a fresh interpreter: the parent's imports and allocations do not count
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--shape", *map(str, shape)],
        check=True, capture_output=True, text=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    gb = 1e9
    voxels = int(np.prod(shape))
    print(f"case {shape}: inputs {result['inputs_bytes'] / gb:.2f} GB "
          f"(resident before drawing {result['rss_before_bytes'] / gb:.2f} GB)")
    print(f"overlay GIF + montage: peak {result['peak_bytes'] / gb:.2f} GB resident, "
          f"{result['drawing_bytes'] / gb:.3f} GB above the inputs "
          f"(budget {BUDGET_BYTES / gb:.2f} GB; drawing the whole case in float RGB: "
          f"~{OLD_BYTES_PER_VOXEL * voxels / gb:.0f} GB), {result['seconds']:.1f} s, "
          f"GIF {result['gif_bytes'] / 1e6:.1f} MB, montage {result['png_bytes'] / 1e6:.1f} MB")
    return 0 if result["drawing_bytes"] < BUDGET_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
