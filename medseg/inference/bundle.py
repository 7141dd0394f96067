"""A self-contained model: one zip holding the weights, the plan and the postprocessing.

``medseg export`` writes it (:func:`write_bundle`), ``medseg predict --model model.zip``
and :meth:`Segmenter.from_bundle` read it (:func:`read_bundle`), with no tracking store
and no dataset. Members::

    manifest.json        format, format_version, medseg_version, models, members (SHA-256)
    model.keras          the weights (an ensemble: models/<i>.keras, and ensemble.json)
    plan.json            the PredictionPlan (preprocessing, window, class names)
    postprocessing.json  the postprocessing decision, or null

Reading checks every member name (no absolute path, no ``..``), that the members are
exactly the ones the manifest lists and that each has the SHA-256 it records, before a
model is loaded; Keras loads the weights in safe mode.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.config import InferenceConfig
from medseg.inference.plan import PredictionPlan
from medseg.inference.postprocess import apply_postprocessing, check_postprocessing
from medseg.inference.predictor import predict_case
from medseg.inference.sliding_window import SlidingWindow
from medseg.io import MedsegIOError, read_case
from medseg.io.atomic import write_atomically

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "Bundle",
    "Segmenter",
    "is_bundle",
    "read_bundle",
    "unpack_models",
    "write_bundle",
]

FORMAT = "medseg-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
POSTPROCESSING = "postprocessing.json"
ENSEMBLE = "ensemble.json"
# a member name as write_bundle makes them: relative, "/"-separated, no "." or ".." parts
_SAFE_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def is_bundle(model: str | os.PathLike) -> bool:
    """True for what ``medseg predict --model`` reads as an exported model: a ``.zip``."""
    return str(model).lower().endswith(".zip")


@dataclasses.dataclass(frozen=True)
class Bundle:
    """An unpacked model zip.

    Attributes
    ----------
    path : Path
        The zip.
    models : tuple of Path
        The unpacked ``.keras`` files (one, or an ensemble's).
    plan : PredictionPlan
        With the zip's postprocessing decision.
    manifest : dict
    """

    path: Path
    models: tuple[Path, ...]
    plan: PredictionPlan
    manifest: dict[str, Any]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_bundle(
    path: str | os.PathLike,
    models: Sequence[str | os.PathLike],
    plan: PredictionPlan,
    source: dict[str, Any] | None = None,
) -> Path:
    """Write ``models`` (``.keras`` files) and ``plan`` into the model zip ``path``.

    Written to a temporary file beside ``path`` and renamed: an interrupted export leaves
    no partial zip.

    Parameters
    ----------
    path : path
        Must end with ``.zip`` (how ``medseg predict --model`` recognises it).
    models : sequence of path
        One ``.keras`` file, or an ensemble's (probabilities averaged).
    plan : PredictionPlan
        Its ``postprocessing`` is written as ``postprocessing.json``.
    source : dict, optional
        Recorded in the manifest (e.g. ``{"run_id": ...}``).

    Raises
    ------
    ValueError
        ``path`` does not end with ``.zip``, or no model is given.
    FileNotFoundError
        A model file is missing.
    """
    from medseg import __version__

    path = Path(path)
    if not is_bundle(path):
        raise ValueError(f"model zip {path} (--output): the name must end with .zip")
    if path.is_dir():
        raise ValueError(f"model zip {path} (--output) is a folder; give a file name")
    if not models:
        raise ValueError(f"model zip {path}: no model to write")
    for model in models:
        if not Path(model).is_file():
            raise FileNotFoundError(f"model zip {path}: model file {model} does not exist")
    names = ["model.keras"] if len(models) == 1 else [f"models/{i}.keras" for i in range(len(models))]
    texts = {
        PLAN: json.dumps(plan.to_dict(), indent=2) + "\n",
        POSTPROCESSING: json.dumps(plan.postprocessing, indent=2) + "\n",
    }
    if len(models) > 1:
        texts[ENSEMBLE] = json.dumps({"models": names, "postprocessing": plan.postprocessing}) + "\n"
    members = {name: _sha256(Path(model)) for name, model in zip(names, models, strict=True)}
    members.update({name: hashlib.sha256(text.encode()).hexdigest() for name, text in texts.items()})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "medseg_version": __version__,
        "models": names,
        "members": members,
        "source": source or {},
    }

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(MANIFEST, json.dumps(manifest, indent=2) + "\n")
            for name, model in zip(names, models, strict=True):
                zf.write(model, name)
            for name, text in texts.items():
                zf.writestr(name, text)

    return write_atomically(path, write)


def _check_name(zip_path: Path, name: str) -> None:
    parts = name.split("/")
    if not name or "\\" in name or not all(_SAFE_PART.match(p) for p in parts):
        raise MedsegIOError(
            f"model zip {zip_path}: member name {name!r} is not a plain relative path (an "
            "absolute path, '..' or a drive would write outside the folder it is unpacked "
            "in); refusing the zip: export the model again with medseg export"
        )


def _manifest(zip_path: Path, zf: zipfile.ZipFile) -> dict[str, Any]:
    where = f"model zip {zip_path}: {MANIFEST}"
    if MANIFEST not in zf.namelist():
        raise MedsegIOError(
            f"model zip {zip_path} has no {MANIFEST}: not a model exported by medseg export"
        )
    try:
        manifest = json.loads(zf.read(MANIFEST))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MedsegIOError(f"{where} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise MedsegIOError(f"{where} does not say format {FORMAT!r}: not a medseg model zip")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise MedsegIOError(
            f"{where} has format_version {version!r}; this medseg reads version "
            f"{FORMAT_VERSION}: export the model again with this medseg (or upgrade medseg)"
        )
    members, models = manifest.get("members"), manifest.get("models")
    if not isinstance(members, dict) or not all(
        isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for v in members.values()
    ):
        raise MedsegIOError(f"{where}: 'members' must map each member to its hex SHA-256")
    if (
        not isinstance(models, list)
        or not models
        or not all(isinstance(m, str) and m.endswith(".keras") and m in members for m in models)
    ):
        raise MedsegIOError(
            f"{where}: 'models' must list at least one .keras member of 'members', got {models!r}"
        )
    for name in (PLAN, POSTPROCESSING):
        if name not in members:
            raise MedsegIOError(f"{where} lists no member {name}; the zip is incomplete")
    return manifest


def read_bundle(path: str | os.PathLike, folder: str | os.PathLike) -> Bundle:
    """Check the model zip ``path`` and unpack it into ``folder``.

    Names, manifest and member list are checked before anything is unpacked; each member's
    SHA-256 while it is.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    MedsegIOError
        Naming the zip (and the member) when it is not a zip, a member name is unsafe,
        the manifest is missing or malformed, a member is missing, unlisted or has another
        SHA-256 than the manifest records, or the plan or postprocessing is malformed.
    """
    path, folder = Path(path), Path(folder)
    if not path.is_file():
        raise FileNotFoundError(f"model zip {path} does not exist")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise MedsegIOError(f"model zip {path} is not a zip file ({err})") from err
    with zf:
        names = zf.namelist()
        for name in names:
            _check_name(path, name)
        if len(set(names)) != len(names):
            raise MedsegIOError(f"model zip {path} holds a member name twice; refusing it")
        manifest = _manifest(path, zf)
        members: dict[str, str] = manifest["members"]
        for name in members:
            _check_name(path, name)
            if name not in names:
                raise MedsegIOError(
                    f"model zip {path}: member {name} listed in {MANIFEST} is missing; the "
                    "zip is incomplete: export the model again"
                )
        for name in names:
            if name != MANIFEST and name not in members:
                raise MedsegIOError(
                    f"model zip {path}: member {name} is not listed in {MANIFEST}; refusing "
                    "a zip changed after export"
                )
        for name, expected in members.items():
            target = folder.joinpath(*name.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with zf.open(name) as src, open(target, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    digest.update(chunk)
                    dst.write(chunk)
            if digest.hexdigest() != expected:
                raise MedsegIOError(
                    f"model zip {path}: member {name} has SHA-256 {digest.hexdigest()}, but "
                    f"{MANIFEST} records {expected}: the zip was changed or damaged since "
                    "export; do not use it (export the model again)"
                )
    where = f"model zip {path}: {PLAN}"
    try:
        values = json.loads((folder / PLAN).read_text())
        decision = json.loads((folder / POSTPROCESSING).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MedsegIOError(f"model zip {path}: a JSON member is not valid JSON: {err}") from err
    try:
        plan = PredictionPlan.from_dict(values, where=where)
        if decision is not None:
            decision = check_postprocessing(decision, f"model zip {path}: {POSTPROCESSING}")
    except MedsegIOError:
        raise
    except ValueError as err:
        raise MedsegIOError(str(err)) from err
    plan = dataclasses.replace(plan, postprocessing=decision)
    models = tuple(folder.joinpath(*m.split("/")) for m in manifest["models"])
    return Bundle(path, models, plan, manifest)


def unpack_models(
    models: Sequence[str], folder: str | os.PathLike
) -> tuple[list[str], list[str], PredictionPlan | None]:
    """Replace the model zips among ``models`` by their unpacked ``.keras`` files.

    Returns
    -------
    models : list of str
        ``models`` with each zip replaced by its model(s) in ``folder``.
    origins : list of str
        For each of them, what the user named (the zip), for the provenance record: the
        unpacked files live in a temporary folder.
    plan : PredictionPlan or None
        The first zip's plan (with its postprocessing), None without a zip.
    """
    paths: list[str] = []
    origins: list[str] = []
    plan = None
    for i, model in enumerate(models):
        if not is_bundle(model):
            paths.append(model)
            origins.append(model)
            continue
        bundle = read_bundle(model, Path(folder, str(i)))
        plan = plan or bundle.plan
        paths += [str(m) for m in bundle.models]
        origins += [str(model)] * len(bundle.models)
    return paths, origins, plan


class Segmenter:
    """Segment whole cases as ``medseg predict`` does: the plan's preprocessing, sliding
    window (default ``inference.*`` settings) and postprocessing, on the source grid.

    Parameters
    ----------
    models : keras.Model or a list of them
        A list is an ensemble (probabilities averaged).
    plan : PredictionPlan
    window : SlidingWindow, optional
        Default: the plan's window with ``InferenceConfig()``, as ``medseg predict``.
    """

    def __init__(self, models, plan: PredictionPlan, window: SlidingWindow | None = None):
        self.models = list(models) if isinstance(models, list | tuple) else [models]
        self.plan = plan
        self.window = window or SlidingWindow.from_plan(plan, InferenceConfig())

    @classmethod
    def from_bundle(cls, path: str | os.PathLike) -> Segmenter:
        """Load a model zip written by ``medseg export`` (unpacked to a temporary folder
        that is removed once the models are loaded)."""
        from medseg.inference.files import load_model_file

        folder = tempfile.mkdtemp(prefix="medseg-model-")
        try:
            bundle = read_bundle(path, folder)
            models = [load_model_file(m) for m in bundle.models]
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return cls(models, bundle.plan)

    def segment(
        self, image: np.ndarray, spacing: Sequence[float], name: str = "image"
    ) -> np.ndarray:
        """The postprocessed label map (uint8) of ``image`` (``(D, H, W)`` or
        ``(D, H, W, C)``) with voxel ``spacing`` (array-axis order)."""
        from medseg.inference.files import _check_channels  # the same check as predict

        image = np.asarray(image)
        spacing = [float(s) for s in np.asarray(spacing, dtype=float).ravel()]
        if image.ndim not in (3, 4) or len(spacing) != 3:
            raise ValueError(
                f"{name}: expected a (D, H, W[, C]) image and 3 spacings, got shape "
                f"{image.shape} and {len(spacing)} spacing(s)"
            )
        _check_channels(self.models, image, Path(name), self.plan.slab)
        labels, _ = predict_case(
            self.models,
            image,
            spacing,
            self.plan.preprocess,
            self.plan.patch_size,
            len(self.plan.class_names),
            probabilities=False,
            slab=self.plan.slab,
            window=self.window,
            name=name,
        )
        return apply_postprocessing(labels, self.plan.postprocessing, spacing)

    def segment_file(self, path: str | os.PathLike) -> np.ndarray:
        """The label map of a NIfTI file or DICOM series folder, on its grid."""
        path = Path(path)
        record = read_case(path.name, path)
        return self.segment(record.image, record.spacing, str(path))
