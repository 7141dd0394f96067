"""Does the self-configuring plan fit real MRI anatomy, and does it carry across scanners?

Plans (``plan.mode=auto``, the default) and trains medseg on ``aal_colin27/lobes``: the one
Colin27 T1 brain with its AAL atlas grouped into 7 lobes (Debian's ``mricron-data``, no
download), for ``--time-budget`` of training on this machine. Every voxel is used for
training (``data.validation_fraction=0``: no validation case). It then predicts two images
and scores per-lobe Dice (targets printed beside them):

* Colin27 itself (the training case: does the plan fit the anatomy?), target ≥ 0.85;
* a seeded "other scanner" copy (does it carry?), target ≥ 0.75: the head moved 7 mm along
  the in-plane anterior-posterior axis (image order-1 interpolation, label nearest, zero
  filled; the label moves with it), then every voxel rescaled by gain 0.6 and offset +150
  (in the image's own units), a gamma of 0.8 on the max-normalised intensities, a smooth
  multiplicative bias field 1 + 0.15·f (f a low-frequency random field in [-1, 1]) and
  Gaussian noise of 3 % of the brain's mean intensity, rounded to the stored int16.

It prints the plan, the training wall time against the budget and the conv3d GFLOP/s of
the plan's probe. It builds the dataset if missing and takes the budget plus ~3 minutes
(planning probe, prediction of two 181 × 217 × 181 volumes, surface metrics).

    python benchmarks/colin27_transfer.py [--time-budget 10m] [--data-dir DIR] [--json]
                                          [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from medseg.config import Config  # noqa: E402
from medseg.evaluation import score_case  # noqa: E402
from medseg.inference import predict_case  # noqa: E402
from medseg.pipeline import read_cases  # noqa: E402
from medseg.planning import format_plan  # noqa: E402
from medseg.planning.planner import parse_duration  # noqa: E402
from medseg.workflows.experiment import network_stride, prepare_data, train_model  # noqa: E402

TARGET_ORIGINAL = 0.85
TARGET_ALTERED = 0.75
SHIFT_MM = 7.0
SHIFT_AXIS = 1  # NIfTI voxel order (x, y, z): axis 1 is anterior-posterior, in-plane
GAIN, OFFSET, GAMMA = 0.6, 150.0, 0.8
BIAS_AMPLITUDE = 0.15
NOISE_SHARE = 0.03  # noise std as a share of the brain's mean intensity
SEED = 27


def other_scanner(
    image: np.ndarray, label: np.ndarray, spacing, seed: int = SEED
) -> tuple[np.ndarray, np.ndarray, int]:
    """The case as another scanner might image it: moved, rescaled, gamma, bias, noise.

    Returns the altered image (the input's dtype, rounded and clipped to its range), the
    label moved with it, and the shift in voxels.
    """
    rng = np.random.default_rng(seed)
    spatial = image.shape[:3]
    voxels = int(round(SHIFT_MM / float(spacing[SHIFT_AXIS])))
    offset = [0.0] * image.ndim
    offset[SHIFT_AXIS] = float(voxels)
    moved = ndimage.shift(image.astype(np.float64), offset, order=1, mode="constant", cval=0.0)
    label_moved = ndimage.shift(label, offset[:3], order=0, mode="constant", cval=0)

    x = GAIN * moved + OFFSET  # every voxel: the new scanner's gain and offset
    peak = float(x.max())
    x = np.clip(x / peak, 0.0, None) ** GAMMA * peak
    # low-frequency bias: a 4³ random grid, cubic-upsampled to the volume, scaled to [-1, 1]
    coarse = rng.standard_normal((4, 4, 4))
    field = ndimage.zoom(coarse, [s / 4 for s in spatial], order=3)[
        : spatial[0], : spatial[1], : spatial[2]
    ]
    field /= np.abs(field).max()
    bias = 1.0 + BIAS_AMPLITUDE * field
    x = x * (bias if x.ndim == 3 else bias[..., None])
    brain_mean = float(x[label_moved > 0].mean())
    x = x + rng.normal(0.0, NOISE_SHARE * brain_mean, x.shape)
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        x = np.clip(np.rint(x), info.min, info.max)
    return x.astype(image.dtype), label_moved.astype(label.dtype), voxels


def lobe_dice(scores: dict[str, float], class_names) -> dict[str, float]:
    return {name: scores[f"dice_{name}"] for name in class_names[1:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-budget", default="10m", help="training time to plan for")
    parser.add_argument("--data-dir", default=None, help="TFDS data dir (default: TFDS's)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override (repeatable), e.g. augment.noise_probability=0.5")
    args = parser.parse_args()

    overrides = {
        "data.dataset": "aal_colin27",
        "data.config": "lobes",
        "data.validation_fraction": 0.0,
        "plan.time_budget": args.time_budget,
        "tracking.run_name": "colin27-transfer",
    }
    if args.data_dir:
        overrides["data.data_dir"] = args.data_dir
    config = Config().with_overrides(overrides).with_overrides(list(args.set))

    t0 = time.perf_counter()
    setup = prepare_data(config)
    prepare_s = time.perf_counter() - t0
    config = setup.config
    plan = setup.experiment_plan
    if not args.json:
        print(format_plan(plan))
        for key, change in setup.overrides.items():
            print(f"  {key}={change['used']} overrides the planned {change['planned']}")
        print(f"cases: train {setup.train_ids}, validation {setup.val_ids or 'none'}")

    t0 = time.perf_counter()
    model, history = train_model(config, setup)
    train_s = time.perf_counter() - t0
    budget_s = parse_duration(args.time_budget)
    gflops = plan.probe["conv_gflops"] if plan.probe else math.nan
    if not args.json:
        print(
            f"training: {train_s:.0f} s wall of a {budget_s:.0f} s budget "
            f"({train_s / budget_s:.0%}; planned {plan.predicted_train_s or math.nan:.0f} s), "
            f"{plan.epochs} × {plan.steps_per_epoch} steps, final loss "
            f"{history.get('loss', [math.nan])[-1]:.4f}; conv3d {gflops:.1f} GFLOP/s (probe)"
        )

    ids = setup.train_ids + setup.val_ids
    ex = next(read_cases(setup.builder, config.data.split, ids).as_numpy_iterator())
    image, label, spacing = ex["image"], ex["label"], ex["spacing"]
    altered, altered_label, shift_voxels = other_scanner(image, label, spacing)

    num_classes = len(setup.class_names)
    stride = network_stride(config, setup)
    results, predict_s = {}, {}
    for name, img, truth in (
        ("colin27", image, label),
        ("other_scanner", altered, altered_label),
    ):
        t0 = time.perf_counter()
        pred, _ = predict_case(
            model,
            img,
            spacing,
            setup.plan,
            config.patch.patch_size,
            num_classes,
            overlap=config.inference.overlap,
            batch_size=config.inference.batch_size,
            weighting=config.inference.weighting,
            mirror_axes=config.inference.mirror_axes,
            stride=stride,
            probabilities=False,
        )
        predict_s[name] = time.perf_counter() - t0
        scores = score_case(
            pred,
            truth,
            spacing,
            setup.class_names,
            setup.regions,
            tolerance=config.evaluation.surface_tolerance_mm,
            percentile=config.evaluation.hd_percentile,
        )
        results[name] = lobe_dice(scores, setup.class_names)

    targets = {"colin27": TARGET_ORIGINAL, "other_scanner": TARGET_ALTERED}
    minimum = {k: min(v.values()) for k, v in results.items()}
    if args.json:
        print(
            json.dumps(
                {
                    "dataset": setup.dataset_name,
                    "time_budget_s": budget_s,
                    "prepare_s": prepare_s,
                    "train_s": train_s,
                    "predicted_train_s": plan.predicted_train_s,
                    "conv_gflops": gflops,
                    "patch_size": list(plan.patch_size),
                    "batch_size": plan.batch_size,
                    "target_spacing": list(plan.target_spacing),
                    "normalize": plan.normalize,
                    "epochs": plan.epochs,
                    "steps_per_epoch": plan.steps_per_epoch,
                    "shift_voxels": shift_voxels,
                    "predict_s": predict_s,
                    "dice": results,
                    "dice_min": minimum,
                    "targets": targets,
                    "passed": {k: minimum[k] >= targets[k] for k in results},
                },
                indent=2,
            )
        )
        return
    print(f"per-lobe Dice (other scanner: shifted {shift_voxels} voxels along axis {SHIFT_AXIS})")
    print(f"  {'lobe':<18} {'colin27':>8} {'other':>8}")
    for lobe in setup.class_names[1:]:
        print(f"  {lobe:<18} {results['colin27'][lobe]:8.3f} {results['other_scanner'][lobe]:8.3f}")
    for name, label_text in (("colin27", "Colin27"), ("other_scanner", "other scanner")):
        verdict = "met" if minimum[name] >= targets[name] else "MISSED"
        print(
            f"  minimum on {label_text}: {minimum[name]:.3f} (target ≥ {targets[name]:.2f}: "
            f"{verdict}); prediction {predict_s[name]:.0f} s"
        )


if __name__ == "__main__":
    main()
