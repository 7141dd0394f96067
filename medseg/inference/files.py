"""Predicting image files on disk: NIfTI files, folders of them, DICOM series folders.

Each case is read with :func:`medseg.io.read_case` (no label needed), predicted whole and
written beside the others as ``<case>_seg.nii.gz`` (uint8 labels) and, when asked,
``<case>_prob.nii.gz`` (float32 softmax, classes on the 4th axis), with the source's
affine, and for NIfTI sources its header. Files are written atomically, so an interrupted
run leaves no partial file and a rerun continues with the cases not yet written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import keras
import numpy as np

from medseg.config import InferenceConfig
from medseg.inference.plan import PredictionPlan
from medseg.inference.postprocess import apply_postprocessing
from medseg.inference.predictor import predict_case
from medseg.inference.sliding_window import SlidingWindow
from medseg.io import MedsegIOError, read_case, write_like, write_nifti
from medseg.io.nifti import nifti_suffix

__all__ = ["find_inputs", "is_model_uri", "load_model_file", "output_paths", "predict_files"]

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


def is_model_uri(text: str | os.PathLike) -> bool:
    """True for a model URI (``runs:/``, ``models:/``, ``s3://`` …) or an MLflow model
    folder (one holding an ``MLmodel`` file): what :mod:`medseg.tracking.model` loads."""
    path = Path(text)
    if (path / "MLmodel").is_file():
        return True
    return bool(_URI.match(str(text))) and not path.exists()


def load_model_file(path: str | os.PathLike) -> keras.Model:
    """Load a Keras model saved as a ``.keras`` file, for inference (not compiled).

    Raises
    ------
    FileNotFoundError, ValueError
        Naming the file when it is missing or not a loadable Keras model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    if path.suffix != ".keras":
        raise ValueError(f"model file {path}: expected a .keras file (or an MLflow model URI)")
    import medseg.models  # noqa: F401  registers medseg's custom objects with Keras

    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as err:  # Keras raises many types for a broken archive
        raise ValueError(f"model file {path} cannot be loaded: {type(err).__name__}: {err}") from err


def find_inputs(inputs: Sequence[str | os.PathLike]) -> list[tuple[str, Path]]:
    """The cases to predict, as ``(case_id, path)``.

    Parameters
    ----------
    inputs : sequence of path
        NIfTI files (case id: the name without ``.nii``/``.nii.gz``), folders of NIfTI
        files (each file a case) and DICOM series folders (case id: the folder name).

    Raises
    ------
    FileNotFoundError
        An input does not exist.
    ValueError
        An input file is not NIfTI, or two inputs have the same case id (their outputs
        would overwrite each other).
    """
    cases: list[tuple[str, Path]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and nifti_suffix(p))
            if files:
                cases += [(_case_id(p), p) for p in files]
            else:  # a DICOM series; read_case says so if it holds no DICOM files
                cases.append((path.name, path))
        elif path.is_file():
            if nifti_suffix(path) is None:
                raise ValueError(
                    f"input {path}: expected a .nii or .nii.gz file, a folder of them or a "
                    "DICOM series folder"
                )
            cases.append((_case_id(path), path))
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    seen: dict[str, Path] = {}
    for case_id, path in cases:
        if case_id in seen:
            raise ValueError(
                f"inputs {seen[case_id]} and {path} are both case {case_id!r}: their outputs "
                "would collide; predict them into different --output folders"
            )
        seen[case_id] = path
    return cases


def _case_id(path: Path) -> str:
    return path.name[: -len(nifti_suffix(path))]


def output_paths(output_dir: str | os.PathLike, case_id: str) -> tuple[Path, Path]:
    """``<output_dir>/<case_id>_seg.nii.gz`` and ``<output_dir>/<case_id>_prob.nii.gz``."""
    output_dir = Path(output_dir)
    return output_dir / f"{case_id}_seg.nii.gz", output_dir / f"{case_id}_prob.nii.gz"


def predict_files(
    model: Callable | Sequence[Callable],
    plan: PredictionPlan,
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    window: SlidingWindow | None = None,
    probabilities: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] | None = print,
) -> list[Path]:
    """Predict every case of ``inputs`` and write its label map (and probabilities).

    Parameters
    ----------
    model : keras.Model or callable, or a list of them (an ensemble)
    plan : PredictionPlan
        Preprocessing, window size, stride and classes of the model(s), and the
        postprocessing applied to each label map (replace it with
        ``dataclasses.replace(plan, postprocessing=...)``, e.g. by a cross-validation's).
    inputs : sequence of path
        See :func:`find_inputs`.
    output_dir : path
        Created if missing.
    window : SlidingWindow, optional
        The inferer, configured once (:meth:`SlidingWindow.from_plan`); default the plan's
        window with the default ``inference.*`` settings.
    probabilities : bool, optional
        Also write ``<case>_prob.nii.gz``.
    overwrite : bool, optional
        Predict cases whose outputs exist already (by default they are skipped, so an
        interrupted run resumes).
    log : callable, optional
        Receives one line per case.

    Returns
    -------
    list of Path
        The files written.

    Raises
    ------
    MedsegIOError
        Naming the file that cannot be read or does not fit the model.
    """
    cases = find_inputs(inputs)
    window = window or SlidingWindow.from_plan(plan, InferenceConfig())
    models = list(model) if isinstance(model, list | tuple) else [model]
    written: list[Path] = []
    for case_id, path in cases:
        seg_path, prob_path = output_paths(output_dir, case_id)
        if not overwrite and seg_path.exists() and (prob_path.exists() or not probabilities):
            if log:
                log(f"{case_id}: {seg_path} exists, skipped")
            continue
        record = read_case(case_id, path)
        _check_channels(models, record.image, path, plan.slab)
        labels, probs = predict_case(
            models,
            record.image,
            record.spacing,
            plan.preprocess,
            plan.patch_size,
            len(plan.class_names),
            probabilities=probabilities,
            slab=plan.slab,
            window=window,
        )
        labels = apply_postprocessing(labels, plan.postprocessing, record.spacing)
        outputs = [(seg_path, labels)]
        if probabilities:
            outputs.append((prob_path, probs))
        for out_path, array in outputs:
            if path.is_dir():  # DICOM: the affine read from the series, a fresh header
                write_nifti(out_path, array, record.affine)
            else:
                write_like(out_path, array, path)
            written.append(out_path)
        if log:
            found = ", ".join(
                f"{name} {int(np.count_nonzero(labels == c))}"
                for c, name in enumerate(plan.class_names)
                if c > 0
            )
            log(f"{case_id}: {seg_path} ({found} voxels)")
    return written


def _check_channels(models, image: np.ndarray, path: Path, slab: int | None = None) -> None:
    channels = 1 if image.ndim == 3 else int(image.shape[-1])
    for model in models:
        inputs = getattr(model, "inputs", None)
        expected = inputs[0].shape[-1] if inputs else None
        if expected is not None and int(expected) != channels * (slab or 1):
            per_slice = f" ({int(expected) / (slab or 1):g} per slice of its {slab}-slice slabs)"
            raise MedsegIOError(
                f"{path}: image has {channels} channel(s) but the model takes {int(expected)}"
                + (per_slice if slab else "")
            )
