"""The standard 2D/3D U-Net, built as a Keras 3 functional model.

One definition serves both dimensionalities: ``ndim`` picks the Conv2D/Conv3D family of
layers. Every resolution level has a block of two (3×3[×3] convolution → normalization →
activation); the encoder goes down by 2×2[×2] max-pooling, the decoder goes up by stride-2
transposed convolutions and concatenates the encoder's features of the same level (skip
connection). Filters double at every level, capped at 320. The other members of the family
are in :mod:`medseg.models.unet_variants`; all are assembled by
:func:`medseg.models.network.assemble_unet`.

Stride
------
A U-Net of ``depth`` resolution levels pools ``depth - 1`` times, so every spatial size of
its input must be divisible by ``2**(depth - 1)`` (the network's total stride), otherwise
the up-sampled features no longer line up with their skip connections. The model accepts
any such spatial size (its input shape is ``(None,) * ndim + (in_channels,)``) and rejects
others when called; use :func:`check_input_shape` to validate a patch size up front.
"""

from __future__ import annotations

import keras

from medseg.models.blocks import ACTIVATIONS, NORMALIZATIONS, conv_block
from medseg.models.network import MAX_FILTERS, assemble_unet, check_input_shape, stride

__all__ = [
    "ACTIVATIONS",
    "MAX_FILTERS",
    "NORMALIZATIONS",
    "build_unet",
    "check_input_shape",
    "stride",
]


def build_unet(
    num_classes: int,
    in_channels: int = 1,
    ndim: int = 3,
    depth: int = 3,
    filters: int = 16,
    normalization: str = "batch",
    dropout: float = 0.0,
    activation: str = "relu",
    deep_supervision: bool = False,
    name: str = "unet",
    strides=None,
    kernels=None,
    widths=None,
    blocks_per_stage=None,
) -> keras.Model:
    """Build a standard U-Net segmentation model.

    Ronneberger, Fischer & Brox 2015, "U-Net: Convolutional networks for biomedical image
    segmentation" (MICCAI); 3D: Çiçek et al. 2016, "3D U-Net" (MICCAI).

    Parameters
    ----------
    num_classes : int
        Number of output classes, background included (>= 2).
    in_channels : int
        Number of input channels (modalities).
    ndim : {2, 3}
        Spatial dimensionality.
    depth : int
        Number of resolution levels; the input's spatial sizes must be divisible by
        ``2**(depth - 1)`` (see :func:`check_input_shape`).
    filters : int
        Filters of the first level; doubled at every level down, capped at 320.
    normalization : {"batch", "instance", "none"}
        Normalization after every convolution; "instance" is GroupNormalization with one
        group per channel.
    dropout : float
        Dropout rate after every block, in [0, 1); 0 disables it.
    activation : {"relu", "leaky_relu", "elu", "gelu", "silu"}
        Non-linearity after every normalization.
    deep_supervision : bool
        Add a softmax output at every decoder level below full resolution (needs
        ``depth >= 3``); outputs are ordered full resolution first.
    name : str
        Name of the model.
    strides, kernels, widths, blocks_per_stage : optional
        A plan's per-stage, per-axis topology, filters and encoder blocks
        (:func:`medseg.models.network.assemble_unet`); ``strides`` replaces ``depth``.

    Returns
    -------
    SegmentationModel
        Maps ``(batch, *spatial, in_channels)`` to softmax probabilities
        ``(batch, *spatial, num_classes)`` in float32, whatever the dtype policy (a list
        of such outputs at decreasing resolution with ``deep_supervision``).
    """
    return assemble_unet(
        num_classes=num_classes,
        in_channels=in_channels,
        ndim=ndim,
        depth=depth,
        filters=filters,
        normalization=normalization,
        activation=activation,
        dropout=dropout,
        deep_supervision=deep_supervision,
        name=name,
        encoder_block=conv_block,
        strides=strides,
        kernels=kernels,
        widths=widths,
        blocks_per_stage=blocks_per_stage,
    )
