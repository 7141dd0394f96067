"""The encoder-decoder skeleton every U-Net variant is assembled from.

:func:`assemble_unet` wires encoder blocks, down-sampling, skip connections (optionally
through a res path or an attention gate), up-sampling, decoder blocks and softmax heads;
each variant in :mod:`medseg.models.unet` and :mod:`medseg.models.unet_variants` only
chooses its blocks. The result is a :class:`SegmentationModel`: a functional Keras model
that knows its stride and rejects, with a clear message, an input whose spatial size the
network cannot split and re-assemble.

Stride
------
A U-Net of ``depth`` resolution levels down-samples ``depth - 1`` times by 2, so every
spatial size of its input must be divisible by ``2**(depth - 1)`` (the network's total
stride), otherwise the up-sampled features no longer line up with their skip connections.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import tensorflow as tf

from medseg.models.blocks import LayerFactory, attention_gate, res_path

MAX_FILTERS = 320  # nnU-Net's cap: deeper levels stop widening to bound memory


def stride(depth: int) -> int:
    """Total down-sampling factor of a U-Net with ``depth`` resolution levels."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    return 2 ** (depth - 1)


def _next_multiple(shape: tuple[int, ...], factor: int) -> tuple[int, ...]:
    return tuple(-(-max(s, 1) // factor) * factor for s in shape)


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
            f"(depth={depth}); e.g. use {_next_multiple(shape, factor)}"
        )


@keras.saving.register_keras_serializable(package="medseg")
class SegmentationModel(keras.Model):
    """A functional segmentation model that checks its input's spatial size.

    Built like ``keras.Model(inputs, outputs, stride=8)``. Calling it (``predict``,
    ``fit``, ``model(x)``) on a batch whose spatial sizes are not multiples of ``stride``
    raises a ``ValueError`` naming the size and the next valid one, instead of a shape
    mismatch deep inside the network; sizes unknown while tracing (relaxed shapes) are
    checked when the graph runs (``tf.errors.InvalidArgumentError``, same message; a no-op
    under XLA). ``keras.Model(model.inputs, model.outputs)`` gives the same graph as a plain
    functional model, which loads without medseg (what MLflow logs).
    """

    # the same positional arguments as keras' Functional, so that Keras serializes and
    # revives this class as a functional model (its layer graph), plus ``stride``
    def __init__(self, inputs, outputs, name=None, **kwargs):
        divisor = int(kwargs.pop("stride", 1))
        super().__init__(inputs, outputs, name=name, **kwargs)
        self.stride = divisor

    def call(self, inputs, training=None, mask=None, **kwargs):
        self._check_spatial_size(inputs)
        return super().call(inputs, training=training, mask=mask, **kwargs)

    def _check_spatial_size(self, inputs) -> None:
        if self.stride == 1:
            return
        x = tf.nest.flatten(inputs)[0]
        spatial = tuple(x.shape[1:-1])
        if None not in spatial:
            sizes = tuple(int(s) for s in spatial)
            if any(s % self.stride for s in sizes):
                raise ValueError(self._message(sizes))
        elif tf.is_tensor(x) and not tf.executing_eagerly():
            # sizes unknown while tracing (Keras relaxes shapes after retracing): check them
            # when the graph runs; raises tf.errors.InvalidArgumentError
            sizes = tf.shape(x)[1:-1]
            tf.debugging.Assert(
                tf.reduce_all(tf.math.floormod(sizes, self.stride) == 0),
                [f"model {self.name!r}: input spatial size", sizes, self._message(None)],
            )

    def _message(self, sizes: tuple[int, ...] | None) -> str:
        rule = f"must be divisible by the model's stride {self.stride} (2**(depth-1))"
        if sizes is None:
            return rule
        return (
            f"model {self.name!r}: input spatial size {sizes} {rule}; "
            f"e.g. use {_next_multiple(sizes, self.stride)}"
        )

    def get_config(self):
        return {**super().get_config(), "stride": self.stride}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        divisor = config.pop("stride", 1)
        model = super().from_config(config, custom_objects=custom_objects)
        model.stride = int(divisor)
        return model


Block = Callable[..., object]


def assemble_unet(
    *,
    num_classes: int,
    in_channels: int,
    ndim: int,
    depth: int,
    filters: int,
    normalization: str,
    activation: str,
    dropout: float,
    deep_supervision: bool,
    name: str,
    encoder_block: Block,
    decoder_block: Block | None = None,
    downsample: str = "max_pool",
    skip_path: bool = False,
    attention: bool = False,
) -> SegmentationModel:
    """Assemble a U-Net from its blocks.

    Parameters
    ----------
    num_classes, in_channels, ndim, depth, filters, normalization, activation, dropout, \
deep_supervision, name
        As in :func:`medseg.models.unet.build_unet`.
    encoder_block, decoder_block : callable
        ``block(x, width, layers, name, strides=1)``; the decoder uses the encoder's block
        when ``decoder_block`` is None.
    downsample : {"max_pool", "strided_conv"}
        2× max-pooling before every encoder block below the first, or a stride of 2 on
        that block's first convolution (nnU-Net).
    skip_path : bool
        Route skip connections through MultiResUNet's res paths (longest at level 0).
    attention : bool
        Gate skip connections by attention gates driven by the coarser decoder features.

    Returns
    -------
    SegmentationModel
        One softmax output ``(batch, *spatial, num_classes)`` named "probabilities"; with
        ``deep_supervision`` also one per decoder level below full resolution, named
        ``ds{level}_probabilities`` at ``1 / 2**level`` of the input's size, ordered full
        resolution first. All outputs are float32 whatever the dtype policy.
    """
    layers = LayerFactory(ndim, normalization, activation)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background included), got {num_classes}")
    if in_channels < 1 or filters < 1:
        raise ValueError(f"in_channels and filters must be >= 1, got {in_channels}, {filters}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if downsample not in ("max_pool", "strided_conv"):
        raise ValueError(f"downsample={downsample!r}: use 'max_pool' or 'strided_conv'")
    factor = stride(depth)  # validates depth
    if deep_supervision and depth < 3:
        raise ValueError(
            f"deep_supervision needs depth >= 3 (an extra output per decoder level below "
            f"full resolution), got depth={depth}"
        )
    decoder_block = decoder_block or encoder_block
    widths = [min(filters * 2**level, MAX_FILTERS) for level in range(depth)]

    def regularize(x, block_name):
        if dropout > 0:
            x = keras.layers.Dropout(dropout, name=f"{block_name}_dropout")(x)
        return x

    inputs = keras.Input(shape=(None,) * ndim + (in_channels,), name="image")
    x = inputs
    skips = []
    for level, width in enumerate(widths):
        strides = 1
        if level > 0:
            if downsample == "max_pool":
                x = layers.pool(x, f"enc{level - 1}_pool")
            else:
                strides = 2
        x = regularize(
            encoder_block(x, width, layers, f"enc{level}", strides=strides), f"enc{level}"
        )
        skips.append(x)

    heads = []
    for level in reversed(range(depth - 1)):
        gating = x
        x = layers.up(x, widths[level], f"dec{level}_up")
        skip = skips[level]
        if skip_path:
            skip = res_path(skip, widths[level], layers, f"dec{level}_respath", depth - 1 - level)
        if attention:
            skip = attention_gate(skip, gating, widths[level], layers, f"dec{level}_gate")
        x = keras.layers.Concatenate(name=f"dec{level}_concat")([skip, x])
        x = regularize(decoder_block(x, widths[level], layers, f"dec{level}"), f"dec{level}")
        if deep_supervision and level > 0:
            heads.append(layers.head(x, num_classes, f"ds{level}_"))
    outputs = layers.head(x, num_classes, "")
    if deep_supervision:
        outputs = [outputs, *reversed(heads)]
    return SegmentationModel(inputs, outputs, name=name, stride=factor)
