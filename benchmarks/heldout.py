"""Accuracy of a trained run on phantom cases it has never seen, the way a user gets it.

Generates ``--cases`` new cases of a kits_phantom config from another seed (same knobs,
new anatomy), writes them as KiTS19-style NIfTI files, segments them with
``medseg predict --model runs:/<run>/model`` (the run's plan and postprocessing; once more
with ``--postprocessing none`` for the raw prediction) and scores each on its original
grid against its label. Prints per-case Dice, the mean per class (NaN where a class is
absent from truth and prediction, as the run's validation metrics) and the false
structures on cases without the class.

    python benchmarks/heldout.py RUN_ID [--config hard] [--seed 1013] [--cases 12]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from medseg_datasets.kits_phantom.kits_phantom_dataset_builder import Builder  # noqa: E402
from medseg_datasets.kits_phantom.phantom import CLASS_NAMES, make_case  # noqa: E402

from medseg.evaluation import score_case  # noqa: E402
from medseg.io import kits19_affine  # noqa: E402

CONFIGS = {config.name: config for config in Builder.BUILDER_CONFIGS}


def write_cases(folder: Path, config: str, seed: int, count: int) -> dict[str, tuple]:
    spec = CONFIGS[config].phantom_spec()
    (folder / "images").mkdir(parents=True, exist_ok=True)
    cases = {}
    for i in range(count):
        image, label, spacing = make_case((seed, i), spec)
        case_id = f"heldout_{i:05d}"
        path = folder / "images" / f"{case_id}.nii.gz"
        if not path.exists():
            nib.save(nib.Nifti1Image(image, kits19_affine(spacing)), path)
        cases[case_id] = (label, spacing)
    return cases


def predict(run_id: str, folder: Path, output: Path, tracking_uri: str, *extra: str) -> float:
    t0 = time.perf_counter()
    command = [
        sys.executable, "-m", "medseg.cli", "predict", str(folder / "images"),
        "--model", f"runs:/{run_id}/model", "--output", str(output),
        "--tracking-uri", tracking_uri, *extra,
    ]
    subprocess.run(command, check=True)
    return time.perf_counter() - t0


def score(cases: dict[str, tuple], output: Path) -> dict[str, dict[str, float]]:
    scores = {}
    for case_id, (label, spacing) in cases.items():
        # the written file is on the source grid; nibabel gives it in the file's axis order
        pred = np.asarray(nib.load(output / f"{case_id}_seg.nii.gz").dataobj)
        scores[case_id] = score_case(pred, label, spacing, CLASS_NAMES)
        for c, name in enumerate(CLASS_NAMES[1:], start=1):
            scores[case_id][f"false_mm3_{name}"] = (
                float(np.count_nonzero(pred == c) * np.prod(spacing))
                if not (label == c).any() else float("nan")
            )
    return scores


def report(title: str, scores: dict[str, dict[str, float]]) -> None:
    names = CLASS_NAMES[1:]
    print(f"\n{title}")
    print(f"  {'case':16s}" + "".join(f"{'dice_' + n:>14s}" for n in names) + f"{'false tumour mm3':>18s}")
    for case_id, s in scores.items():
        dice = "".join(f"{s[f'dice_{n}']:14.3f}" for n in names)
        print(f"  {case_id:16s}{dice}{s[f'false_mm3_{names[-1]}']:18.0f}")
    for n in names:
        values = np.array([s[f"dice_{n}"] for s in scores.values()])
        free = [s[f"false_mm3_{n}"] for s in scores.values() if not np.isnan(s[f"false_mm3_{n}"])]
        print(
            f"  {n}: mean Dice {np.nanmean(values):.3f} over {np.count_nonzero(~np.isnan(values))} "
            f"cases; {sum(v > 0 for v in free)} of {len(free)} cases without it have a false one"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_id")
    parser.add_argument("--config", default="hard", choices=sorted(CONFIGS))
    parser.add_argument("--seed", type=int, default=1013, help="not the config's own seed")
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--output", default="/tmp/medseg_heldout")
    parser.add_argument("--tracking-uri", default="sqlite:///mlruns/mlflow.db")
    args = parser.parse_args()
    if args.seed == CONFIGS[args.config].seed:
        parser.error(f"--seed {args.seed} is the config's own: its cases were trained on")
    folder = Path(args.output) / f"{args.config}_{args.seed}"
    cases = write_cases(folder, args.config, args.seed, args.cases)
    seconds = predict(args.run_id, folder, folder / "post", args.tracking_uri, "--overwrite")
    predict(args.run_id, folder, folder / "raw", args.tracking_uri, "--overwrite",
            "--postprocessing", "none")
    report("raw prediction (--postprocessing none)", score(cases, folder / "raw"))
    report("with the run's postprocessing", score(cases, folder / "post"))
    print(f"\nmedseg predict: {seconds:.1f} s for {len(cases)} cases")


if __name__ == "__main__":
    main()
