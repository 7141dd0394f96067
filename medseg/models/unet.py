"""A 2D/3D U-Net built as a Keras 3 functional model.

One definition serves both dimensionalities: ``ndim`` picks the Conv2D/Conv3D family of
layers. The layout follows nnU-Net's plain U-Net: every resolution level has a block of two
(3×3[×3] convolution → normalization → ReLU); the encoder goes down by 2×2[×2] max-pooling,
the decoder goes up by stride-2 transposed convolutions and concatenates the encoder's
features of the same level (skip connection). Filters double at every level, capped at 320.

Stride
------
A U-Net of ``depth`` resolution levels pools ``depth - 1`` times, so every spatial size of
its input must be divisible by ``2**(depth - 1)`` (the network's total stride), otherwise
the up-sampled features no longer line up with their skip connections. The model accepts
any spatial size (its input shape is ``(None,) * ndim + (in_channels,)``); use
:func:`check_input_shape` to validate a patch size up front with a clear message.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

NORMALIZATIONS = ("batch", "instance", "none")
MAX_FILTERS = 320  # nnU-Net's cap: deeper levels stop widening to bound memory

_LAYERS = {
    2: {
        "conv": keras.layers.Conv2D,
        "pool": keras.layers.MaxPooling2D,
        "up": keras.layers.Conv2DTranspose,
    },
    3: {
        "conv": keras.layers.Conv3D,
        "pool": keras.layers.MaxPooling3D,
        "up": keras.layers.Conv3DTranspose,
    },
}


def stride(depth: int) -> int:
    """Total down-sampling factor of a U-Net with ``depth`` resolution levels."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    return 2 ** (depth - 1)


def check_input_shape(shape: Sequence[int], depth: int) -> None:
    """Check that a spatial patch size suits a U-Net of ``depth`` levels.

    Parameters
    ----------
    shape : sequence of int
        Spatial size of the patches, without batch and channel axes, e.g. ``(64, 64, 64)``.
    depth : int
        Number of resolution levels of the U-Net.

    Raises
    ------
    ValueError
        When a size is not a positive multiple of ``2**(depth - 1)``.
    """
    factor = stride(depth)
    shape = tuple(int(s) for s in shape)
    if any(s <= 0 or s % factor for s in shape):
        raise ValueError(
            f"patch size {shape} must be divisible by 2**(depth-1)={factor} "
            f"(depth={depth}); e.g. use {tuple(-(-max(s, 1) // factor) * factor for s in shape)}"
        )


def _normalization(kind: str, channels: int, name: str) -> keras.layers.Layer:
    if kind == "batch":
        return keras.layers.BatchNormalization(epsilon=1e-5, name=name)
    # groups == channels: each channel normalized over its own spatial extent, per sample
    return keras.layers.GroupNormalization(groups=channels, epsilon=1e-5, name=name)


def _conv_block(x, channels: int, ndim: int, normalization: str, dropout: float, name: str):
    conv = _LAYERS[ndim]["conv"]
    for i in (1, 2):
        x = conv(
            channels,
            3,
            padding="same",
            # a bias before a normalization layer is cancelled by its centering
            use_bias=normalization == "none",
            kernel_initializer="he_normal",
            name=f"{name}_conv{i}",
        )(x)
        if normalization != "none":
            x = _normalization(normalization, channels, f"{name}_norm{i}")(x)
        x = keras.layers.ReLU(name=f"{name}_relu{i}")(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name=f"{name}_dropout")(x)
    return x


def build_unet(
    num_classes: int,
    in_channels: int = 1,
    ndim: int = 3,
    depth: int = 3,
    filters: int = 16,
    normalization: str = "batch",
    dropout: float = 0.0,
    name: str = "unet",
) -> keras.Model:
    """Build a U-Net segmentation model.

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
    name : str
        Name of the model.

    Returns
    -------
    keras.Model
        Maps ``(batch, *spatial, in_channels)`` to softmax probabilities
        ``(batch, *spatial, num_classes)`` in float32, whatever the dtype policy.
    """
    if ndim not in _LAYERS:
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r}: use one of {', '.join(NORMALIZATIONS)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background included), got {num_classes}")
    if in_channels < 1 or filters < 1:
        raise ValueError(f"in_channels and filters must be >= 1, got {in_channels}, {filters}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    stride(depth)  # validates depth
    widths = [min(filters * 2**level, MAX_FILTERS) for level in range(depth)]

    inputs = keras.Input(shape=(None,) * ndim + (in_channels,), name="image")
    x = inputs
    skips = []
    for level, width in enumerate(widths):
        x = _conv_block(x, width, ndim, normalization, dropout, f"enc{level}")
        if level < depth - 1:
            skips.append(x)
            x = _LAYERS[ndim]["pool"](2, name=f"enc{level}_pool")(x)
    for level in reversed(range(depth - 1)):
        x = _LAYERS[ndim]["up"](
            widths[level], 2, strides=2, kernel_initializer="he_normal", name=f"dec{level}_up"
        )(x)
        x = keras.layers.Concatenate(name=f"dec{level}_concat")([skips[level], x])
        x = _conv_block(x, widths[level], ndim, normalization, dropout, f"dec{level}")
    # float32 head: under mixed precision, float16 logits/softmax would lose small
    # probabilities and the loss's log would saturate
    logits = _LAYERS[ndim]["conv"](num_classes, 1, dtype="float32", name="logits")(x)
    outputs = keras.layers.Softmax(axis=-1, dtype="float32", name="probabilities")(logits)
    return keras.Model(inputs, outputs, name=name)
