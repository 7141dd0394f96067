"""Segmentation models, their loss and their training-time metrics.

Models are looked up by name in :data:`MODELS`; :func:`build_model` builds one and
:func:`model_from_config` builds the one a :class:`~medseg.config.ModelConfig` describes;
:mod:`medseg.models.deep_supervision` has the weights and targets of deep-supervised
training. Importing this package registers the custom model class, losses and metrics
with Keras's serialization (package "medseg"), which ``keras.models.load_model`` needs to
reload a saved model.
"""

from __future__ import annotations

from collections.abc import Callable

import keras

from medseg.config import ModelConfig
from medseg.models.deep_supervision import (
    deep_supervision_scales,
    deep_supervision_weights,
    downsample_targets,
    full_resolution_model,
)
from medseg.models.losses import (
    LOSSES,
    ClassWiseDiceLoss,
    ComboLoss,
    DiceCrossEntropyLoss,
    FocalLoss,
    FocalTverskyLoss,
    JaccardLoss,
    SoftDiceLoss,
    TverskyLoss,
    loss_from_config,
    soft_dice,
)
from medseg.models.metrics import (
    ClassDice,
    DiceScore,
    IoUScore,
    Sensitivity,
    Specificity,
    class_dice_metrics,
    metric_key,
    metrics_from_config,
)
from medseg.models.network import SegmentationModel
from medseg.models.unet import build_unet, check_input_shape, stride
from medseg.models.unet_variants import (
    build_attention_residual_unet,
    build_attention_unet,
    build_compact_unet,
    build_dense_unet,
    build_multires_unet,
    build_plain_unet,
    build_resenc_unet,
    build_residual_unet,
)

# every builder takes build_unet's keyword arguments (num_classes, in_channels, ndim, depth,
# filters, normalization, dropout, activation, deep_supervision, name)
MODELS: dict[str, Callable[..., keras.Model]] = {
    "unet": build_unet,
    "plain_unet": build_plain_unet,
    "residual_unet": build_residual_unet,
    "dense_unet": build_dense_unet,
    "multires_unet": build_multires_unet,
    "attention_unet": build_attention_unet,
    "attention_residual_unet": build_attention_residual_unet,
    "compact_unet": build_compact_unet,
    "resenc_unet": build_resenc_unet,
}


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


def model_from_config(
    model_config: ModelConfig,
    num_classes: int,
    in_channels: int,
    ndim: int,
    topology=None,
    widths=None,
) -> keras.Model:
    """Build the model ``model_config`` describes, with every one of its fields.

    Parameters
    ----------
    model_config : ModelConfig
        Architecture name and size; ``activation=None`` keeps the architecture's own.
    num_classes : int
        Output classes, background included.
    in_channels : int
        Input channels (modalities, or stacked slices for 2D slabs).
    ndim : {2, 3}
        Spatial dimensionality.
    topology : medseg.planning.Topology, optional
        A plan's per-stage strides and kernels; replaces ``model_config.depth`` (and the
        isotropic 2× pooling and 3-wide kernels).
    widths : sequence of int, optional
        A plan's filters per stage; default ``model_config.filters`` doubling per stage.
    """
    kwargs = {
        "num_classes": num_classes,
        "in_channels": in_channels,
        "ndim": ndim,
        "depth": model_config.depth,
        "filters": model_config.filters,
        "normalization": model_config.normalization,
        "dropout": model_config.dropout,
        "deep_supervision": model_config.deep_supervision,
    }
    if model_config.activation is not None:
        kwargs["activation"] = model_config.activation
    if topology is not None:
        kwargs["strides"] = [list(s) for s in topology.strides]
        kwargs["kernels"] = [list(k) for k in topology.kernels]
    if widths is not None:
        kwargs["widths"] = list(widths)
    return build_model(model_config.name, **kwargs)


__all__ = [
    "model_from_config",
    "full_resolution_model",
    "downsample_targets",
    "deep_supervision_weights",
    "deep_supervision_scales",
    "build_residual_unet",
    "build_resenc_unet",
    "build_plain_unet",
    "build_multires_unet",
    "build_dense_unet",
    "build_compact_unet",
    "build_attention_unet",
    "build_attention_residual_unet",
    "SegmentationModel",
    "MODELS",
    "ClassDice",
    "DiceCrossEntropyLoss",
    "build_model",
    "build_unet",
    "check_input_shape",
    "class_dice_metrics",
    "soft_dice",
    "stride",
    "LOSSES",
    "ClassWiseDiceLoss",
    "ComboLoss",
    "FocalLoss",
    "FocalTverskyLoss",
    "JaccardLoss",
    "SoftDiceLoss",
    "TverskyLoss",
    "loss_from_config",
    "DiceScore",
    "IoUScore",
    "Sensitivity",
    "Specificity",
    "metric_key",
    "metrics_from_config",
]
