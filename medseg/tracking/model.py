"""Logging a trained model to MLflow, and loading it (and the plan it predicts with) back
from a file or an MLflow URI.

``medseg predict --model`` takes a ``.keras`` file or an MLflow model URI (``runs:/<run
id>/model``, ``models:/<model id>``, ``models:/<name>/<version>``). A model from MLflow
brings its plan along: ``plan.json`` is fetched from the run that logged the model.
"""

from __future__ import annotations

import json
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
from medseg.tracking import names
from medseg.tracking.store import resolve_tracking_uri

__all__ = ["load_model", "load_plan", "log_model", "model_signature", "source_run_id"]


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


def log_model(model: keras.Model, register_as: str | None = None):
    """Log ``model`` to the active run as ``model`` (and register it under ``register_as``).

    The inference graph only: no optimizer and no medseg loss, so the logged model loads
    wherever TensorFlow and Keras do, without medseg installed (the full-resolution output
    only, with deep supervision).
    """
    import mlflow

    inference = keras.Model(model.inputs, model.outputs[0], name=model.name)
    return mlflow.keras.log_model(
        inference,
        name="model",
        signature=model_signature(int(inference.input_shape[-1]), int(inference.output_shape[-1])),
        pip_requirements=[
            f"tensorflow=={metadata.version('tensorflow')}",
            f"keras=={keras.__version__}",
        ],
        registered_model_name=register_as,
    )

def _client(tracking_uri: str | None):
    import mlflow

    if tracking_uri is not None:
        mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    return mlflow


def load_model(model: str | os.PathLike, tracking_uri: str | None = None) -> keras.Model:
    """Load a model from a ``.keras`` file, an MLflow model folder or an MLflow model URI.

    Parameters
    ----------
    model : str or path
        ``.keras`` file, a folder holding an ``MLmodel`` file, or a model URI.
    tracking_uri : str, optional
        MLflow tracking URI the ``runs:/`` and ``models:/`` URIs refer to.

    Raises
    ------
    FileNotFoundError, ValueError
        Naming the file or URI that cannot be loaded.
    """
    text = str(model)
    if not is_model_uri(text):
        return load_model_file(text)
    mlflow = _client(tracking_uri)
    try:
        return mlflow.keras.load_model(text)
    except Exception as err:  # MlflowException, OSError, Keras errors
        raise ValueError(f"model {text} cannot be loaded: {type(err).__name__}: {err}") from err


def source_run_id(model_uri: str, tracking_uri: str | None = None) -> str | None:
    """The id of the run that logged the model at ``model_uri``, if MLflow knows it."""
    if model_uri.startswith("runs:/"):
        return model_uri[len("runs:/") :].split("/", 1)[0] or None
    mlflow = _client(tracking_uri)
    try:
        return mlflow.models.get_model_info(model_uri).run_id
    except Exception as err:
        raise ValueError(f"model {model_uri}: cannot read its metadata: {err}") from err


def load_plan(model_uri: str, tracking_uri: str | None = None) -> PredictionPlan:
    """The :class:`~medseg.inference.PredictionPlan` of a model logged by ``medseg train``.

    Reads ``plan.json`` from the run that logged the model. Runs logged before plan.json
    held the window and classes get them from the run's ``config.json`` (patch size,
    U-Net depth) and ``fingerprint.json`` (class names).

    Raises
    ------
    ValueError
        When the model has no source run or the run has no usable plan; pass ``--plan``.
    """
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
