"""Cost of the per-case metrics and postprocessing on a 200x512x512 CT-sized label map.

Prints the time of `score_case` (Dice, IoU, HD95, ASD, surface Dice, volume difference for
two classes), of the postprocessing scores and of `keep_largest_component`, for kidney-sized
structures and for a body-sized one (the worst case: the surface metrics crop to the
structure's bounding box, so their cost follows its extent), plus peak RSS.

    python benchmarks/evaluation_metrics.py [--shape 200 512 512]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from medseg.evaluation import score_case
from medseg.inference.postprocess import keep_largest_component, postprocessing_scores


def ellipsoid(shape, centre, radii):
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii, strict=True)) <= 1


def label_maps(shape, body: bool):
    d, h, w = shape
    truth = np.zeros(shape, np.uint8)
    if body:  # one structure spanning most of the volume
        truth[ellipsoid(shape, (d / 2, h / 2, w / 2), (0.45 * d, 0.4 * h, 0.4 * w))] = 1
    else:  # two kidneys (3 mm x 0.8 mm voxels: ~12 x 6 x 6 cm) with a tumour
        for cx in (0.3 * w, 0.7 * w):
            truth[ellipsoid(shape, (d / 2, h / 2, cx), (20, 40, 35))] = 1
        truth[ellipsoid(shape, (d / 2, h / 2 - 25, 0.3 * w), (6, 15, 15))] = 2
    # the prediction: shifted by one voxel, with a stray false-positive blob
    pred = np.roll(truth, 1, axis=2)
    pred[ellipsoid(shape, (10, 40, 40), (3, 6, 6))] = 1
    return pred, truth


def dice_counts(pred, truth):
    return [np.count_nonzero((pred == c) & (truth == c)) for c in (1, 2)]


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, nargs=3, default=(200, 512, 512))
    args = parser.parse_args()
    shape = tuple(args.shape)
    spacing = (3.0, 0.8, 0.8)
    names = ["background", "kidney", "tumor"]
    print(f"label maps {shape}, spacing {spacing} mm")
    for body in (False, True):
        pred, truth = label_maps(shape, body)
        kind = "body-sized structure" if body else "kidneys + tumour    "
        scores, t_score = timed(score_case, pred, truth, spacing, names, tolerance=2.0)
        _, t_pp = timed(postprocessing_scores, pred, truth, [1, 2])
        _, t_lcc = timed(keep_largest_component, pred, [1, 2])
        _, t_dice = timed(dice_counts, pred, truth)
        print(
            f"{kind}: score_case {t_score:6.2f} s  postprocessing_scores {t_pp:5.2f} s  "
            f"keep_largest_component {t_lcc:5.2f} s  (bare Dice counts {t_dice:4.2f} s)  "
            f"hd95_kidney {scores['hd95_kidney']:.2f} mm"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()
