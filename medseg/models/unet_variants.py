"""The U-Net family beyond the standard U-Net: plain (nnU-Net), residual, dense,
MultiRes, attention, attention-residual and compact.

Every builder takes the arguments of :func:`medseg.models.unet.build_unet` (num_classes,
in_channels, ndim, depth, filters, normalization, dropout, activation, deep_supervision,
name) and returns a :class:`medseg.models.network.SegmentationModel` with the same
input/output contract: float32 softmax outputs, any spatial size divisible by
``2**(depth - 1)``, 2D or 3D from the same definition.
"""

from __future__ import annotations

import keras

from medseg.models.blocks import (
    compact_block,
    conv_block,
    dense_block,
    multires_block,
    residual_block,
    single_conv_block,
)
from medseg.models.network import assemble_unet


def _builder(
    doc: str, default_name: str, default_normalization: str, default_activation: str, **parts
):
    """A builder with build_unet's signature that assembles a U-Net from ``parts``."""

    def build(
        num_classes: int,
        in_channels: int = 1,
        ndim: int = 3,
        depth: int = 3,
        filters: int = 16,
        normalization: str = default_normalization,
        dropout: float = 0.0,
        activation: str = default_activation,
        deep_supervision: bool = False,
        name: str = default_name,
        strides=None,
        kernels=None,
        widths=None,
        blocks_per_stage=None,
    ) -> keras.Model:
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
            strides=strides,
            kernels=kernels,
            widths=widths,
            blocks_per_stage=blocks_per_stage or _default_blocks(parts, strides, depth),
            **{k: v for k, v in parts.items() if k != "default_blocks"},
        )

    build.__name__ = build.__qualname__ = f"build_{default_name}"
    build.__doc__ = doc + _PARAMETERS
    return build


def _default_blocks(parts, strides, depth):
    """Encoder blocks per stage of an architecture that has its own (ResEnc), else None."""
    per_stage = parts.get("default_blocks")
    if per_stage is None:
        return None
    stages = len(strides) if strides is not None else depth
    return [per_stage[min(s, len(per_stage) - 1)] for s in range(stages)]


_PARAMETERS = """
    Parameters
    ----------
    num_classes, in_channels, ndim, depth, filters, normalization, dropout, activation, \
deep_supervision, name
        As in :func:`medseg.models.unet.build_unet` (defaults differ where noted).
    strides, kernels, widths, blocks_per_stage : optional
        A plan's per-stage, per-axis topology, filters and encoder blocks
        (:func:`medseg.models.network.assemble_unet`); ``strides`` replaces ``depth``.

    Returns
    -------
    SegmentationModel
        Softmax probabilities ``(batch, *spatial, num_classes)`` in float32 (a list of
        outputs at decreasing resolution with ``deep_supervision``).
    """


build_plain_unet = _builder(
    """Build a plain U-Net as nnU-Net configures it.

    Isensee et al. 2021, "nnU-Net: a self-configuring method for deep learning-based
    biomedical image segmentation" (Nature Methods 18). Blocks of two conv → instance
    norm → LeakyReLU(0.01) (the defaults here); the encoder down-samples by a stride of 2
    on the first convolution of each level instead of max-pooling.
    """,
    "plain_unet",
    "instance",
    "leaky_relu",
    encoder_block=conv_block,
    downsample="strided_conv",
)

build_residual_unet = _builder(
    """Build a residual U-Net: every block is a residual unit of two convolutions.

    Zhang, Liu & Wang 2018, "Road extraction by deep residual U-Net" (IEEE GRSL 15);
    residual units after He et al. 2016, "Deep residual learning for image recognition".
    """,
    "residual_unet",
    "batch",
    "relu",
    encoder_block=residual_block,
)

build_dense_unet = _builder(
    """Build a dense U-Net: every block is a densely connected block of two convolutions
    with a 1×1 transition.

    Kolařík et al. 2019, "Optimized high resolution 3D Dense-U-Net network for brain and
    spine segmentation" (Applied Sciences 9(3)); dense blocks after Huang et al. 2017,
    "Densely connected convolutional networks" (CVPR).
    """,
    "dense_unet",
    "batch",
    "relu",
    encoder_block=dense_block,
)

build_multires_unet = _builder(
    """Build a MultiResUNet: MultiRes blocks, and res paths on the skip connections.

    Ibtehaz & Rahman 2020, "MultiResUNet: Rethinking the U-Net architecture for
    multimodal biomedical image segmentation" (Neural Networks 121).
    """,
    "multires_unet",
    "batch",
    "relu",
    encoder_block=multires_block,
    skip_path=True,
)

build_attention_unet = _builder(
    """Build an attention U-Net: standard blocks, skip connections gated by additive
    attention gates driven by the coarser decoder features.

    Oktay et al. 2018, "Attention U-Net: Learning where to look for the pancreas" (MIDL).
    """,
    "attention_unet",
    "batch",
    "relu",
    encoder_block=conv_block,
    attention=True,
)

build_attention_residual_unet = _builder(
    """Build an attention residual U-Net: residual blocks and attention-gated skips.

    Maji et al. 2022, "Attention Res-UNet with guided decoder for semantic segmentation of
    brain tumors" (Biomedical Signal Processing and Control 71); gates after Oktay et al.
    2018, residual units after Zhang et al. 2018.
    """,
    "attention_residual_unet",
    "batch",
    "relu",
    encoder_block=residual_block,
    attention=True,
)

build_compact_unet = _builder(
    """Build a compact U-Net: standard blocks whose output is concatenated to their input,
    so every level passes its input's features on (MIScnn's "compact" variant).

    Kolařík et al. 2019, "Optimized high resolution 3D Dense-U-Net network for brain and
    spine segmentation" (Applied Sciences 9(3)), as implemented in MIScnn (Müller & Kramer
    2021, BMC Medical Imaging 21).
    """,
    "compact_unet",
    "batch",
    "relu",
    encoder_block=compact_block,
)

# nnU-Net Revisited (Isensee et al., MICCAI 2024): residual blocks per encoder stage of the
# ResEnc presets (M and L share them; L plans a larger patch for its 24 GB budget)
RESENC_BLOCKS = (1, 3, 4, 6, 6, 6)

build_resenc_unet = _builder(
    """Build nnU-Net's residual-encoder U-Net (ResEnc M/L).

    Isensee et al. 2024, "nnU-Net Revisited: A call for rigorous validation in 3D medical
    image segmentation" (MICCAI). Residual encoder blocks per stage (1, 3, 4, 6, 6, 6, …;
    the first of a stage down-samples by its stride), one conv → instance norm →
    LeakyReLU per decoder stage, transposed-convolution up-sampling.
    """,
    "resenc_unet",
    "instance",
    "leaky_relu",
    encoder_block=residual_block,
    decoder_block=single_conv_block,
    downsample="strided_conv",
    default_blocks=RESENC_BLOCKS,
)
