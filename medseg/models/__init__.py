"""Segmentation models, their loss and their training-time metrics.

Models are looked up by name in :data:`MODELS`; :func:`build_model` builds one. Importing
this package registers the custom loss and metric with Keras's serialization (package
"medseg"), which ``keras.models.load_model`` needs to reload a compiled model.
"""

from __future__ import annotations

from collections.abc import Callable

import keras

from medseg.models.losses import DiceCrossEntropyLoss, soft_dice
from medseg.models.metrics import ClassDice, class_dice_metrics
from medseg.models.unet import build_unet, check_input_shape, stride

MODELS: dict[str, Callable[..., keras.Model]] = {"unet": build_unet}


def build_model(name: str, /, **kwargs) -> keras.Model:
    """Build the model registered as ``name`` with the builder's keyword arguments.

    ``name`` is positional-only so that ``name=...`` reaches the builder as the name of the
    Keras model, e.g. ``build_model("unet", num_classes=3, name="kidney_unet")``.

    Raises
    ------
    ValueError
        When no model is registered under ``name``.
    """
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}: known models are {', '.join(sorted(MODELS))}"
        ) from None
    return builder(**kwargs)


__all__ = [
    "MODELS",
    "ClassDice",
    "DiceCrossEntropyLoss",
    "build_model",
    "build_unet",
    "check_input_shape",
    "class_dice_metrics",
    "soft_dice",
    "stride",
]
