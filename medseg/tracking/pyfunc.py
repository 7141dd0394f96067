"""The ``python_function`` flavour of the models medseg logs: whole-case segmentation.

:func:`save_model` is the flavour module :func:`medseg.tracking.model.log_model` hands to
``mlflow.models.Model.log``: it saves the Keras flavour as ``mlflow.keras`` does (the
``.keras`` file at ``data/model.keras``) and adds ``medseg/plan.json`` (preprocessing,
window, class names, postprocessing) to the same model folder, with the
``python_function`` flavour pointing here. So a registered or copied model keeps its
preprocessing, and::

    mlflow.pyfunc.load_model("runs:/<run id>/model").predict("case.nii.gz")

segments a case as ``medseg predict`` does, with medseg installed and no dataset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from medseg.inference.plan import PredictionPlan

_KERAS_FILE = "model.keras"  # where mlflow.keras writes the model in its data folder

__all__ = ["MedsegSegmenter", "save_model"]

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

#: Folder of the model folder holding medseg's files.
FOLDER = "medseg"
PLAN = "plan.json"


def save_model(path, mlflow_model, keras_model, plan: PredictionPlan, **keras_options) -> None:
    """Save ``keras_model`` with ``mlflow.keras.save_model`` and ``plan`` beside it, and
    make the ``python_function`` flavour this module's (``Model.log``'s flavour hook)."""
    import mlflow
    from mlflow.models.model import MLMODEL_FILE_NAME

    mlflow.keras.save_model(keras_model, path, mlflow_model=mlflow_model, **keras_options)
    folder = Path(path, FOLDER)
    folder.mkdir()
    (folder / PLAN).write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    conf = mlflow_model.flavors["python_function"]
    mlflow.pyfunc.add_to_model(
        mlflow_model,
        loader_module=__name__,
        conda_env=conf.get("env", {}).get("conda"),
        python_env=conf.get("env", {}).get("virtualenv"),
    )
    mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))


def _load_pyfunc(path: str) -> MedsegSegmenter:
    """MLflow's loader hook: ``path`` is the downloaded model folder."""
    return MedsegSegmenter.from_folder(path)


class MedsegSegmenter:
    """What ``mlflow.pyfunc.load_model`` returns (wrapped) for a model medseg logged."""

    def __init__(self, segmenter):
        self.segmenter = segmenter

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> MedsegSegmenter:
        """Load an MLflow model folder written by :func:`save_model` (Keras safe mode)."""
        from medseg.inference.bundle import Segmenter
        from medseg.inference.files import load_model_file

        folder = Path(path)
        plan_path = folder / FOLDER / PLAN
        if not plan_path.is_file():
            raise ValueError(
                f"model folder {folder} has no {FOLDER}/{PLAN}: not logged by medseg's "
                "log_model with a plan"
            )
        plan = PredictionPlan.from_file(plan_path)
        keras_path = folder.joinpath(*keras_file(str(folder), folder))
        return cls(Segmenter(load_model_file(keras_path), plan))

    def predict(self, model_input: Any, params: dict[str, Any] | None = None):
        """Segment cases on their source grid.

        Parameters
        ----------
        model_input : str, path, list of them, pandas.DataFrame or dict
            NIfTI files (or DICOM series folders): one path, a list, or a DataFrame whose
            ``path`` column (else first column) holds them; or ``{"image": array,
            "spacing": [3 floats]}``.
        params : dict, optional
            Unused (MLflow's signature).

        Returns
        -------
        np.ndarray or list of np.ndarray
            The uint8 label map of one input, or a list (one per path) for a list or
            DataFrame.
        """
        if isinstance(model_input, dict):
            if "image" not in model_input or "spacing" not in model_input:
                raise ValueError(
                    "pyfunc input dict must have 'image' (a (D, H, W[, C]) array) and "
                    f"'spacing' (3 floats); got keys {sorted(model_input)}"
                )
            return self.segmenter.segment(
                np.asarray(model_input["image"]), model_input["spacing"], "input image"
            )
        if isinstance(model_input, str | os.PathLike):
            return self.segmenter.segment_file(model_input)
        if hasattr(model_input, "columns"):  # a pandas DataFrame, as MLflow serves them
            column = "path" if "path" in model_input.columns else model_input.columns[0]
            paths = list(model_input[column])
        elif isinstance(model_input, list | tuple | np.ndarray):
            paths = list(np.asarray(model_input, dtype=object).ravel())
        else:
            raise ValueError(
                "pyfunc input must be a path, a list or DataFrame of paths, or "
                f"{{'image': array, 'spacing': [...]}}; got {type(model_input).__name__}"
            )
        return [self.segmenter.segment_file(str(p)) for p in paths]


def keras_file(uri: str, folder: Path) -> tuple[str, ...]:
    """The ``.keras`` file of a downloaded MLflow model folder, as path parts inside it,
    after checking its ``MLmodel`` describes one (and not an exported SavedModel).

    Raises
    ------
    ValueError
        Naming ``uri`` when ``MLmodel`` is missing or unreadable, has no ``keras`` flavour,
        says ``save_exported_model: true``, or points outside the folder or to no file.
    """
    import yaml

    mlmodel = folder / "MLmodel"
    if not mlmodel.is_file():
        raise ValueError(f"model {uri} has no MLmodel file: not an MLflow model")
    try:
        flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors") or {}
    except (yaml.YAMLError, AttributeError, UnicodeDecodeError) as err:
        raise ValueError(f"model {uri}: its MLmodel file is not valid YAML ({err})") from err
    flavor = flavors.get("keras")
    if not isinstance(flavor, dict):
        raise ValueError(
            f"model {uri}: its MLmodel has no keras flavour (flavours: "
            f"{', '.join(map(str, flavors)) or 'none'}); medseg loads Keras models only"
        )
    if flavor.get("save_exported_model"):
        raise ValueError(
            f"model {uri}: its MLmodel says save_exported_model: true, an exported TensorFlow "
            "SavedModel, which loads by running its graph's code outside Keras' safe mode; "
            "medseg loads .keras models only: log the model again with medseg (or "
            "mlflow.keras.log_model(..., save_exported_model=False))"
        )
    data = str(flavor.get("data", "model"))
    parts = tuple(data.replace("\\", "/").split("/"))
    if data.startswith(("/", "\\")) or ".." in parts or ":" in data:
        raise ValueError(
            f"model {uri}: its MLmodel's keras data path {data!r} points outside the model "
            "folder; refusing to load it"
        )
    parts = tuple(p for p in parts if p not in ("", "."))
    # as mlflow.keras lays it out: <data>/model.keras, or <data>.keras
    candidates = [(*parts, _KERAS_FILE)]
    if parts:
        candidates.append((*parts[:-1], f"{parts[-1]}.keras"))
    for candidate in candidates:
        if folder.joinpath(*candidate).is_file():
            return candidate
    raise ValueError(
        f"model {uri}: no .keras file at {data}/{_KERAS_FILE} in the model folder, as its "
        "MLmodel says; the artifact is incomplete"
    )


def ensemble_model():
    """An ``mlflow.pyfunc.PythonModel`` around a model zip (``medseg export`` of an
    evaluation run): the cross-validation's fold models, averaged, with the plan and the
    pooled postprocessing, registered as one model. Its ``predict`` takes what
    :meth:`MedsegSegmenter.predict` takes."""
    import mlflow

    class EnsembleSegmenter(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            from medseg.inference.bundle import Segmenter

            self._model = MedsegSegmenter(Segmenter.from_bundle(context.artifacts["bundle"]))

        def predict(self, context, model_input, params=None):
            return self._model.predict(model_input, params)

    return EnsembleSegmenter()
