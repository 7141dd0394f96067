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

import math
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


def _next_multiple(shape: tuple[int, ...], factor) -> tuple[int, ...]:
    factors = _per_axis(factor, len(shape))
    return tuple(-(-max(s, 1) // f) * f for s, f in zip(shape, factors, strict=True))


def _per_axis(factor, ndim: int) -> tuple[int, ...]:
    """``factor`` (one int, or one per axis) as one int per axis."""
    if isinstance(factor, int):
        return (int(factor),) * ndim
    factor = tuple(int(f) for f in factor)
    if len(factor) != ndim:
        raise ValueError(f"stride {factor} has {len(factor)} axes, the input {ndim}")
    return factor


def total_stride(strides: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Per-axis product of per-stage strides: what every input size must be a multiple of."""
    ndim = len(strides[0])
    return tuple(int(math.prod(s[a] for s in strides)) for a in range(ndim))


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

    Built like ``keras.Model(inputs, outputs, stride=8)`` (or ``stride=(4, 8, 8)``, one per
    axis, for a network that pools some axes less often). Calling it (``predict``,
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
        divisor = kwargs.pop("stride", 1)
        super().__init__(inputs, outputs, name=name, **kwargs)
        self.stride = int(divisor) if isinstance(divisor, int) else tuple(int(d) for d in divisor)

    def call(self, inputs, training=None, mask=None, **kwargs):
        self._check_spatial_size(inputs)
        return super().call(inputs, training=training, mask=mask, **kwargs)

    def _check_spatial_size(self, inputs) -> None:
        x = tf.nest.flatten(inputs)[0]
        factors = _per_axis(self.stride, len(x.shape) - 2)
        if all(f == 1 for f in factors):
            return
        spatial = tuple(x.shape[1:-1])
        if None not in spatial:
            sizes = tuple(int(s) for s in spatial)
            if any(s % f for s, f in zip(sizes, factors, strict=True)):
                raise ValueError(self._message(sizes))
        elif tf.is_tensor(x) and not tf.executing_eagerly():
            # sizes unknown while tracing (Keras relaxes shapes after retracing): check them
            # when the graph runs; raises tf.errors.InvalidArgumentError
            sizes = tf.shape(x)[1:-1]
            tf.debugging.Assert(
                tf.reduce_all(tf.math.floormod(sizes, factors) == 0),
                [f"model {self.name!r}: input spatial size", sizes, self._message(None)],
            )

    def _message(self, sizes: tuple[int, ...] | None) -> str:
        what = "2**(depth-1)" if isinstance(self.stride, int) else "per axis"
        rule = f"must be divisible by the model's stride {self.stride} ({what})"
        if sizes is None:
            return rule
        return (
            f"model {self.name!r}: input spatial size {sizes} {rule}; "
            f"e.g. use {_next_multiple(sizes, self.stride)}"
        )

    def get_config(self):
        stride = self.stride if isinstance(self.stride, int) else list(self.stride)
        return {**super().get_config(), "stride": stride}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        divisor = config.pop("stride", 1)
        model = super().from_config(config, custom_objects=custom_objects)
        model.stride = int(divisor) if isinstance(divisor, int) else tuple(int(d) for d in divisor)
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
    strides: Sequence[Sequence[int]] | None = None,
    kernels: Sequence[Sequence[int]] | None = None,
    widths: Sequence[int] | None = None,
    blocks_per_stage: Sequence[int] | None = None,
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
    strides, kernels : sequence of sequence of int, optional
        A plan's topology (:class:`medseg.planning.Topology`): per stage, the per-axis
        down-sampling on entry (stage 0's all ones) and the per-axis kernel. They replace
        ``depth`` (= the number of stages) and the isotropic 2 / 3 of every stage.
    widths : sequence of int, optional
        Filters per stage; default ``filters`` doubling per stage, capped at 320.
    blocks_per_stage : sequence of int, optional
        Encoder blocks per stage (the first one down-samples), e.g. ResEnc's
        ``(1, 3, 4, 6, 6, 6)``; default one.

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
    if strides is None:
        factor = stride(depth)  # validates depth
        strides = [(1,) * ndim] + [(2,) * ndim] * (depth - 1)
    else:
        strides = [tuple(int(v) for v in s) for s in strides]
        depth = len(strides)
        if any(len(s) != ndim for s in strides) or any(v < 1 for s in strides for v in s):
            raise ValueError(f"strides {strides}: one positive int per axis ({ndim}) per stage")
        factor = total_stride(strides)
        if all(f == factor[0] for f in factor) and all(
            v in (1, 2) and len(set(s)) == 1 for s in strides[1:] for v in s
        ):
            factor = factor[0]  # isotropic: the int stride of the legacy models
    kernels = (
        [(3,) * ndim] * depth if kernels is None else [tuple(int(v) for v in k) for k in kernels]
    )
    if len(kernels) != depth:
        raise ValueError(f"{len(kernels)} kernels for {depth} stages")
    blocks_per_stage = [1] * depth if blocks_per_stage is None else list(blocks_per_stage)
    if len(blocks_per_stage) != depth or min(blocks_per_stage) < 1:
        raise ValueError(f"blocks_per_stage {blocks_per_stage}: one ≥ 1 per stage ({depth})")
    if deep_supervision and depth < 3:
        raise ValueError(
            f"deep_supervision needs depth >= 3 (an extra output per decoder level below "
            f"full resolution), got depth={depth}"
        )
    decoder_block = decoder_block or encoder_block
    if widths is None:
        widths = [min(filters * 2**level, MAX_FILTERS) for level in range(depth)]
    widths = [int(w) for w in widths]
    if len(widths) != depth:
        raise ValueError(f"{len(widths)} widths for {depth} stages")

    def regularize(x, block_name):
        if dropout > 0:
            x = keras.layers.Dropout(dropout, name=f"{block_name}_dropout")(x)
        return x

    inputs = keras.Input(shape=(None,) * ndim + (in_channels,), name="image")
    x = inputs
    skips = []
    for level, width in enumerate(widths):
        down = 1
        if level > 0:
            if downsample == "max_pool":
                x = layers.pool(x, f"enc{level - 1}_pool", size=strides[level])
            else:
                down = strides[level]
        for block in range(blocks_per_stage[level]):
            block_name = f"enc{level}" if blocks_per_stage[level] == 1 else f"enc{level}_{block}"
            x = encoder_block(
                x, width, layers, block_name, strides=down if block == 0 else 1,
                kernel=kernels[level],
            )
        x = regularize(x, f"enc{level}")
        skips.append(x)

    heads = []
    for level in reversed(range(depth - 1)):
        gating = x
        up = strides[level + 1]
        x = layers.up(x, widths[level], f"dec{level}_up", size=up)
        skip = skips[level]
        if skip_path:
            skip = res_path(skip, widths[level], layers, f"dec{level}_respath", depth - 1 - level)
        if attention:
            skip = attention_gate(
                skip, gating, widths[level], layers, f"dec{level}_gate", stride=up
            )
        x = keras.layers.Concatenate(name=f"dec{level}_concat")([skip, x])
        x = regularize(
            decoder_block(x, widths[level], layers, f"dec{level}", kernel=kernels[level]),
            f"dec{level}",
        )
        if deep_supervision and level > 0:
            heads.append(layers.head(x, num_classes, f"ds{level}_"))
    outputs = layers.head(x, num_classes, "")
    if deep_supervision:
        outputs = [outputs, *reversed(heads)]
    return SegmentationModel(inputs, outputs, name=name, stride=factor)
