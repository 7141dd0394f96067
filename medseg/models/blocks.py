"""Building blocks of the U-Net family, for 2D and 3D from one definition.

Every block is a plain function ``block(x, width, layers, name, strides=1) -> tensor`` over
Keras functional tensors; :class:`LayerFactory` picks the Conv2D/Conv3D family and the
normalization and activation once, so the blocks never branch on the dimensionality.
Only built-in Keras layers are used, so a model's inference graph reloads wherever
Keras does, without medseg installed.
"""

from __future__ import annotations

import keras

NORMALIZATIONS = ("batch", "instance", "none")
ACTIVATIONS = ("relu", "leaky_relu", "elu", "gelu", "silu")
LEAKY_SLOPE = 0.01  # nnU-Net's LeakyReLU negative slope

_FAMILIES = {
    2: {
        "conv": keras.layers.Conv2D,
        "pool": keras.layers.MaxPooling2D,
        "up": keras.layers.Conv2DTranspose,
        "upsample": keras.layers.UpSampling2D,
    },
    3: {
        "conv": keras.layers.Conv3D,
        "pool": keras.layers.MaxPooling3D,
        "up": keras.layers.Conv3DTranspose,
        "upsample": keras.layers.UpSampling3D,
    },
}


class LayerFactory:
    """Makes the layers of one network: dimensionality, normalization and activation.

    Parameters
    ----------
    ndim : {2, 3}
        Spatial dimensionality.
    normalization : {"batch", "instance", "none"}
        "instance" is GroupNormalization with one group per channel (per-sample,
        per-channel statistics over the spatial extent).
    activation : {"relu", "leaky_relu", "elu", "gelu", "silu"}
        Non-linearity after normalization; "leaky_relu" has nnU-Net's slope 0.01.
    """

    def __init__(self, ndim: int, normalization: str, activation: str):
        if ndim not in _FAMILIES:
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization={normalization!r}: use one of {', '.join(NORMALIZATIONS)}"
            )
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r}: use one of {', '.join(ACTIVATIONS)}")
        self.ndim = ndim
        self.normalization = normalization
        self.activation = activation
        self._family = _FAMILIES[ndim]

    def conv(self, x, filters: int, name: str, kernel: int = 3, strides: int = 1, bias=None):
        """Convolution with "same" padding; no bias when a normalization follows."""
        return self._family["conv"](
            filters,
            kernel,
            strides=strides,
            padding="same",
            # a bias before a normalization layer is cancelled by its centering
            use_bias=self.normalization == "none" if bias is None else bias,
            kernel_initializer="he_normal",
            name=name,
        )(x)

    def norm(self, x, name: str):
        if self.normalization == "none":
            return x
        if self.normalization == "batch":
            return keras.layers.BatchNormalization(epsilon=1e-5, name=name)(x)
        channels = int(x.shape[-1])
        return keras.layers.GroupNormalization(groups=channels, epsilon=1e-5, name=name)(x)

    def act(self, x, name: str):
        if self.activation == "relu":
            return keras.layers.ReLU(name=name)(x)
        if self.activation == "leaky_relu":
            return keras.layers.LeakyReLU(negative_slope=LEAKY_SLOPE, name=name)(x)
        return keras.layers.Activation(self.activation, name=name)(x)

    def conv_norm_act(self, x, filters: int, name: str, index, kernel: int = 3, strides: int = 1):
        """``conv → norm → act``, layers named ``{name}_conv{index}`` etc."""
        x = self.conv(x, filters, f"{name}_conv{index}", kernel=kernel, strides=strides)
        x = self.norm(x, f"{name}_norm{index}")
        return self.act(x, f"{name}_act{index}")

    def pool(self, x, name: str, size=2):
        """Max-pooling by ``size`` (one int, or one per axis: 1 leaves an axis alone)."""
        return self._family["pool"](size, name=name)(x)

    def up(self, x, filters: int, name: str, size=2):
        """Transposed convolution with kernel = stride = ``size``: learned up-sampling."""
        return self._family["up"](
            filters, size, strides=size, kernel_initializer="he_normal", name=name
        )(x)

    def upsample(self, x, name: str, size=2):
        """Nearest-neighbour up-sampling by ``size`` (no weights)."""
        return self._family["upsample"](size, name=name)(x)

    def head(self, x, num_classes: int, name: str):
        """1×1 convolution to class logits and softmax, both float32.

        Under mixed precision float16 logits/softmax would lose small probabilities and the
        loss's log would saturate.
        """
        logits = self._family["conv"](num_classes, 1, dtype="float32", name=f"{name}logits")(x)
        return keras.layers.Softmax(axis=-1, dtype="float32", name=f"{name}probabilities")(logits)


# -- blocks: (x, width, layers, name, strides) -> x -----------------------------------


def conv_block(x, width: int, layers: LayerFactory, name: str, strides=1, kernel=3):
    """Two ``conv → norm → act``; the first one may down-sample by its stride.

    Ronneberger et al. 2015 (U-Net); strided first convolution as in nnU-Net.
    ``strides`` and ``kernel`` are one int or one per axis (nnU-Net's anisotropic stages).
    """
    x = layers.conv_norm_act(x, width, name, 1, kernel=kernel, strides=strides)
    return layers.conv_norm_act(x, width, name, 2, kernel=kernel)


def single_conv_block(x, width: int, layers: LayerFactory, name: str, strides=1, kernel=3):
    """One ``conv → norm → act``: the decoder stage of nnU-Net's residual-encoder U-Net."""
    return layers.conv_norm_act(x, width, name, 1, kernel=kernel, strides=strides)


def _strided(strides) -> bool:
    return any(s != 1 for s in ((strides,) if isinstance(strides, int) else strides))


def residual_block(x, width: int, layers: LayerFactory, name: str, strides=1, kernel=3):
    """``act(conv-norm-act-conv-norm(x) + shortcut(x))``.

    The shortcut is the identity, or a 1×1 convolution + norm when the width or the
    resolution changes (He et al. 2016; Zhang et al. 2018, residual U-Net).
    """
    h = layers.conv_norm_act(x, width, name, 1, kernel=kernel, strides=strides)
    h = layers.conv(h, width, f"{name}_conv2", kernel=kernel)
    h = layers.norm(h, f"{name}_norm2")
    shortcut = x
    if int(x.shape[-1]) != width or _strided(strides):
        shortcut = layers.conv(x, width, f"{name}_shortcut", kernel=1, strides=strides)
        shortcut = layers.norm(shortcut, f"{name}_shortcut_norm")
    x = keras.layers.Add(name=f"{name}_add")([h, shortcut])
    return layers.act(x, f"{name}_act2")


def dense_block(
    x, width: int, layers: LayerFactory, name: str, strides=1, kernel=3, size: int = 2
):
    """Densely connected convolutions, then a 1×1 transition back to ``width``.

    Every convolution sees the concatenation of the block's input and all earlier
    convolutions' outputs (Huang et al. 2017, DenseNet; Kolařík et al. 2019, Dense-U-Net);
    the transition (DenseNet-BC) keeps the width of the skip connections bounded.
    """
    if _strided(strides):
        raise ValueError("dense_block does not down-sample; use max-pooling before it")
    features = [x]
    for i in range(1, size + 1):
        inputs = features[0]
        if len(features) > 1:
            inputs = keras.layers.Concatenate(name=f"{name}_dense{i}")(features)
        features.append(layers.conv_norm_act(inputs, width, name, i, kernel=kernel))
    x = keras.layers.Concatenate(name=f"{name}_dense{size + 1}")(features)
    return layers.conv_norm_act(x, width, name, "_transition", kernel=1)


def compact_block(x, width: int, layers: LayerFactory, name: str, strides=1, kernel=3):
    """Two ``conv → norm → act`` whose output is concatenated to the block's input.

    The "compact" U-Net of MIScnn, after Kolařík et al. 2019: features of every block
    reach all later blocks of the same path, so the width grows along the network.
    """
    if _strided(strides):
        raise ValueError("compact_block does not down-sample; use max-pooling before it")
    h = conv_block(x, width, layers, name, kernel=kernel)
    return keras.layers.Concatenate(name=f"{name}_concat_input")([x, h])


MULTIRES_ALPHA = 1.67  # Ibtehaz & Rahman 2020: W = alpha * U


def multires_block(x, width: int, layers: LayerFactory, name: str, strides=1, kernel=3):
    """MultiRes block: three chained 3×3 convolutions (receptive fields 3, 5, 7),
    concatenated, plus a 1×1 shortcut (Ibtehaz & Rahman 2020, MultiResUNet).

    Widths are W/6, W/3 and W/2 of ``W = 1.67 * width``, as in the paper.
    """
    if _strided(strides):
        raise ValueError("multires_block does not down-sample; use max-pooling before it")
    total = MULTIRES_ALPHA * width
    sizes = [max(int(total * share), 1) for share in (1 / 6, 1 / 3, 1 / 2)]
    shortcut = layers.conv(x, sum(sizes), f"{name}_shortcut", kernel=1)
    shortcut = layers.norm(shortcut, f"{name}_shortcut_norm")
    branches = []
    h = x
    for i, size in enumerate(sizes, start=1):
        h = layers.conv_norm_act(h, size, name, i, kernel=kernel)
        branches.append(h)
    h = keras.layers.Concatenate(name=f"{name}_branches")(branches)
    h = layers.norm(h, f"{name}_branches_norm")
    h = keras.layers.Add(name=f"{name}_add")([h, shortcut])
    h = layers.act(h, f"{name}_act")
    return layers.norm(h, f"{name}_out_norm")


def res_path(x, width: int, layers: LayerFactory, name: str, length: int):
    """MultiResUNet's "Res path": ``length`` residual 3×3 convolutions on a skip
    connection, to bridge the semantic gap between encoder and decoder features."""
    for i in range(1, length + 1):
        shortcut = layers.conv(x, width, f"{name}{i}_shortcut", kernel=1)
        shortcut = layers.norm(shortcut, f"{name}{i}_shortcut_norm")
        h = layers.conv(x, width, f"{name}{i}_conv")
        h = layers.norm(h, f"{name}{i}_norm")
        h = keras.layers.Add(name=f"{name}{i}_add")([h, shortcut])
        h = layers.act(h, f"{name}{i}_act")
        x = layers.norm(h, f"{name}{i}_out_norm")
    return x


def attention_gate(skip, gating, width: int, layers: LayerFactory, name: str, stride=2):
    """Additive attention gate: weight the skip features by a [0, 1] map computed from
    them and the coarser decoder features (Oktay et al. 2018, Attention U-Net).

    ``theta(skip)`` (2×2 stride-2 convolution, down to the gating resolution) and
    ``phi(gating)`` (1×1) are added, ReLU'd, projected to one channel by ``psi`` and
    squashed by a sigmoid; the map is up-sampled (nearest) back to the skip's resolution,
    multiplies the skip features, and a 1×1 convolution + norm mixes the result.
    """
    inter = max(width // 2, 1)
    theta = layers.conv(skip, inter, f"{name}_theta", kernel=stride, strides=stride, bias=False)
    phi = layers.conv(gating, inter, f"{name}_phi", kernel=1, bias=True)
    f = keras.layers.Add(name=f"{name}_add")([theta, phi])
    f = keras.layers.ReLU(name=f"{name}_relu")(f)
    psi = layers.conv(f, 1, f"{name}_psi", kernel=1, bias=True)
    alpha = keras.layers.Activation("sigmoid", name=f"{name}_sigmoid")(psi)
    alpha = layers.upsample(alpha, f"{name}_upsample", size=stride)
    gated = keras.layers.Multiply(name=f"{name}_multiply")([skip, alpha])
    gated = layers.conv(gated, int(skip.shape[-1]), f"{name}_out", kernel=1)
    return layers.norm(gated, f"{name}_out_norm")
