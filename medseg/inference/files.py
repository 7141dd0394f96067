"""Predicting image files on disk: NIfTI files, folders of them, DICOM series folders.

Each case is read with :func:`medseg.io.read_case` (no label needed), predicted whole and
written beside the others as ``<case>_seg.nii.gz`` (uint8 labels) and, when asked,
``<case>_prob.nii.gz`` (float32 softmax, classes on the 4th axis), with the source's
affine, and for NIfTI sources its header. Beside them ``<case>_provenance.json`` records
what made them (:func:`provenance_key`: the models, the plan, the options that change the
result, the source file). Every file is written atomically and the record last, so an
interrupted run leaves no partial file and no record of an unfinished case; a rerun skips
the cases whose record matches and predicts the others again (another model or options:
the outputs are replaced, and the log says so). With ``uncertainty``, each case also gets
``<case>_entropy.nii.gz`` and ``<case>_mutual_info.nii.gz`` (float32, nats) and
``<case>_uncertainty.json`` and ``.gif`` (:mod:`medseg.inference.uncertainty`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from medseg.config import InferenceConfig
from medseg.inference.plan import PredictionPlan
from medseg.inference.postprocess import apply_postprocessing
from medseg.inference.predictor import predict_case
from medseg.inference.sliding_window import SlidingWindow
from medseg.io import MedsegIOError, read_case, write_like, write_nifti
from medseg.io.jsonfile import write_json
from medseg.io.nifti import nifti_suffix
from medseg.pipeline.preprocess import MAX_RESAMPLED_VOXELS
from medseg.progress import is_quiet, start_bar

__all__ = [
    "PredictionFailed",
    "find_inputs",
    "is_model_uri",
    "load_model_file",
    "model_source",
    "output_paths",
    "predict_files",
    "provenance_key",
    "sidecar_path",
]

# what predict_files writes per case: <case><suffix>
_OUTPUT_SUFFIXES = ("_seg.nii.gz", "_prob.nii.gz")
# with --uncertainty, also (uncertainty.py): the maps, then the summary and its GIF
_UNCERTAINTY_SUFFIXES = ("_entropy.nii.gz", "_mutual_info.nii.gz")
_SUMMARY_SUFFIXES = ("_uncertainty.json", "_uncertainty.gif")
_SIDECAR_SUFFIX = "_provenance.json"


class PredictionFailed(ValueError):
    """Some cases of a ``keep_going`` run failed; the message lists each with its error.

    Attributes
    ----------
    failures : list of (case_id, path, message)
    written : list of Path
        The files the other cases wrote.
    """

    def __init__(self, message: str, failures: list[tuple[str, Path, str]], written: list[Path]):
        super().__init__(message)
        self.failures = failures
        self.written = written

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
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as err:  # Keras raises many types for a broken archive
        raise ValueError(f"model file {path} cannot be loaded: {type(err).__name__}: {err}") from err


def find_inputs(
    inputs: Sequence[str | os.PathLike], log: Callable[[str], None] | None = None
) -> list[tuple[str, Path | tuple[Path, ...]]]:
    """The cases to predict, as ``(case_id, path)`` (or ``(case_id, channel paths)``).

    Parameters
    ----------
    inputs : sequence of path
        NIfTI files (case id: the name without ``.nii``/``.nii.gz``), folders of NIfTI
        files (each file a case) and DICOM series folders (case id: the folder name).
        A folder whose files are all named ``<case>_XXXX.nii.gz`` (4 digits), with some
        ``XXXX`` other than ``0000``, is in nnU-Net's layout: each case's files are its
        channels, returned as a tuple of paths in channel order, case id without the
        suffix. (A folder of ``_0000`` files alone keeps one case per file, as before.)
        In a folder, hidden files are skipped (macOS ``._*`` resource forks that MSD
        archives carry, ``.DS_Store``, the temporary files of an interrupted write), and
        so are the outputs of :func:`predict_files` (a ``<case>_seg.nii.gz`` or
        ``<case>_prob.nii.gz`` beside its ``<case>_provenance.json``), also when given as
        files.
    log : callable, optional
        Receives one line per output skipped.

    Raises
    ------
    FileNotFoundError
        An input does not exist.
    ValueError
        An input file is not NIfTI, two inputs have the same case id (their outputs
        would overwrite each other), or an nnU-Net-layout case misses a channel file or
        has one more than the others (naming the folder and case).
    """
    cases: list[tuple[str, Path]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(
                p
                for p in path.iterdir()
                if not p.name.startswith(".") and p.is_file() and nifti_suffix(p)
            )
            outputs = [p for p in files if _is_output(p)]
            if outputs and log:
                log(f"{path}: skipped {len(outputs)} output(s) of medseg predict")
            files = [p for p in files if p not in outputs]
            channels = [re.fullmatch(r"(.+)_(\d{4})", _case_id(p)) for p in files]
            if files and all(channels) and any(m[2] != "0000" for m in channels):
                # nnU-Net's layout: <case>_0000, <case>_0001, ... are one case's channels
                groups: dict[str, dict[int, Path]] = {}
                for match, p in zip(channels, files, strict=True):
                    groups.setdefault(match[1], {})[int(match[2])] = p
                # the channel count most cases have: a case off it is the one named
                sizes = [len(g) for g in groups.values()]
                count = max(set(sizes), key=lambda n: (sizes.count(n), n))
                for case_id, group in groups.items():
                    if sorted(group) != list(range(count)):
                        have = ", ".join(f"_{c:04d}" for c in sorted(group))
                        raise ValueError(
                            f"{path}: case {case_id!r} has channel files {have}, but its "
                            f"cases have {count} channels (_0000 .. _{count - 1:04d}); "
                            "add the missing file or remove the extra one"
                        )
                    cases.append((case_id, tuple(group[c] for c in range(count))))
            elif files or outputs:  # a folder of NIfTI files, maybe none left to predict
                cases += [(_case_id(p), p) for p in files]
            else:  # a DICOM series; read_case says so if it holds no DICOM files
                cases.append((path.name, path))
        elif path.is_file():
            if nifti_suffix(path) is None:
                raise ValueError(
                    f"input {path}: expected a .nii or .nii.gz file, a folder of them or a "
                    "DICOM series folder"
                )
            if _is_output(path):
                if log:
                    log(f"{path}: skipped, an output of medseg predict")
                continue
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


def _is_output(path: Path) -> bool:
    # a name alone is no proof (a user's image may end in _seg): the record beside it is
    for suffix in _OUTPUT_SUFFIXES + _UNCERTAINTY_SUFFIXES:
        if path.name.endswith(suffix):
            case_id = path.name[: -len(suffix)]
            return sidecar_path(path.parent, case_id).is_file()
    return False


def output_paths(output_dir: str | os.PathLike, case_id: str) -> tuple[Path, Path]:
    """``<output_dir>/<case_id>_seg.nii.gz`` and ``<output_dir>/<case_id>_prob.nii.gz``."""
    output_dir = Path(output_dir)
    return tuple(output_dir / f"{case_id}{suffix}" for suffix in _OUTPUT_SUFFIXES)


def sidecar_path(output_dir: str | os.PathLike, case_id: str) -> Path:
    """``<output_dir>/<case_id>_provenance.json``: what made the case's outputs."""
    return Path(output_dir) / f"{case_id}{_SIDECAR_SUFFIX}"


# -- provenance --------------------------------------------------------------------------


def _sha256_file(path: Path, digest=None):
    digest = digest or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest


def model_source(
    model: str | os.PathLike, run_id_of: Callable[[str], str | None] | None = None
) -> dict[str, Any]:
    """How ``medseg predict`` names a model in the provenance record.

    Parameters
    ----------
    model : str or path
        A ``.keras`` file (recorded with its SHA-256), an MLflow model folder (the
        SHA-256 of its files), or a model URI (``runs:/<run id>/...``: that run id;
        ``models:/...``: the id of the run that logged it, when ``run_id_of`` tells it).
    run_id_of : callable, optional
        ``uri -> run id or None`` for ``models:/`` URIs (the CLI passes
        :func:`medseg.tracking.model.source_run_id` with its tracking URI: inference sits
        below tracking and does not import it).

    Returns
    -------
    dict
        ``{"model": ..., "sha256": ...}`` or ``{"model": ..., "run_id": ...}``. URIs are
        recorded without passwords.
    """
    from medseg.config import redact

    text = str(model)
    path = Path(text)
    if path.is_file():
        return {"model": str(path.resolve()), "sha256": _sha256_file(path).hexdigest()}
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
            _sha256_file(file, digest)
        return {"model": str(path.resolve()), "sha256": digest.hexdigest()}
    source: dict[str, Any] = {"model": redact(text)}
    if text.startswith("runs:/"):
        source["run_id"] = text[len("runs:/") :].split("/", 1)[0]
    elif run_id_of is not None:
        try:
            run_id = run_id_of(text)
        except ValueError:  # MLflow does not say: the weights' hash still identifies it
            run_id = None
        if run_id:
            source["run_id"] = run_id
    return source


def _model_identity(model: Callable) -> dict[str, Any]:
    # the weights' hash identifies a Keras model however it was loaded; a plain callable
    # can only be named (its results are not content-checked)
    if isinstance(model, keras.Model):
        digest = hashlib.sha256()
        for weight in model.weights:
            value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
            digest.update(f"{weight.path}:{value.dtype}:{value.shape}".encode())
            digest.update(value.tobytes())
        return {"weights_sha256": digest.hexdigest()}
    name = getattr(model, "__qualname__", type(model).__qualname__)
    return {"callable": f"{getattr(model, '__module__', '?')}.{name}"}


def provenance_key(
    models: Sequence[Callable],
    plan: PredictionPlan,
    window: SlidingWindow,
    sources: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """What decides a prediction's result, as a JSON-ready dict compared on reruns.

    Parameters
    ----------
    models : sequence of callable
        The model, or an ensemble's models; each recorded by its weights' SHA-256 (a
        Keras model) or its name (another callable).
    plan : PredictionPlan
        Recorded as the SHA-256 of its JSON without the postprocessing, which is
        recorded as itself.
    window : SlidingWindow
        Its overlap, weighting, mirrored axes and pad value.
    sources : sequence of dict, optional
        One per model (:func:`model_source`), merged into its entry.

    Returns
    -------
    dict
        ``models`` (a list: several form an ensemble), ``plan_sha256``, ``options``.
    """
    sources = list(sources or [{} for _ in models])
    if len(sources) != len(models):
        raise ValueError(f"{len(sources)} model source(s) for {len(models)} model(s)")
    bare = dataclasses.replace(plan, postprocessing=None).to_dict()
    plan_hash = hashlib.sha256(json.dumps(bare, sort_keys=True).encode()).hexdigest()
    key = {
        "models": [{**src, **_model_identity(m)} for m, src in zip(models, sources, strict=True)],
        "plan_sha256": plan_hash,
        "options": {
            "overlap": float(window.overlap),
            "weighting": window.weighting,
            "mirror_axes": list(window.mirror_axes),
            "pad_value": window.pad_value,
            "postprocessing": plan.postprocessing,
        },
    }
    return json.loads(json.dumps(key))  # as it reads back from the file: tuples are lists


def _source_identity(path: Path | tuple[Path, ...]) -> dict[str, Any]:
    # size and modification time: a re-exported source is predicted again, without
    # hashing every input on every rerun
    if isinstance(path, tuple):  # one case's channel files
        files = list(path)
    else:
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    stats = [p.stat() for p in files]
    return {
        "source": (
            [str(p.resolve()) for p in path] if isinstance(path, tuple) else str(path.resolve())
        ),
        "source_bytes": sum(s.st_size for s in stats),
        "source_mtime_ns": max((s.st_mtime_ns for s in stats), default=0),
    }


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):  # missing or unreadable: as if there were none
        return None
    return record if isinstance(record, dict) else None


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What changed between two provenance keys, in words."""
    changes = []
    if old.get("models") != new.get("models"):
        def names(key):
            return ", ".join(
                str(m.get("model") or m.get("callable") or "?") for m in key.get("models") or []
            )

        before, after = names(old), names(new)
        changes.append(f"model {before} -> {after}" if before != after else "model weights")
    if old.get("plan_sha256") != new.get("plan_sha256"):
        changes.append("plan")
    old_options, new_options = old.get("options") or {}, new.get("options") or {}
    for name, value in new_options.items():
        if old_options.get(name) != value:
            changes.append(f"{name} {old_options.get(name)!r} -> {value!r}")
    for name in ("source", "source_bytes", "source_mtime_ns"):
        if old.get(name) != new.get(name):
            changes.append("source file")
            break
    return changes or ["record"]


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
    keep_going: bool = False,
    sources: Sequence[dict[str, Any]] | None = None,
    max_voxels: int = MAX_RESAMPLED_VOXELS,
    uncertainty: str = "none",
    uncertainty_samples: int = 10,
    seed: int | None = None,
    temperature: float | None = None,
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
        Created if missing. Not an input folder: its outputs would be read back as cases.
    window : SlidingWindow, optional
        The inferer, configured once (:meth:`SlidingWindow.from_plan`); default the plan's
        window with the default ``inference.*`` settings.
    probabilities : bool, optional
        Also write ``<case>_prob.nii.gz``.
    overwrite : bool, optional
        Predict every case again. By default a case is skipped when its outputs exist and
        its ``<case>_provenance.json`` records the same :func:`provenance_key` and source
        (an interrupted run resumes); outputs made otherwise (another model, plan,
        options or source, or without a record) are predicted again and replaced.
    log : callable, optional
        Receives one line per case.
    keep_going : bool, optional
        A case that fails does not stop the others; :class:`PredictionFailed` is raised at
        the end, listing every failed case.
    sources : sequence of dict, optional
        Where each model comes from (:func:`model_source`), for the provenance record.
    max_voxels : int, optional
        The largest preprocessed grid accepted per case
        (:func:`~medseg.pipeline.preprocess.check_resampling`).
    uncertainty : {"none", "tta", "ensemble", "mc-dropout"}, optional
        Also write ``<case>_entropy.nii.gz`` and ``<case>_mutual_info.nii.gz`` (float32,
        nats, on the source grid), ``<case>_uncertainty.json`` (per structure) and
        ``<case>_uncertainty.gif`` from several probability samples
        (:func:`~medseg.inference.uncertainty.sample_sets`); the label map is then the
        argmax of the samples' mean.
    uncertainty_samples : int, optional
        Number of mc-dropout passes.
    seed : int, optional
        Fixes the mc-dropout masks (the same for every case).
    temperature : float, optional
        Calibrates the written probabilities (:func:`~medseg.evaluation.calibration.
        apply_temperature`, e.g. the training run's ``temperature.json``); the labels, an
        argmax, do not change.

    Returns
    -------
    list of Path
        The NIfTI files written (each case also writes its provenance record, and with
        ``uncertainty`` its summary and GIF).

    Raises
    ------
    ValueError
        ``output_dir`` is an input folder (before anything is read).
    MedsegIOError
        Naming the file that cannot be read or does not fit the model.
    PredictionFailed
        With ``keep_going``, after the other cases, when any failed.
    """
    if int(max_voxels) < 1:
        raise ValueError(f"max_voxels={max_voxels} (--max-voxels) must be at least 1")
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, inputs)
    cases = find_inputs(inputs, log)
    window = window or SlidingWindow.from_plan(plan, InferenceConfig())
    models = list(model) if isinstance(model, list | tuple) else [model]
    common = provenance_key(models, plan, window, sources)
    if temperature is not None and probabilities:
        common["options"]["temperature"] = float(temperature)
    sampling = None
    if uncertainty != "none":  # checked before any case is read
        from medseg.inference.uncertainty import sample_sets

        names = [str(s.get("model")) for s in sources] if sources else None
        sampling = sample_sets(models, window, uncertainty, uncertainty_samples, seed, names)
        common["options"]["uncertainty"] = {"method": uncertainty, "samples": len(sampling[0])}
        if uncertainty == "mc-dropout":
            common["options"]["uncertainty"]["seed"] = seed
    written: list[Path] = []
    failures: list[tuple[str, Path, str]] = []
    # one step per case (medseg.progress); the per-case lines are printed above the bar
    with start_bar(len(cases), "predict", unit="case") as bar:
        if log is print:  # the default per-case lines: above the bar, none when quiet
            log = None if is_quiet() else bar.write
        for case_id, path in cases:
            bar.set_postfix_str(case_id)
            try:
                written += _predict_one(
                    models, plan, window, case_id, path, output_dir, common,
                    probabilities=probabilities, overwrite=overwrite, log=log,
                temperature=temperature,
                    max_voxels=max_voxels, sampling=sampling,
                )
            except Exception as err:
                if not keep_going:
                    raise
                where = path[0] if isinstance(path, tuple) else path
                message = str(err) if str(where) in str(err) else f"{where}: {err}"
                failures.append((case_id, path, f"{type(err).__name__}: {message}"))
                if log:
                    log(f"{case_id}: failed, {type(err).__name__}: {message}")
            bar.update()
    if failures:
        lines = "\n".join(f"  {case_id}: {message}" for case_id, _, message in failures)
        raise PredictionFailed(
            f"{len(failures)} of {len(cases)} case(s) failed ({len(written)} file(s) written "
            f"to {output_dir} for the others):\n{lines}",
            failures,
            written,
        )
    return written


def _check_output_dir(output_dir: Path, inputs: Sequence[str | os.PathLike]) -> None:
    # refused rather than filtered: outputs of an older medseg (no record beside them)
    # could not be told from cases, and every later run of the folder would meet them
    for item in inputs:
        folder = Path(item)
        if folder.is_dir() and output_dir.exists() and os.path.samefile(folder, output_dir):
            raise ValueError(
                f"output folder {output_dir} (--output) is the input folder {folder}: its "
                "predictions would be read back as cases by the next run; write them to "
                f"another folder, e.g. --output {folder.parent / (folder.name + '_predicted')}"
            )


def _predict_one(
    models, plan, window, case_id, path, output_dir, common, *, probabilities, overwrite,
    log, max_voxels, sampling=None, temperature=None,
) -> list[Path]:
    """Predict one case unless its outputs are up to date; the files written."""
    seg_path, prob_path = output_paths(output_dir, case_id)
    record_path = sidecar_path(output_dir, case_id)
    extra_paths = [output_dir / f"{case_id}{s}" for s in _UNCERTAINTY_SUFFIXES]
    summary_path, gif_path = (output_dir / f"{case_id}{s}" for s in _SUMMARY_SUFFIXES)
    key = {**common, **_source_identity(path)}
    complete = sampling is None or all(p.exists() for p in [*extra_paths, summary_path])
    if (
        not overwrite and seg_path.exists() and (prob_path.exists() or not probabilities)
        and complete
    ):
        recorded = _read_record(record_path)
        if recorded is not None and recorded.get("key") == key:
            if log:
                log(f"{case_id}: {seg_path} exists, same model and options: skipped")
            return []
        if log:
            if recorded is None:
                why = "has no provenance record"
            else:
                changes = _differences(recorded.get("key") or {}, key)
                why = f"was made otherwise ({'; '.join(changes)})"
            log(f"{case_id}: {seg_path} {why}: predicting it again, replacing it")
    record = read_case(case_id, path)
    where = path[0] if isinstance(path, tuple) else path  # errors name the first channel
    _check_channels(models, record.image, where, plan.slab)
    if sampling is not None:
        labels, probs, maps, summary = _predict_samples(sampling, record, plan, max_voxels, where)
    else:
        labels, probs = _predict_single(models, record, plan, window, probabilities,
                                        max_voxels, where)
    labels = apply_postprocessing(labels, plan.postprocessing, record.spacing)
    outputs = [(seg_path, labels)]
    if probabilities:
        if temperature is not None:
            from medseg.evaluation.calibration import apply_temperature

            probs = apply_temperature(probs, temperature).astype(np.float32)
        outputs.append((prob_path, probs))
    if sampling is not None:
        outputs += list(zip(extra_paths, maps, strict=True))
    # the old record goes first and the new one comes last: outputs without a record are
    # never taken for finished ones, whenever a run is interrupted
    record_path.unlink(missing_ok=True)
    if not probabilities:  # an older run's, from other settings: not left beside new labels
        prob_path.unlink(missing_ok=True)
    if sampling is None:  # likewise an older run's uncertainty
        for stale in (*extra_paths, summary_path, gif_path):
            stale.unlink(missing_ok=True)
    written = []
    for out_path, array in outputs:
        if where.is_dir():  # DICOM: the affine read from the series, a fresh header
            write_nifti(out_path, array, record.affine)
        else:  # channel files share one grid: the first one's header
            write_like(out_path, array, where)
        written.append(out_path)
    if sampling is not None:
        from medseg.evaluation.visuals import write_uncertainty_gif

        method = common["options"]["uncertainty"]["method"]
        write_json(summary_path, {"case_id": case_id, "method": method, **summary})
        image = record.image if record.image.ndim == 3 else record.image[..., 0]
        write_uncertainty_gif(gif_path, image, labels, maps[0], vmax=summary["max_entropy"])
    reports = [summary_path, gif_path] if sampling is not None else []
    write_json(
        record_path,
        {
            "case_id": case_id,
            "outputs": [p.name for p in [*written, *reports]],
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "key": key,
        },
    )
    if log:
        found = ", ".join(
            f"{name} {int(np.count_nonzero(labels == c))}"
            for c, name in enumerate(plan.class_names)
            if c > 0
        )
        log(f"{case_id}: {seg_path} ({found} voxels)")
    return written


def _predict_single(models, record, plan, window, probabilities, max_voxels, path):
    return predict_case(
        models,
        record.image,
        record.spacing,
        plan.preprocess,
        plan.patch_size,
        len(plan.class_names),
        probabilities=probabilities,
        slab=plan.slab,
        window=window,
        max_voxels=max_voxels,
        name=str(path),
    )


def _predict_samples(sampling, record, plan, max_voxels, path):
    """Labels (argmax of the samples' mean), mean probabilities, the entropy and mutual
    information maps and the per-structure summary of one case."""
    from medseg.inference.predictor import predict_case_samples
    from medseg.inference.uncertainty import SampleStatistics, uncertainty_summary

    sets, reset = sampling
    reset()  # the same dropout masks for every case, whatever was predicted before
    stats = SampleStatistics()
    for probs in predict_case_samples(
        sets, record.image, record.spacing, plan.preprocess, len(plan.class_names),
        slab=plan.slab, max_voxels=max_voxels, name=str(path),
    ):
        stats.add(probs)
    mean = stats.mean()
    labels = np.argmax(mean, axis=-1).astype(np.uint8)
    entropy, mutual_info = stats.entropy(), stats.mutual_information()
    summary = uncertainty_summary(
        labels, entropy, stats.labels, plan.class_names, mutual_info=mutual_info
    )
    # the structures are those of the consensus before postprocessing: what the samples vote
    summary["segmentation"] = "argmax of the samples' mean probabilities, not postprocessed"
    summary["mean_mutual_info"] = float(mutual_info.mean(dtype=np.float64))
    summary["mean_variance"] = float(stats.variance().mean(dtype=np.float64))
    return labels, mean, (entropy, mutual_info), summary


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
