"""The planner's plans of several datasets side by side, as one markdown table.

One column per dataset; rows are the numbers ``medseg plan`` decides: target spacing,
median shape after resampling, patch, batch, stages, per-stage strides and kernels,
widths, training steps (epochs × steps per epoch), the memory model's estimate, the
seconds per step (timed on this machine, or predicted from the conv3d throughput with
``--no-probe``), the conv3d GFLOP/s it was predicted from, the mirrored axes and the MR
bias field. The columns:

* ``kits_phantom/small`` and ``kits_phantom/hard`` (16 and 24 phantom CT cases), built
  into ``--data-dir``;
* two Decathlon-layout MRI tasks generated as NIfTI by the msd builder's test helper
  (``make_msd_tree``) and built with the ``msd`` builder: Task04_Hippocampus-shaped
  (12 cases of ~36 × 50 × 35 voxels ± 10 %, 1 mm, 3 classes) and a small
  Task01_BrainTumour-shaped set (8 cases of ~60 × 70 × 60 voxels ± 10 %, 1 mm, 4
  modalities FLAIR, T1w, t1gd, T2w);
* a KiTS19-shaped synthetic fingerprint (210 CT cases, 0.5–5 mm slices, median 3 mm;
  0.44–1.04 mm in-plane, median 0.78; 29–1059 × 512 × 512 voxels, median 107 slices),
  planned from the memory model alone (device gpu, no data, no timing) at each
  ``--gpu-memory``.

The four built columns are planned on ``--device`` (cpu) for ``--time-budget``; they
share one conv3d throughput measurement, so their predictions are comparable. Without
``--no-probe`` each of them also times its network's real training step (minutes).

    python benchmarks/plans.py [--data-dir DIR] [--time-budget 8m] [--no-probe]
        [--gpu-memory 8 24] [--output plans.md]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

WORK_DIR = Path("/tmp/medseg_plans")

# generated Decathlon tasks: task -> (file prefix, cases, median shape, seed)
MSD_TASKS = {
    "Task04_Hippocampus": ("hippocampus", 12, (36, 50, 35), 4),
    "Task01_BrainTumour": ("BRATS", 8, (60, 70, 60), 1),
}
MSD_CHANNELS = {"Task04_Hippocampus": None, "Task01_BrainTumour": 4}


# -- datasets ------------------------------------------------------------------------------


def _case_shapes(median_shape, count: int, seed: int) -> list[tuple[int, ...]]:
    """``count`` shapes within ± 10 % of ``median_shape`` per axis."""
    import numpy as np

    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.9, 1.1, size=(count, len(median_shape)))
    return [tuple(int(round(m * s)) for m, s in zip(median_shape, row, strict=True))
            for row in scale]


@contextlib.contextmanager
def _dummy_task(module, task: str, entry):
    """``module.DUMMY_TASKS[task]`` replaced by ``entry`` for the duration."""
    old = module.DUMMY_TASKS[task]
    module.DUMMY_TASKS[task] = entry
    try:
        yield
    finally:
        module.DUMMY_TASKS[task] = old


def generate_msd_task(root: Path, task: str) -> Path:
    """Write the generated ``task`` under ``root/task`` in the Decathlon's layout."""
    try:
        from medseg_datasets.msd import msd_dataset_builder_test as msd_test
    except ImportError as err:  # the helper lives in a test module (needs pytest)
        sys.exit(f"generating {task} needs the msd builder's test helpers (pip install -e .[dev]): "
                 f"{err}")
    prefix, count, median_shape, seed = MSD_TASKS[task]
    # the builder needs a test split too: one unlabelled case, as imagesTs/ holds
    *train, test = _case_shapes(median_shape, count + 1, seed)
    entry = (prefix, train, [test], (1.0, 1.0, 1.0), MSD_CHANNELS[task])
    with _dummy_task(msd_test, task, entry):
        msd_test.make_msd_tree(root, tasks=[task], macos_junk=False)
    return root / task


def built(name: str, config: str, data_dir: str, manual_root: Path | None = None):
    """The builder of ``name/config`` in ``data_dir``, built (msd: from a generated tree)."""
    from medseg import datasets

    manual_dir = None
    if manual_root is not None and not datasets.get_builder(name, config, data_dir).is_prepared():
        manual_dir = generate_msd_task(manual_root, config)
    return datasets.prepare(name, config, data_dir, manual_dir=manual_dir)


def kits19_fingerprint(num_cases: int = 210, seed: int = 19) -> dict:
    """A KiTS19-shaped fingerprint: its spacings, shapes and CT foreground intensities.

    Slice thickness drawn from KiTS19's mix (a third 5 mm, a quarter 3 mm, the rest
    0.5–2.5 mm: median 3 mm, 10th percentile 1 mm), a scan length of ~345 mm (lognormal)
    giving the slice count, in-plane ~0.78 mm; the extremes (29 and 1059 slices,
    0.44 and 1.04 mm) set on four cases. Intensities as nnU-Net's KiTS19 fingerprint.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    levels = [0.5, 0.7, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0]
    shares = [0.02, 0.03, 0.04, 0.06, 0.02, 0.03, 0.06, 0.10, 0.24, 0.04, 0.36]
    thickness = rng.choice(levels, size=num_cases, p=shares)
    length = np.clip(rng.lognormal(np.log(345.0), 0.3, num_cases), 145.0, 600.0)
    slices = np.clip(np.round(length / thickness), 29, 1059).astype(int)
    inplane = np.round(np.clip(rng.normal(0.78, 0.09, num_cases), 0.44, 1.04), 4)
    thickness[0], slices[0] = 5.0, 29
    thickness[1], slices[1] = 0.5, 1059
    inplane[2], inplane[3] = 0.44, 1.04
    spacings = [[float(t), float(p), float(p)] for t, p in zip(thickness, inplane, strict=True)]
    shapes = [[int(s), 512, 512] for s in slices]
    return {
        "num_cases": num_cases,
        "class_names": ["background", "kidney", "tumor"],
        "spacings": spacings,
        "shapes": shapes,
        "spacing_median": [float(v) for v in np.median(spacings, 0)],
        "shape_median": [float(v) for v in np.median(shapes, 0)],
        "foreground_intensity": {
            "mean": 101.0, "std": 76.9, "percentile_00_5": -79.0, "percentile_99_5": 304.0,
        },
    }


# -- planning ------------------------------------------------------------------------------


def share_conv_throughput() -> None:
    """Measure the reference conv3d once for every CPU plan (the planner calls it each time)."""
    from medseg.planning import probe

    probe.measure_conv_throughput = functools.cache(probe.measure_conv_throughput)


def plan_built(builder, options, probe: bool):
    from medseg import datasets
    from medseg.planning import plan_experiment

    fp = datasets.read_fingerprint(builder)
    return plan_experiment(
        fp, dataset=builder.info.full_name, fingerprint_hash=datasets.fingerprint_hash(fp),
        modalities=datasets.modalities(builder), options=options, probe=probe,
    )


def plan_kits19(gpu_memory: float):
    from medseg import datasets
    from medseg.planning import PlanOptions, plan_experiment

    fp = kits19_fingerprint()
    return plan_experiment(
        fp, dataset="kits19-like (synthetic fingerprint)",
        fingerprint_hash=datasets.fingerprint_hash(fp), modalities=("CT",),
        options=PlanOptions(device="gpu", gpu_memory=gpu_memory), probe=False,
    )


# -- the table -----------------------------------------------------------------------------


def _axes(values, fmt: str = "{:g}") -> str:
    return " × ".join(fmt.format(v) for v in values)


def _stages(per_stage) -> str:
    return " ".join("×".join(map(str, s)) for s in per_stage)


ROWS = [
    ("spacing (mm)", lambda p: _axes(p.target_spacing, "{:.3g}")),
    ("median shape (resampled)", lambda p: _axes(p.median_shape, "{:.0f}")),
    ("patch", lambda p: _axes(p.patch_size, "{:d}")),
    ("batch", lambda p: str(p.batch_size)),
    ("stages", lambda p: str(p.num_stages)),
    ("strides", lambda p: _stages(p.strides)),
    ("kernels", lambda p: _stages(p.kernels)),
    ("widths", lambda p: " ".join(map(str, p.widths))),
    ("steps (epochs × steps/epoch)",
     lambda p: f"{p.epochs} × {p.steps_per_epoch} = {p.total_steps}"),
    ("memory (GB, predicted)",
     lambda p: f"{p.memory_bytes / 1e9:.2f} of {p.memory_budget_bytes / 1e9:.1f}"),
    ("s/step", lambda p: (
        f"{p.probe['seconds_per_step']:.3f} ({'timed' if p.probe['measured'] else 'predicted'})"
        if p.probe else "— (GPU schedule)")),
    ("conv3d GFLOP/s", lambda p: f"{p.probe['conv_gflops']:.1f}" if p.probe else "—"),
    ("mirrored axes", lambda p: "config's" if p.flip_axes is None else
     " ".join(map(str, p.flip_axes)) or "none"),
    ("bias field (p, pedestal)", lambda p: (
        f"{p.bias_field_probability:g}, {_axes(p.bias_field_pedestal)}"
        if p.bias_field_probability else "off")),
]


def table(columns: list[tuple[str, object]]) -> str:
    """Markdown: one column per (header, plan or error message)."""
    lines = ["| | " + " | ".join(h for h, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for label, cell in ROWS:
        values = [cell(p) if not isinstance(p, str) else "error" for _, p in columns]
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(WORK_DIR / "tfds"),
                        help="TFDS data dir the datasets are built into (and reused from)")
    parser.add_argument("--time-budget", default="8m", help="for the built (CPU) columns")
    parser.add_argument("--no-probe", action="store_true",
                        help="predict the step time instead of timing the network")
    parser.add_argument("--device", default="cpu", help="for the built columns")
    parser.add_argument("--gpu-memory", type=float, nargs="+", default=[8.0, 24.0],
                        help="GB, one KiTS19-like column each")
    parser.add_argument("--output", help="also write the table to this file")
    args = parser.parse_args()

    import tensorflow_datasets as tfds

    from medseg.planning import PlanError, PlanOptions, parse_duration

    tfds.disable_progress_bar()
    share_conv_throughput()
    options = PlanOptions(device=args.device, time_budget_s=parse_duration(args.time_budget))
    budget = f"{args.device}, {args.time_budget}"
    trees = WORK_DIR / "msd"
    jobs = [
        (f"kits_phantom/small ({budget})",
         lambda: plan_built(built("kits_phantom", "small", args.data_dir), options,
                            not args.no_probe)),
        (f"kits_phantom/hard ({budget})",
         lambda: plan_built(built("kits_phantom", "hard", args.data_dir), options,
                            not args.no_probe)),
        (f"Hippocampus-like ({budget})",
         lambda: plan_built(built("msd", "Task04_Hippocampus", args.data_dir, trees), options,
                            not args.no_probe)),
        (f"BrainTumour-like, 4 ch ({budget})",
         lambda: plan_built(built("msd", "Task01_BrainTumour", args.data_dir, trees), options,
                            not args.no_probe)),
    ] + [
        (f"KiTS19-like (gpu {gb:g} GB)", functools.partial(plan_kits19, gb))
        for gb in args.gpu_memory
    ]
    columns, errors = [], []
    for header, job in jobs:
        print(f"planning {header} ...", file=sys.stderr, flush=True)
        try:
            columns.append((header, job()))
        except PlanError as err:
            columns.append((header, str(err)))
            errors.append(f"{header}: {err}")
    text = table(columns)
    if errors:
        text += "\n\n" + "\n".join(f"* {e}" for e in errors)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
        print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
