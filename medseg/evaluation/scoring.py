"""Score a folder of predicted label maps against a folder of references, as nnU-Net does.

``score_folder`` pairs ``PRED_DIR/<case>.nii.gz`` with ``GT_DIR/<case>.nii.gz`` (medseg's
``<case>_seg.nii.gz`` outputs pair with ``<case>.nii.gz`` too) and writes nnU-Net's
``summary.json`` layout (``metric_per_case``, ``mean``, ``foreground_mean``) plus
medseg's per-case table (``scores.tsv``). Each label is scored on its own; the regions of
an nnU-Net ``dataset.json`` (a label mapped to a list of values) are scored as the union
of their values. Reads NIfTI headers and arrays only: no TensorFlow.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg.evaluation.metrics import _dice
from medseg.evaluation.surface import surface_distance_metrics
from medseg.io.atomic import write_atomically
from medseg.io.jsonfile import read_json, write_json
from medseg.io.nifti import AFFINE_ATOL_MM, nifti_suffix, read_nifti

__all__ = [
    "NNUNET_FILE_ENDINGS",
    "labels_from_dataset_json",
    "score_folder",
    "score_pair",
]

# what medseg reads of nnU-Net's file endings (its other readers: .mha, .nrrd, .png, .tif)
NNUNET_FILE_ENDINGS = (".nii.gz", ".nii")
# medseg predict writes <case>_seg.nii.gz: paired with the reference <case>.nii.gz
_SEG_SUFFIX = "_seg"


def labels_from_dataset_json(path: str | os.PathLike) -> tuple[list[str], dict[str, list[int]]]:
    """The label values' names and the regions of an nnU-Net v2 ``dataset.json``.

    ``labels`` maps a name to a value (``"kidney": 1``) or, for nnU-Net's region-based
    datasets, to a list of values (``"whole_tumor": [1, 2, 3]``). With any list, every
    non-background entry is a region (an int ``v`` is the region ``[v]``), as in nnU-Net.

    Parameters
    ----------
    path : path-like
        The ``dataset.json``.

    Returns
    -------
    class_names : list of str
        Names of the label values ``0 .. K-1`` (background first); a value only named
        inside regions is called ``label_<v>``.
    regions : dict of str to list of int
        Empty for a label-based dataset.

    Raises
    ------
    ValueError
        Naming the file: no ``labels``, no background 0, values not ``0 .. K-1``.
    """
    path = Path(path)
    meta = read_json(path, "nnU-Net dataset.json")
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f"{path}: no 'labels' object (e.g. {{\"background\": 0, \"kidney\": 1}})")
    names: dict[int, str] = {}
    regions: dict[str, list[int]] = {}
    for name, value in labels.items():
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(
                f"{path}: labels[{name!r}] is {value!r}; expected an int or a list of ints"
            )
        if isinstance(value, list):
            regions[name] = sorted(set(values))
        else:
            names.setdefault(value, name)
    if names.get(0) is None:
        raise ValueError(f"{path}: 'labels' has no background 0 (e.g. \"background\": 0)")
    if regions:
        # nnU-Net: in a region-based dataset every non-background label is a region
        for name, value in labels.items():
            if not isinstance(value, list) and value != 0:
                regions[name] = [value]
    values = sorted(set(names) | {v for r in regions.values() for v in r})
    if values != list(range(len(values))) or len(values) < 2:
        raise ValueError(
            f"{path}: label values {values} must be consecutive 0 .. K-1 with K >= 2 "
            "(nnU-Net requires it too); renumber the labels"
        )
    class_names = [names.get(v, f"label_{v}") for v in values]
    return class_names, regions


def _strip(name: str) -> str:
    suffix = nifti_suffix(name) or ""
    return name[: len(name) - len(suffix)]


def _nifti_files(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist")
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and nifti_suffix(p)
    )


def _pairs(pred_dir: Path, gt_dir: Path) -> list[tuple[str, Path, Path]]:
    references = {_strip(p.name): p for p in _nifti_files(gt_dir, "reference (GT_DIR)")}
    predictions = _nifti_files(pred_dir, "prediction (PRED_DIR)")
    if not predictions:
        raise FileNotFoundError(f"prediction folder {pred_dir} holds no .nii/.nii.gz files")
    pairs = []
    for pred in predictions:
        case = _strip(pred.name)
        if case not in references and case.endswith(_SEG_SUFFIX):
            case = case[: -len(_SEG_SUFFIX)]
        elif case.endswith("_prob") and case[:-5] in references:
            continue  # medseg predict --probabilities: not a label map
        if case not in references:
            raise FileNotFoundError(
                f"prediction {pred} has no reference: expected {gt_dir / (case + '.nii.gz')} "
                "(names must match; give the right GT_DIR or remove the file)"
            )
        pairs.append((case, pred, references[case]))
    return pairs


def _check_grids(pred: Path, ref: Path) -> None:
    # headers only: a mismatch is refused before any volume is read
    import nibabel as nib

    p_img, r_img = nib.load(pred), nib.load(ref)
    p_shape, r_shape = p_img.shape[:3], r_img.shape[:3]
    if p_shape != r_shape:
        raise ValueError(
            f"prediction {pred} has shape {p_shape} but its reference {ref} has {r_shape}; "
            "predict on the reference's grid"
        )
    if not np.allclose(p_img.affine, r_img.affine, atol=AFFINE_ATOL_MM):
        diff = float(np.abs(p_img.affine - r_img.affine).max())
        raise ValueError(
            f"prediction {pred} has another affine than its reference {ref} (max difference "
            f"{diff:.4g} mm); predict on the reference's grid"
        )


def _mask_metrics(pred: np.ndarray, ref: np.ndarray, spacing, hd95: bool) -> dict[str, float]:
    tp = int(np.count_nonzero(pred & ref))
    fp = int(np.count_nonzero(pred & ~ref))
    fn = int(np.count_nonzero(~pred & ref))
    tn = int(pred.size - tp - fp - fn)
    union = tp + fp + fn
    metrics = {
        "Dice": _dice(pred, ref),
        "IoU": tp / union if union else math.nan,
        "FN": fn,
        "FP": fp,
        "TP": tp,
        "TN": tn,
        "n_pred": tp + fp,
        "n_ref": tp + fn,
    }
    if hd95:
        metrics["HD95"] = surface_distance_metrics(pred, ref, spacing)["hd95"]
    return metrics


def score_pair(
    pred_path: str | os.PathLike,
    ref_path: str | os.PathLike,
    structures: dict[str, Sequence[int]],
    *,
    hd95: bool = False,
) -> dict[str, dict[str, float]]:
    """Metrics of one predicted label map against its reference.

    Parameters
    ----------
    pred_path, ref_path : path-like
        NIfTI label maps on the same grid (shape and affine).
    structures : dict of str to sequence of int
        What to score: a name and the label values whose union it is (``{"1": [1]}``).
    hd95 : bool, optional
        Also the 95th percentile Hausdorff distance in mm (``surface.py``).

    Returns
    -------
    dict
        ``{structure: {"Dice", "IoU", "FN", "FP", "TP", "TN", "n_pred", "n_ref"[, "HD95"]}}``;
        Dice and IoU are NaN when the structure is empty in both maps.
    """
    pred_path, ref_path = Path(pred_path), Path(ref_path)
    _check_grids(pred_path, ref_path)
    pred, _, _ = read_nifti(pred_path)
    ref, affine, _ = read_nifti(ref_path)
    pred, ref = np.squeeze(pred), np.squeeze(ref)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return {
        name: _mask_metrics(np.isin(pred, list(values)), np.isin(ref, list(values)), spacing, hd95)
        for name, values in structures.items()
    }


def _structures(labels_json, pairs) -> dict[str, list[int]]:
    if labels_json is not None:
        class_names, regions = labels_from_dataset_json(labels_json)
        structures = {str(v): [v] for v in range(1, len(class_names))}
        structures.update({name: list(values) for name, values in regions.items()})
        return structures
    # without dataset.json: every foreground value found in the references
    found: set[int] = set()
    for _, _, ref in pairs:
        found |= {int(v) for v in np.unique(read_nifti(ref)[0]) if v != 0}
    return {str(v): [v] for v in sorted(found)}


def _mean(per_case: list[dict], name: str) -> dict[str, float]:
    keys = per_case[0]["metrics"][name].keys()
    out = {}
    for key in keys:
        values = [c["metrics"][name][key] for c in per_case]
        finite = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
        out[key] = float(np.mean(finite)) if finite else math.nan
    return out


def score_folder(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    *,
    labels: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    hd95: bool = False,
) -> dict:
    """Score every prediction of a folder and write ``summary.json`` and ``scores.tsv``.

    Parameters
    ----------
    pred_dir : path-like
        Predicted label maps, ``<case>.nii.gz`` or medseg's ``<case>_seg.nii.gz``.
    gt_dir : path-like
        References ``<case>.nii.gz`` (e.g. an nnU-Net ``labelsTr``).
    labels : path-like, optional
        An nnU-Net ``dataset.json``: its label values are scored (keys ``"1"``, ``"2"``..)
        and its regions by name. Default: every foreground value of the references.
    output_dir : path-like, optional
        Where to write; default ``pred_dir``.
    hd95 : bool, optional
        Also HD95 in mm per structure (slower).

    Returns
    -------
    dict
        The summary: ``metric_per_case`` (``prediction_file``, ``reference_file``,
        ``metrics``), ``mean`` per structure (NaN Dice of cases empty in both maps are
        left out, as nnU-Net does) and ``foreground_mean`` (the mean over the label
        values' means, regions excluded).

    Raises
    ------
    FileNotFoundError
        A prediction without a reference (naming both paths), a missing folder.
    ValueError
        A prediction whose shape or affine differs from its reference's (naming both).
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    output_dir = Path(output_dir) if output_dir is not None else pred_dir
    pairs = _pairs(pred_dir, gt_dir)
    for _, pred, ref in pairs:  # every grid before any volume is read
        _check_grids(pred, ref)
    structures = _structures(labels, pairs)
    if not structures:
        raise ValueError(f"references in {gt_dir} hold no foreground label to score")
    per_case = [
        {
            "prediction_file": str(pred),
            "reference_file": str(ref),
            "metrics": score_pair(pred, ref, structures, hd95=hd95),
        }
        for _, pred, ref in pairs
    ]
    mean = {name: _mean(per_case, name) for name in structures}
    values = [name for name in structures if name.isdigit()]
    keys = mean[next(iter(structures))].keys()
    foreground = {
        key: float(np.nanmean([mean[n][key] for n in values])) if values else math.nan
        for key in keys
    }
    summary = {"foreground_mean": foreground, "mean": mean, "metric_per_case": per_case}
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / "summary.json", summary)
    _write_table(output_dir / "scores.tsv", pairs, per_case)
    return summary


def _write_table(path: Path, pairs, per_case) -> None:
    """medseg's long table: one row per case, structure and metric."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, delimiter="\t")
            writer.writerow(["case_id", "structure", "metric", "value"])
            for (case, _, _), entry in zip(pairs, per_case, strict=True):
                for name, metrics in entry["metrics"].items():
                    for metric, value in metrics.items():
                        writer.writerow([case, name, metric, value])

    write_atomically(path, write)


def score_command(args) -> None:
    """``medseg score PRED_DIR GT_DIR [--labels dataset.json] [--output DIR] [--hd95]``."""
    output = Path(args.output) if args.output else Path(args.pred_dir)
    summary = score_folder(
        args.pred_dir, args.gt_dir, labels=args.labels, output_dir=output, hd95=args.hd95
    )
    print(f"scored {len(summary['metric_per_case'])} case(s): {output / 'summary.json'}, "
          f"{output / 'scores.tsv'}")
    for name, metrics in summary["mean"].items():
        print(f"  {name:20s} mean Dice {metrics['Dice']:.4f}  IoU {metrics['IoU']:.4f}")
    print(f"  {'foreground_mean':20s} mean Dice {summary['foreground_mean']['Dice']:.4f}")
