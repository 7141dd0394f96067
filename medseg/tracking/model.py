"""Logging a trained model to MLflow, and loading it (and the plan it predicts with) back
from a file or an MLflow URI.

``medseg predict --model`` takes a ``.keras`` file, a model zip (:func:`export_run`,
``medseg export``) or an MLflow model URI (``runs:/<run id>/model``, ``models:/<model id>``,
``models:/<name>/<version>``). A model from MLflow brings its plan along: the one in its
folder (``medseg/plan.json``, with the ``python_function`` flavour of
:mod:`medseg.tracking.pyfunc`) when :func:`log_model` was given it, else ``plan.json`` of the
run that logged the model.

Loading never runs code from the artifact store: the model folder is downloaded, its
``MLmodel`` must describe a ``.keras`` file (an exported TensorFlow SavedModel,
``save_exported_model: true``, is refused: ``tf.saved_model.load`` executes its graph), and
that file is loaded with Keras' safe mode. :func:`log_model` records the file's SHA-256 in
the tracking store (run tag and logged-model tag ``medseg.model_sha256``), which whoever
can write the artifact store cannot change; loading a ``runs:/`` or ``models:/`` URI checks
the downloaded file against it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import keras
import numpy as np

if TYPE_CHECKING:
    from mlflow.models import ModelSignature

from medseg.inference import PredictionPlan, load_model_file
from medseg.inference.files import is_model_uri
from medseg.tracking import names, pyfunc
from medseg.tracking.store import resolve_tracking_uri, set_tracking_uri

__all__ = [
    "SHA256_TAG",
    "download_model_file",
    "export_run",
    "file_sha256",
    "load_model",
    "load_plan",
    "log_model",
    "model_signature",
    "recorded_sha256",
    "source_run_id",
]

log = logging.getLogger(__name__)

#: Run and logged-model tag holding the SHA-256 of the logged ``.keras`` file.
SHA256_TAG = "medseg.model_sha256"
# where mlflow.keras writes the model inside the model folder (MLflow 3, .keras format)
_KERAS_FILE = pyfunc._KERAS_FILE


def model_signature(in_channels: int, num_classes: int) -> ModelSignature:
    """Tensor signature of a 3D segmentation model (any batch and spatial size)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, -1, in_channels), "image")]),
        outputs=Schema(
            [TensorSpec(np.dtype(np.float32), (-1, -1, -1, -1, num_classes), "probabilities")]
        ),
    )


def log_model(
    model: keras.Model, register_as: str | None = None, plan: PredictionPlan | None = None
):
    """Log ``model`` to the active run as ``model`` (and register it under ``register_as``).

    The inference graph only: no optimizer and no medseg loss, so the logged model loads
    wherever TensorFlow and Keras do, without medseg installed (the full-resolution output
    only, with deep supervision).

    With ``plan`` (what ``medseg predict`` needs besides the weights: preprocessing,
    window, class names, postprocessing) the model folder carries it as
    ``medseg/plan.json`` and its ``python_function`` flavour is medseg's
    (:mod:`medseg.tracking.pyfunc`): ``mlflow.pyfunc.load_model(uri).predict(path)``
    segments a NIfTI file as ``medseg predict`` does, and a registered or copied model keeps
    its preprocessing. Without it, the Keras flavour's own ``python_function`` (a tensor
    in, probabilities out, with :func:`model_signature`).
    """
    import mlflow

    inference = keras.Model(model.inputs, model.outputs[0], name=model.name)
    options = {
        "name": "model",
        "pip_requirements": _requirements(medseg=plan is not None),
        "registered_model_name": register_as,
        "save_exported_model": False,  # a .keras file: loadable in safe mode
    }
    if plan is None:
        info = mlflow.keras.log_model(
            inference,
            signature=model_signature(
                int(inference.input_shape[-1]), int(inference.output_shape[-1])
            ),
            **options,
        )
    else:
        from mlflow.models import Model

        # no signature: the pyfunc input is a path (or image and spacing), which a tensor
        # signature would refuse; no input_example either (it crashes the keras flavour)
        # mlflow.keras warns of the missing signature on every run: it is deliberate here
        save_log = logging.getLogger("mlflow.keras.save")
        level = save_log.level
        save_log.setLevel(logging.ERROR)
        try:
            info = Model.log(
                artifact_path=None, flavor=pyfunc, keras_model=inference, plan=plan, **options
            )
        finally:
            save_log.setLevel(level)
    # the hash of the file as the artifact store holds it (a .keras zip embeds its save time,
    # so it is read back rather than saved twice)
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri, dst_path=tmp)
        digest = file_sha256(Path(local, *pyfunc.keras_file(info.model_uri, Path(local))))
    client = mlflow.MlflowClient()
    client.set_logged_model_tags(info.model_id, {SHA256_TAG: digest})
    if info.run_id:
        client.set_tag(info.run_id, SHA256_TAG, digest)
    return info


def _requirements(medseg: bool = True) -> list[str]:
    # what a logged model needs where it is served: medseg only for its pyfunc flavour
    return [
        f"tensorflow=={metadata.version('tensorflow')}",
        f"keras=={keras.__version__}",
        *([f"medseg=={metadata.version('medseg')}"] if medseg else []),
    ]


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks (a model file may be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _client(tracking_uri: str | None):
    import mlflow

    if tracking_uri is not None:
        set_tracking_uri(resolve_tracking_uri(tracking_uri))
    return mlflow


def load_model(model: str | os.PathLike, tracking_uri: str | None = None) -> keras.Model:
    """Load a model from a ``.keras`` file, an MLflow model folder or an MLflow model URI.

    A URI or folder is downloaded; its ``MLmodel`` must have the ``keras`` flavour with a
    ``.keras`` file (not ``save_exported_model: true``), which is loaded in Keras' safe mode
    with medseg's custom objects, not compiled. For ``runs:/`` and ``models:/`` URIs the
    file's SHA-256 must equal the one :func:`log_model` recorded in the tracking store; a
    model logged without one (not by medseg) loads with a warning.

    Parameters
    ----------
    model : str or path
        ``.keras`` file, a folder holding an ``MLmodel`` file, or a model URI.
    tracking_uri : str, optional
        MLflow tracking URI the ``runs:/`` and ``models:/`` URIs refer to.

    Raises
    ------
    FileNotFoundError, ValueError
        Naming the file or URI that cannot be loaded, is not a ``.keras`` model, or whose
        file differs from the one logged.
    """
    text = str(model)
    if not is_model_uri(text):
        return load_model_file(text)
    with tempfile.TemporaryDirectory() as tmp:
        path = download_model_file(text, tmp, tracking_uri)
        import medseg.models  # noqa: F401  registers medseg's custom objects with Keras

        try:
            return keras.saving.load_model(path, compile=False, safe_mode=True)
        except Exception as err:  # Keras raises many types for a broken archive
            raise ValueError(
                f"model {text} cannot be loaded: {type(err).__name__}: {err}"
            ) from err


def download_model_file(
    model_uri: str, dst: str | os.PathLike, tracking_uri: str | None = None
) -> Path:
    """Download an MLflow model into ``dst`` and return its checked ``.keras`` file.

    The checks of :func:`load_model`: ``MLmodel`` describes a ``.keras`` file, and for
    ``runs:/`` and ``models:/`` URIs its SHA-256 is the one recorded at logging.

    Raises
    ------
    ValueError
        Naming the URI that cannot be downloaded, is not a ``.keras`` model, or whose file
        differs from the one logged.
    """
    text = str(model_uri)
    mlflow = _client(tracking_uri)
    expected, source = recorded_sha256(text) if _tracked(text) else (None, None)
    try:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=str(dst)))
    except Exception as err:  # MlflowException, OSError
        raise ValueError(f"model {text} cannot be downloaded: {type(err).__name__}: {err}") from err
    parts = pyfunc.keras_file(text, folder)
    path = folder.joinpath(*parts)
    if expected is not None:
        found = file_sha256(path)
        if found != expected:
            raise ValueError(
                f"model {text}: {'/'.join(parts)} has SHA-256 {found}, but {source} "
                f"recorded {expected} when it was logged: the file was changed in the "
                "artifact store since; do not use it (log the model again)"
            )
    elif source is not None:
        log.warning(
            "model %s: %s recorded no SHA-256 (not logged by medseg's log_model), so the "
            "file cannot be checked against the one logged", text, source,
        )
    return path


def _tracked(uri: str) -> bool:
    return uri.startswith(("runs:/", "models:/"))


def recorded_sha256(model_uri: str, tracking_uri: str | None = None) -> tuple[str | None, str]:
    """The SHA-256 the tracking store recorded for a model's ``.keras`` file at logging.

    Parameters
    ----------
    model_uri : str
        ``runs:/<run id>/model``, ``models:/<model id>``, ``models:/<name>/<version>``,
        ``models:/<name>/<stage>`` or ``models:/<name>@<alias>``.
    tracking_uri : str, optional

    Returns
    -------
    sha256 : str or None
        None when the model was logged without one (not by :func:`log_model`).
    source : str
        Where it was read, for messages (``run <id>``, ``logged model <id>``).

    Raises
    ------
    ValueError
        Naming the URI when its run, model or version is unknown to the tracking store.
    """
    client = _client(tracking_uri).MlflowClient()
    run_id, model_id = _resolve(client, model_uri)
    try:
        if model_id:
            return client.get_logged_model(model_id).tags.get(SHA256_TAG), f"logged model {model_id}"
        path = model_uri[len("runs:/") :].partition("/")[2].strip("/")
        if path != "model":  # medseg records the hash of the one model it logs, "model"
            return None, f"run {run_id} (artifact {path})"
        return client.get_run(run_id).data.tags.get(SHA256_TAG), f"run {run_id}"
    except Exception as err:  # MlflowException
        raise ValueError(
            f"model {model_uri}: the tracking store does not know it ({type(err).__name__}: "
            f"{err})"
        ) from err


def _resolve(client, model_uri: str) -> tuple[str | None, str | None]:
    """``(run id, logged model id)`` of a ``runs:/`` or ``models:/`` URI, from the tracking
    store and the registry: never from the artifact's own ``MLmodel``, which whoever can
    write the artifact store controls."""
    if model_uri.startswith("runs:/"):
        return model_uri[len("runs:/") :].split("/", 1)[0] or None, None
    rest = model_uri[len("models:/") :].strip("/")
    name, _, version = rest.partition("/")
    try:
        if "@" in name and not version:
            found = client.get_model_version_by_alias(*name.split("@", 1))
        elif version.isdigit():
            found = client.get_model_version(name, version)
        elif version:
            (found,) = client.get_latest_versions(name, [version])
        else:  # models:/<model id>
            return client.get_logged_model(name).source_run_id, name
    except Exception as err:  # MlflowException; unpacking's ValueError: no such stage
        raise ValueError(
            f"model {model_uri}: the tracking store does not know it ({type(err).__name__}: "
            f"{err})"
        ) from err
    return found.run_id or None, found.model_id or None


def source_run_id(model_uri: str, tracking_uri: str | None = None) -> str | None:
    """The id of the run that logged the model at ``model_uri``, if MLflow knows it."""
    mlflow = _client(tracking_uri)
    if _tracked(model_uri):
        return _resolve(mlflow.MlflowClient(), model_uri)[0]
    try:
        return mlflow.models.get_model_info(model_uri).run_id
    except Exception as err:
        raise ValueError(f"model {model_uri}: cannot read its metadata: {err}") from err


def load_plan(model_uri: str, tracking_uri: str | None = None) -> PredictionPlan:
    """The :class:`~medseg.inference.PredictionPlan` of a model logged by ``medseg train``.

    A model :func:`log_model` logged with its plan carries it (``medseg/plan.json`` in
    the model folder): that one is read, so a registered or copied model keeps it.
    Otherwise reads ``plan.json`` from the run that logged the model. Runs logged before
    plan.json held the window and classes get them from the run's ``config.json`` (patch
    size, U-Net depth) and ``fingerprint.json`` (class names).

    Raises
    ------
    ValueError
        When the model has no source run or the run has no usable plan; pass ``--plan``.
    """
    FOLDER, PLAN = pyfunc.FOLDER, pyfunc.PLAN

    own = _client(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            location = str(model_uri).rstrip("/")
            if location.startswith("models:/"):  # MLflow downloads no sub-path of these
                model_id = _resolve(own.MlflowClient(), location)[1]
                location = own.MlflowClient().get_logged_model(model_id).artifact_location
            path = own.artifacts.download_artifacts(
                artifact_uri=f"{location}/{FOLDER}/{PLAN}", dst_path=tmp
            )
        except Exception:  # MlflowException, OSError: logged without it; the run's then
            path = None
        if path is not None:
            values = json.loads(Path(path).read_text())
            return PredictionPlan.from_dict(values, where=f"model {model_uri}: {FOLDER}/{PLAN}")
    run_id = source_run_id(model_uri, tracking_uri)
    if not run_id:
        raise ValueError(f"model {model_uri} was not logged by a run; pass --plan plan.json")
    mlflow = _client(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:

        def fetch(name):
            try:
                path = mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=name, dst_path=tmp
                )
            except Exception as err:
                raise ValueError(
                    f"model {model_uri}: run {run_id} has no {name} artifact ({err}); "
                    "pass --plan plan.json"
                ) from err
            return json.loads(Path(path).read_text())

        values = fetch(names.PLAN)
        if values.get("class_names") is None or values.get("patch_size") is None:
            from medseg.models import stride

            # read as a plain dict: an older config may hold keys Config no longer has
            config = fetch(names.CONFIG)
            values = {
                **values,
                "class_names": fetch(names.FINGERPRINT)["class_names"],
                "patch_size": list(config["patch"]["patch_size"]),
                "stride": stride(config["model"]["depth"]),
            }
    return PredictionPlan.from_dict(values, where=f"plan.json of run {run_id}")


def export_run(run_id: str, output: str | os.PathLike, tracking_uri: str | None = None) -> Path:
    """Write a run's model, plan and postprocessing into one model zip (``medseg export``).

    A training run exports ``runs:/<run id>/model`` with the run's ``plan.json``; an
    evaluation (cross-validation) run its ``ensemble.json``: the fold models, the first
    fold's plan and the postprocessing decided on the pooled cases. Every ``.keras`` file
    is checked against the SHA-256 recorded at logging before it is written;
    :func:`medseg.inference.bundle.write_bundle` writes the zip atomically.

    Raises
    ------
    ValueError
        Naming the run when the tracking store does not know it or it has no model, and
        ``output`` when it does not end with ``.zip``.
    """
    from medseg.config import redact
    from medseg.inference.bundle import is_bundle, write_bundle
    from medseg.inference.ensemble import Ensemble

    if not is_bundle(output) or Path(output).is_dir():
        raise ValueError(f"--output {output}: give a file name ending with .zip")
    client = _client(tracking_uri).MlflowClient()
    try:
        listed = {a.path for a in client.list_artifacts(client.get_run(run_id).info.run_id)}
    except Exception as err:  # MlflowException
        raise ValueError(
            f"run {run_id}: the tracking store does not know it ({type(err).__name__}: {err})"
        ) from err
    with tempfile.TemporaryDirectory() as tmp:
        decision: dict | None | bool = False  # False: the plan's own
        if names.ENSEMBLE in listed:
            path = client.download_artifacts(run_id, names.ENSEMBLE, tmp)
            ensemble = Ensemble.load(path)
            uris, decision = list(ensemble.models), ensemble.postprocessing
        else:  # a logged model is not among the run's artifacts in MLflow 3
            uris = [f"runs:/{run_id}/model"]
        plan = load_plan(uris[0], tracking_uri)
        if decision is not False:
            plan = dataclasses.replace(plan, postprocessing=decision)
        files = [
            download_model_file(uri, Path(tmp, str(i)), tracking_uri)
            for i, uri in enumerate(uris)
        ]
        source = {"run_id": run_id, "models": [redact(u) for u in uris]}
        return write_bundle(output, files, plan, source)


def load_temperature(model_uri: str, tracking_uri: str | None = None) -> float | None:
    """The temperature fitted on the validation cases of the run that logged ``model_uri``
    (its ``temperature.json``, ``evaluation.calibration``), or None when it has none."""
    from medseg.evaluation.calibration import TEMPERATURE_FILE, read_temperature

    run_id = source_run_id(model_uri, tracking_uri)
    if run_id is None:
        return None
    mlflow = _client(tracking_uri)
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    if TEMPERATURE_FILE not in names:
        return None  # an older run, or calibration off
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=TEMPERATURE_FILE, dst_path=tmp
        )
        return read_temperature(path)


def log_ensemble(run_id: str, register_as: str, tracking_uri: str | None = None):
    """Log the evaluation run ``run_id``'s fold models as ONE pyfunc model (the zip
    :func:`export_run` writes, inside the model) and register it as ``register_as``.

    Returns mlflow's ``ModelInfo``; ``mlflow.pyfunc.load_model("models:/<name>/<v>")``
    segments a NIfTI path with the whole ensemble.
    """
    mlflow = _client(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = export_run(run_id, Path(tmp) / "ensemble.zip")
        return mlflow.pyfunc.log_model(
            name="ensemble",
            python_model=pyfunc.ensemble_model(),
            artifacts={"bundle": str(bundle)},
            registered_model_name=register_as,
            pip_requirements=_requirements(),
        )
