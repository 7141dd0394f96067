"""Random augmentation of training patches as stateless TensorFlow graph ops.

:func:`augment` applies, each with its own probability (an independent coin per transform,
``tf.cond`` so a transform that is not drawn costs nothing):

1. rotation, scaling and elastic deformation, combined into ONE resampling pass
   (linear image, nearest label, XLA-compiled; see :mod:`medseg.pipeline.spatial`):
   :class:`RandomSpatial`;
2. 90° rotation in the plane of the last two spatial axes, and mirroring per axis:
   :class:`RandomRot90`, :class:`RandomFlip`;
3. Gaussian noise, Gaussian blur, multiplicative brightness, contrast, low-resolution
   simulation and gamma (also of the inverted image), as in nnU-Net, and a smooth
   multiplicative bias field (MR; off by default): a :class:`RandomIntensity` each.

Each is a small transform object ``(image, label, seed) -> (image, label)`` with fixed
stream ids (:func:`builtin_transforms` lists them in order), the protocol of the user's
own transforms (:mod:`medseg.pipeline.transforms`).

Every random number is drawn with ``tf.random.stateless_*`` from one ``(2,)`` seed, so a
seed gives the same output in every run, in eager mode, in ``tf.function`` and in
``tf.data``. The deterministic building blocks (:func:`rotation_matrix`, :func:`flip`,
:func:`gaussian_blur`, :func:`simulate_low_resolution`, ...) are public and tested against
numpy/scipy.

Images are ``(*spatial, C)`` float32 with 2 or 3 spatial axes, labels ``(*spatial)``.
"""

from __future__ import annotations

import functools
import math

import tensorflow as tf

from medseg.config import AugmentConfig
from medseg.pipeline.spatial import warp_jit

# Fixed stream ids: the draws of one transform do not change when another is toggled.
_ROTATE, _SCALE, _ELASTIC, _ROT90, _FLIP = 1, 2, 3, 4, 5
_NOISE, _BLUR, _BRIGHTNESS, _CONTRAST, _LOWRES, _GAMMA_INV, _GAMMA = 6, 7, 8, 9, 10, 11, 12
_BIAS = 13


def augment(image, label, config: AugmentConfig, seed):
    """Randomly augment one patch and its label map consistently.

    Parameters
    ----------
    image : tf.Tensor
        ``(*spatial, C)`` float32 with 2 or 3 spatial axes. A static shape is best: the
        XLA kernels compile once per shape.
    label : tf.Tensor or None
        ``(*spatial)`` int32 label map (None for image-only augmentation).
    config : AugmentConfig
        Probabilities and ranges; ``enabled=False`` returns the inputs unchanged.
    seed : tf.Tensor
        ``(2,)`` int32/int64 stateless seed.

    Returns
    -------
    image, label : tf.Tensor
        Same shapes and dtypes as the inputs.
    """
    check_augment_config(config)
    image = tf.convert_to_tensor(image, tf.float32)
    if label is not None:
        label = tf.convert_to_tensor(label)
    if not config.enabled:
        return image, label
    ndim = image.shape.rank - 1 if image.shape.rank is not None else -1
    if ndim not in (2, 3):
        raise ValueError(
            f"augment: image must be (*spatial, C) with 2 or 3 spatial axes, got shape "
            f"{image.shape}"
        )
    for transform in builtin_transforms(config):
        image, label = transform(image, label, seed)
    return image, label


def _keys(seed):
    """``key(stream, sub)``: the stateless seed of one transform's draw ``sub``."""
    seed = tf.cast(seed, tf.int64)

    def key(stream, sub=0):
        return tf.random.experimental.stateless_fold_in(
            tf.random.experimental.stateless_fold_in(seed, stream), sub
        )

    return key


class RandomSpatial:
    """Rotation, scaling and elastic deformation (each its own coin and stream) in ONE
    resampling pass: linear image, nearest label."""

    def __init__(self, config: AugmentConfig):
        self.config = config

    def __call__(self, image, label, seed):
        return _spatial(image, label, self.config, _keys(seed))


class RandomRot90:
    """90° rotation in the plane of the last two spatial axes."""

    def __init__(self, config: AugmentConfig):
        self.config = config

    def __call__(self, image, label, seed):
        config, key = self.config, _keys(seed)
        if config.rot90_probability <= 0:
            return image, label
        rotated = _maybe(
            config.rot90_probability,
            key(_ROT90),
            lambda: _drop_none(random_rot90(image, label, key(_ROT90, 1), config.jit)),
            _drop_none((image, label)),
        )
        return rotated if label is not None else (rotated[0], None)


class RandomFlip:
    """Mirroring, a coin per axis of ``augment.flip_axes``."""

    def __init__(self, config: AugmentConfig):
        self.config = config

    def __call__(self, image, label, seed):
        config = self.config
        axes = [a for a in config.flip_axes if a < image.shape.rank - 1]
        if config.flip_probability <= 0 or not axes:
            return image, label
        return random_flip(
            image, label, axes, config.flip_probability, _keys(seed)(_FLIP), config.jit
        )


class RandomIntensity:
    """One of nnU-Net's intensity transforms (``noise``, ``blur``, ``brightness``,
    ``contrast``, ``lowres``, ``gamma_inverted``, ``gamma``) with its own coin and stream;
    the label passes through."""

    def __init__(self, name: str, config: AugmentConfig):
        if name not in _INTENSITY:
            raise ValueError(f"no intensity transform {name!r}: one of {', '.join(_INTENSITY)}")
        self.name, self.config = name, config
        self.stream, self.probability_key, self.fn = _INTENSITY[name]

    def __call__(self, image, label, seed):
        key = _keys(seed)
        probability = getattr(self.config, self.probability_key)
        fn = self.fn
        image = _maybe(probability, key(self.stream),
                       lambda: fn(image, self.config, key), image)
        return image, label


def builtin_transforms(config: AugmentConfig) -> list:
    """The configured augmentation as transform objects, in nnU-Net's order: spatial
    (one resampling), rot90, flip, then the intensity transforms."""
    return [
        RandomSpatial(config),
        RandomRot90(config),
        RandomFlip(config),
        *(RandomIntensity(name, config) for name in _INTENSITY),
    ]


_KERNELS: dict = {}


def _compiled(fn, jit: bool, **static):
    """``fn`` with ``static`` keyword arguments bound, as a cached ``tf.function``.

    ``jit=True`` XLA-compiles it: on CPU the elementwise and gather kernels run 2-4x
    faster. Random numbers are drawn outside, so results do not depend on ``jit``
    beyond float rounding.
    """
    key = (fn, jit, tuple(sorted(static.items())))
    if key not in _KERNELS:
        _KERNELS[key] = tf.function(
            functools.partial(fn, **static), jit_compile=jit, autograph=False
        )
    return _KERNELS[key]


def _drop_none(pair):
    # tf.cond cannot return None: carry only the tensors
    return tuple(x for x in pair if x is not None)


def _draw(key, stream, values, shape=()):
    return _uniform(key(stream, 1), float(values[0]), float(values[1]), shape)


def intensity_value(name: str, config: AugmentConfig, key, channels, ndim: int):
    """The random parameter of intensity transform ``name`` (drawn whether or not its coin
    falls: stateless, so the tf.data and the batched paths share it).

    Returns the noise std, the blur sigma or the low-resolution zoom (scalars); the
    brightness or contrast factor, or the gamma (``(channels,)``); for ``bias_field`` the
    ``(terms,)`` polynomial coefficients, the magnitude and the pedestal.
    """
    if name == "noise":
        return _draw(key, _NOISE, config.noise_std)
    if name == "blur":
        return _draw(key, _BLUR, config.blur_sigma)
    if name == "brightness":
        return _draw(key, _BRIGHTNESS, config.brightness_range, [channels])
    if name == "contrast":
        return _draw(key, _CONTRAST, config.contrast_range, [channels])
    if name == "lowres":
        return _draw(key, _LOWRES, config.lowres_zoom)
    if name == "gamma_inverted":
        return _gamma(key(_GAMMA_INV, 1), config.gamma_range, channels)
    if name == "gamma":
        return _gamma(key(_GAMMA, 1), config.gamma_range, channels)
    terms = len(_monomials(ndim))
    coefficients = tf.random.stateless_uniform([terms], seed=key(_BIAS, 1), minval=-1.0, maxval=1.0)
    low, high = (float(v) for v in config.bias_field_pedestal)
    pedestal = _uniform(key(_BIAS, 3), low, high)
    return coefficients, _draw(key, _BIAS, config.bias_field_magnitude), pedestal


def _value(name, x, config, key):
    return intensity_value(name, config, key, tf.shape(x)[-1], x.shape.rank - 1)


def _noise(x, config, key):
    return add_noise(x, _value("noise", x, config, key), key(_NOISE, 2))


def _blur(x, config, key):
    radius = _radius(config.blur_sigma[1])
    return _compiled(gaussian_blur, config.jit, radius=radius)(
        x, _value("blur", x, config, key)
    )


def _brightness(x, config, key):
    return x * _value("brightness", x, config, key)


def _contrast(x, config, key):
    return adjust_contrast(x, _value("contrast", x, config, key))


def _lowres(x, config, key):
    return _compiled(simulate_low_resolution, config.jit)(x, _value("lowres", x, config, key))


def _gamma_inverted(x, config, key):
    return -adjust_gamma(-x, _value("gamma_inverted", x, config, key), jit=config.jit)


def _gamma_plain(x, config, key):
    return adjust_gamma(x, _value("gamma", x, config, key), jit=config.jit)


def _bias(x, config, key):
    coefficients, magnitude, pedestal = _value("bias_field", x, config, key)
    field = bias_field(tf.shape(x)[:-1], coefficients, magnitude)
    return apply_bias_field(x, field, pedestal)


# name: (stream, probability key, op), in nnU-Net's order, then the bias field
_INTENSITY = {
    "noise": (_NOISE, "noise_probability", _noise),
    "blur": (_BLUR, "blur_probability", _blur),
    "brightness": (_BRIGHTNESS, "brightness_probability", _brightness),
    "contrast": (_CONTRAST, "contrast_probability", _contrast),
    "lowres": (_LOWRES, "lowres_probability", _lowres),
    "gamma_inverted": (_GAMMA_INV, "gamma_invert_probability", _gamma_inverted),
    "gamma": (_GAMMA, "gamma_probability", _gamma_plain),
    "bias_field": (_BIAS, "bias_field_probability", _bias),
}


def check_augment_config(config: AugmentConfig) -> None:
    """Raise ValueError naming the ``augment.*`` key whose value cannot be used."""
    for name, value in vars(config).items():
        if name.endswith("_probability") and not 0.0 <= value <= 1.0:
            raise ValueError(f"augment.{name}={value} must be in [0, 1]")
    for name in ("rotation_degrees", "scale_range", "elastic_magnitude", "noise_std",
                 "blur_sigma", "brightness_range", "contrast_range", "lowres_zoom",
                 "gamma_range", "bias_field_magnitude", "bias_field_pedestal"):  # fmt: skip
        lo, hi = getattr(config, name)
        if lo > hi:
            raise ValueError(f"augment.{name}={[lo, hi]}: low must not exceed high")
    positive = ("scale_range", "blur_sigma", "gamma_range", "lowres_zoom")
    for name in positive:
        if getattr(config, name)[0] <= 0:
            raise ValueError(f"augment.{name}={list(getattr(config, name))} must be positive")
    if config.bias_field_pedestal[0] < 0:
        raise ValueError(
            f"augment.bias_field_pedestal={list(config.bias_field_pedestal)} must not be "
            "negative (a share of the patch's range below its darkest value)"
        )
    if config.lowres_zoom[1] > 1:
        raise ValueError(f"augment.lowres_zoom={list(config.lowres_zoom)} must be ≤ 1")
    if config.elastic_grid_spacing < 1:
        raise ValueError(f"augment.elastic_grid_spacing={config.elastic_grid_spacing} must be ≥ 1")


# -- randomness ----------------------------------------------------------------------------


def _coin(probability: float, seed) -> tf.Tensor:
    return tf.random.stateless_uniform([], seed=seed) < probability


def _maybe(probability: float, seed, apply, identity):
    """``apply()`` with ``probability``, else ``identity``; static 0/1 build no branch."""
    if probability <= 0:
        return identity
    if probability >= 1:
        return apply()
    return tf.cond(_coin(probability, seed), apply, lambda: identity)


def _uniform(seed, low: float, high: float, shape=()) -> tf.Tensor:
    return tf.random.stateless_uniform(shape, seed=seed, minval=low, maxval=high)


def _gamma(seed, gamma_range, channels) -> tf.Tensor:
    """nnU-Net's draw: half the time below 1 (if the range allows), else above."""
    low, high = float(gamma_range[0]), float(gamma_range[1])
    if high <= 1 or low >= 1:
        return _uniform(seed, low, high, [channels])
    seeds = tf.random.experimental.stateless_split(seed, 3)
    below = _uniform(seeds[1], low, 1.0, [channels])
    above = _uniform(seeds[2], 1.0, high, [channels])
    return tf.where(tf.random.stateless_uniform([channels], seed=seeds[0]) < 0.5, below, above)


# -- spatial -------------------------------------------------------------------------------


def rotation_matrix(angles, ndim: int) -> tf.Tensor:
    """Rotation by ``angles`` (radians).

    2D: one angle, ``[[cos, -sin], [sin, cos]]``. 3D: ``R0 @ R1 @ R2`` where ``Ri`` rotates
    by ``angles[i]`` in the plane of the two other axes ``(j, k)``, ``j < k``, with the same
    2D block.
    """
    angles = tf.cast(tf.reshape(angles, [-1]), tf.float32)
    if ndim == 2:
        c, s = tf.cos(angles[0]), tf.sin(angles[0])
        return tf.stack([tf.stack([c, -s]), tf.stack([s, c])])
    matrix = tf.eye(3)
    for axis in range(3):
        j, k = [a for a in range(3) if a != axis]
        c, s = tf.cos(angles[axis]), tf.sin(angles[axis])
        rows = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
        block = {(j, j): c, (j, k): -s, (k, j): s, (k, k): c}
        r = tf.stack(
            [tf.stack([block.get((a, b), rows[a][b]) for b in range(3)]) for a in range(3)]
        )
        matrix = matrix @ tf.cast(r, tf.float32)
    return matrix


def centred_affine(shape, matrix) -> tuple[tf.Tensor, tf.Tensor]:
    """``(matrix, offset)`` mapping output voxels to input voxels about the patch centre.

    ``input = matrix @ (o - centre) + centre``, ``centre = (shape - 1) / 2``: the form of
    ``scipy.ndimage.affine_transform(matrix=matrix, offset=centre - matrix @ centre)``.
    """
    centre = (tf.cast(shape, tf.float32) - 1.0) / 2.0
    matrix = tf.cast(matrix, tf.float32)
    return matrix, centre - tf.linalg.matvec(matrix, centre)


def elastic_grid_shape(shape, spacing: int) -> tf.Tensor:
    """Control points per axis: one every ``spacing`` voxels, corners included, ≥ 2."""
    steps = tf.math.ceil(tf.cast(tf.convert_to_tensor(shape) - 1, tf.float32) / spacing)
    return tf.maximum(tf.cast(steps, tf.int32) + 1, 2)


def spatial_coins(config: AugmentConfig, key) -> list[tf.Tensor]:
    """The rotation, scaling and elastic coins (bool scalars; constant for 0 / 1)."""
    probs = (config.rotation_probability, config.scale_probability, config.elastic_probability)
    return [
        _coin(p, key(stream)) if 0 < p < 1 else tf.constant(p >= 1)
        for p, stream in zip(probs, (_ROTATE, _SCALE, _ELASTIC), strict=True)
    ]


def spatial_transform(config: AugmentConfig, key, shape, ndim: int, coins):
    """``(matrix, offset, displacement)`` of :func:`~medseg.pipeline.spatial.warp` for one
    patch of spatial ``shape``: the identity for each transform whose coin is False.

    ``displacement`` is the coarse ``(*grid, ndim)`` field, None without elastic deformation.
    """
    rotate, scale, elastic = coins
    matrix = tf.eye(ndim)
    if config.rotation_probability > 0:
        if ndim == 2:
            mask = [1.0]
        else:
            mask = [1.0 if a in config.rotation_axes else 0.0 for a in range(3)]
        low, high = (math.radians(d) for d in config.rotation_degrees)
        angles = _uniform(key(_ROTATE, 1), low, high, [len(mask)]) * tf.constant(mask)
        angles = angles * tf.cast(rotate, tf.float32)
        matrix = rotation_matrix(angles, ndim)
    if config.scale_probability > 0:
        n = ndim if config.scale_per_axis else 1
        factors = _uniform(key(_SCALE, 1), *map(float, config.scale_range), [n])
        factors = tf.where(scale, factors, 1.0) * tf.ones([ndim])
        # output→input map: content enlarged by f reads input at 1/f the distance
        matrix = matrix @ tf.linalg.diag(1.0 / factors)
    matrix, offset = centred_affine(shape, matrix)
    displacement = None
    if config.elastic_probability > 0:
        grid = elastic_grid_shape(shape, config.elastic_grid_spacing)
        magnitude = _uniform(key(_ELASTIC, 1), *map(float, config.elastic_magnitude))
        noise = tf.random.stateless_normal(tf.concat([grid, [ndim]], 0), seed=key(_ELASTIC, 2))
        noise = tf.ensure_shape(noise, [None] * ndim + [ndim])
        displacement = noise * magnitude * tf.cast(elastic, tf.float32)
    return matrix, offset, displacement


def _spatial(image, label, config: AugmentConfig, key):
    ndim = image.shape.rank - 1
    shape = tf.shape(image)[:-1]
    probs = (config.rotation_probability, config.scale_probability, config.elastic_probability)
    if max(probs) <= 0:
        return image, label
    coins = spatial_coins(config, key)

    def apply():
        matrix, offset, displacement = spatial_transform(config, key, shape, ndim, coins)
        return warp_jit(image, label, matrix, offset, displacement, jit=config.jit)

    do_any = tf.reduce_any(tf.stack(coins))
    if label is None:
        return tf.cond(do_any, lambda: apply()[0], lambda: image), None
    return tf.cond(do_any, apply, lambda: (image, label))


def _decide(probability: float, seed) -> tf.Tensor:
    """A transform's coin as :func:`_maybe` throws it (constant for 0 / 1)."""
    if probability <= 0 or probability >= 1:
        return tf.constant(probability >= 1)
    return _coin(probability, seed)


def draw_parameters(config: AugmentConfig, seed, shape, channels: int) -> dict:
    """Every random parameter :func:`augment` draws for one patch, from its ``(2,)`` seed.

    The tf.data path (:func:`augment`) and the batched path in the training step
    (:mod:`medseg.pipeline.batched`) both draw with these functions, so a seed gives the
    same transforms in either.

    Parameters
    ----------
    shape : sequence of int
        Static spatial shape of the patch (2 or 3 axes).
    channels : int
        Image channels.

    Returns
    -------
    dict of tf.Tensor
        ``spatial`` (bool: any of rotation / scaling / elastic), ``matrix`` ``(n, n)``,
        ``offset`` ``(n,)``, ``displacement`` ``(*grid, n)`` (only with elastic
        deformation configured); ``rot90`` (int32 quarter turns, 0 = none); ``flip``
        (``(n,)`` bool per spatial axis); per intensity transform ``name`` its coin
        ``name`` and parameter ``name + "_value"`` (see :func:`intensity_value`; the bias
        field as ``bias_field_value``, ``bias_field_magnitude`` and ``bias_field_pedestal``),
        and ``noise_seed``.
    """
    key = _keys(seed)
    shape = [int(s) for s in shape]
    ndim = len(shape)
    out = {}
    coins = spatial_coins(config, key)
    out["spatial"] = tf.reduce_any(tf.stack(coins))
    out["matrix"], out["offset"], displacement = spatial_transform(
        config, key, tf.constant(shape), ndim, coins
    )
    if displacement is not None:
        out["displacement"] = displacement
    # rot90: a non-square plane only turns by 180° (see random_rot90)
    ks = tf.constant([1, 2, 3] if shape[-2] == shape[-1] else [2, 2, 2])
    turn = tf.gather(ks, rot90_index(key(_ROT90, 1)))
    rotate = _decide(config.rot90_probability, key(_ROT90))
    out["rot90"] = tf.where(rotate, turn, 0)
    axes = [a for a in config.flip_axes if a < ndim]
    flips = tf.zeros([ndim], tf.bool)
    if config.flip_probability > 0 and axes:
        drawn = flip_coins(len(axes), config.flip_probability, key(_FLIP))
        flips = tf.scatter_nd([[a] for a in axes], drawn, [ndim])
    out["flip"] = flips
    for name, (stream, probability_key, _) in _INTENSITY.items():
        out[name] = _decide(getattr(config, probability_key), key(stream))
        value = intensity_value(name, config, key, channels, ndim)
        if name == "bias_field":
            value, out["bias_field_magnitude"], out["bias_field_pedestal"] = value
        out[f"{name}_value"] = value
    out["noise_seed"] = key(_NOISE, 2)
    return out


def rot90(x: tf.Tensor, k: int, axes: tuple[int, int]) -> tf.Tensor:
    """``np.rot90(x, k, axes)`` for a static ``k`` in 0..3."""
    a, b = axes
    perm = list(range(x.shape.rank))
    perm[a], perm[b] = perm[b], perm[a]
    k %= 4
    if k == 0:
        return x
    if k == 1:
        return tf.transpose(tf.reverse(x, [b]), perm)
    if k == 2:
        return tf.reverse(x, [a, b])
    return tf.reverse(tf.transpose(x, perm), [b])


def random_rot90(image, label, seed, jit: bool = False):
    """Rotate by k·90° (k = 1, 2, 3) in the plane of the last two spatial axes.

    A non-square plane is rotated only by 180°, so the shape never changes.
    """
    ndim = image.shape.rank - 1
    axes = (ndim - 2, ndim - 1)
    sizes = image.shape[axes[0]], image.shape[axes[1]]
    if None in sizes:  # decided at run time; k = 1, 3 only keep a square plane's shape
        ks = (1, 2, 3)
        square = tf.equal(tf.shape(image)[axes[0]], tf.shape(image)[axes[1]])
    else:
        ks = (1, 2, 3) if sizes[0] == sizes[1] else (2,)
        square = None

    def branch(k):
        def f():
            return _drop_none(_compiled(_rot90_pair, jit, k=k, axes=axes)(image, label))

        return f

    if len(ks) == 1:
        out = branch(2)()
    else:
        index = rot90_index(seed)
        if square is not None:
            index = tf.where(square, index, 1)
        out = tf.switch_case(index, [branch(k) for k in ks])
    return out[0], (None if label is None else out[1])


def rot90_index(seed) -> tf.Tensor:
    """The draw of :func:`random_rot90`: an index into its turns ``(1, 2, 3)``."""
    return tf.random.stateless_uniform([], seed=seed, minval=0, maxval=3, dtype=tf.int32)


def _rot90_pair(image, label, k, axes):
    return rot90(image, k, axes), (None if label is None else rot90(label, k, axes))


def flip(x: tf.Tensor, axes) -> tf.Tensor:
    """Mirror ``x`` along the static ``axes``."""
    return tf.reverse(x, list(axes)) if axes else x


def _flip_pair(image, label, axes):
    return flip(image, axes), (None if label is None else flip(label, axes))


def flip_coins(count: int, probability: float, seed) -> tf.Tensor:
    """The draw of :func:`random_flip`: one bool per flipped axis."""
    return tf.random.stateless_uniform([count], seed=seed) < probability


def random_flip(image, label, axes, probability: float, seed, jit: bool = False):
    """Mirror each of the spatial ``axes`` with its own coin of ``probability``.

    One reversal of the chosen axes: a switch over the 2**len(axes) static combinations.
    """
    coins = flip_coins(len(axes), probability, seed)
    index = tf.reduce_sum(tf.cast(coins, tf.int32) * (2 ** tf.range(len(axes))))

    def branch(mask):
        chosen = [a for i, a in enumerate(axes) if mask >> i & 1]
        if not chosen:
            return lambda: _drop_none((image, label))
        return lambda: _drop_none(_compiled(_flip_pair, jit, axes=tuple(chosen))(image, label))

    out = tf.switch_case(index, [branch(mask) for mask in range(2 ** len(axes))])
    return out[0], (None if label is None else out[1])


# -- intensity -----------------------------------------------------------------------------


def _spatial_axes(x) -> list[int]:
    return list(range(x.shape.rank - 1))


def add_noise(image, std, seed) -> tf.Tensor:
    """``image + N(0, std²)``, independent per voxel and channel.

    The normals come from Box-Muller on stateless uniforms: on CPU ~1.7x cheaper than
    ``stateless_normal``, whose cost dominates this transform (not XLA-compiled: its
    transcendentals are slower there).
    """
    n = tf.size(image)
    uniforms = tf.random.stateless_uniform([2, (n + 1) // 2], seed=seed, minval=1e-7, maxval=1.0)
    return _box_muller_add(image, uniforms, tf.cast(std, tf.float32))


def _box_muller_add(image, uniforms, std):
    radius = tf.sqrt(-2.0 * tf.math.log(uniforms[0]))
    angle = (2.0 * math.pi) * uniforms[1]
    normal = tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], 0)
    return image + tf.reshape(normal[: tf.size(image)], tf.shape(image)) * std


def _radius(sigma: float, truncate: float = 4.0) -> int:
    """scipy's kernel radius ``int(truncate * sigma + 0.5)``."""
    return int(truncate * float(sigma) + 0.5)


def gaussian_kernel(sigma, radius: int) -> tf.Tensor:
    """Normalized ``exp(-x²/2σ²)`` on ``-radius..radius`` (scipy's ``_gaussian_kernel1d``)."""
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    sigma = tf.cast(sigma, tf.float32)
    w = tf.exp(-0.5 * tf.square(x / sigma))
    return w / tf.reduce_sum(w)


def gaussian_blur(image, sigma, radius: int) -> tf.Tensor:
    """Separable Gaussian blur of every channel over the spatial axes.

    Borders are mirrored (``scipy.ndimage.gaussian_filter``'s default ``mode="reflect"``).
    ``radius`` is static (the kernel size of the largest sigma drawn); the kernel of a
    smaller ``sigma`` is ~0 at the extra taps.
    """
    if radius < 1:
        return image
    kernel = gaussian_kernel(sigma, radius)
    out = image
    for axis in _spatial_axes(image):
        pad = [[0, 0]] * image.shape.rank
        pad[axis] = [radius, radius]
        padded = tf.pad(out, pad, mode="SYMMETRIC")
        n = tf.shape(out)[axis]
        acc = 0.0
        for t in range(2 * radius + 1):
            begin = [0] * image.shape.rank
            begin[axis] = t
            size = [-1] * image.shape.rank
            size[axis] = n
            acc += kernel[t] * tf.slice(padded, begin, size)
        out = acc
    return out


def _monomials(ndim: int) -> list[tuple[int, ...]]:
    """Exponents of the polynomial terms of total degree 1 and 2 over ``ndim`` axes
    (the constant is left out: a global gain is the brightness transform's)."""
    terms = [tuple(int(a == i) for a in range(ndim)) for i in range(ndim)]
    for i in range(ndim):
        for j in range(i, ndim):
            terms.append(tuple((a == i) + (a == j) for a in range(ndim)))
    return terms


def bias_field(shape, coefficients, magnitude) -> tf.Tensor:
    """``exp(magnitude · f / max|f|)``, ``f = Σ c_t m_t``: a smooth multiplicative field.

    ``m_t`` are the monomials of degree 1 and 2 (:func:`_monomials` order: ``x, y, z``,
    then ``x², xy, xz, y², yz, z²``) of voxel coordinates scaled to ``[-1, 1]`` along each
    axis; ``coefficients`` has one value per term. The field ranges over
    ``[exp(-magnitude), exp(magnitude)]`` (reached at the patch's extremes of ``f``).

    Returns
    -------
    tf.Tensor
        ``shape`` float32.
    """
    shape = tf.convert_to_tensor(shape, tf.int32)
    ndim = int(shape.shape[0])
    axes = [tf.linspace(-1.0, 1.0, shape[i]) for i in range(ndim)]
    grids = tf.meshgrid(*axes, indexing="ij")
    coefficients = tf.cast(coefficients, tf.float32)
    f = tf.zeros(shape, tf.float32)
    for t, exponents in enumerate(_monomials(ndim)):
        term = tf.ones(shape, tf.float32)
        for axis, power in enumerate(exponents):
            if power:
                term = term * grids[axis] ** power
        f = f + coefficients[t] * term
    f = f / tf.maximum(tf.reduce_max(tf.abs(f)), 1e-8)
    return tf.exp(tf.cast(magnitude, tf.float32) * f)


def apply_bias_field(image, field, pedestal=0.0) -> tf.Tensor:
    """``(x - p) · field + p`` per channel, ``p = m - pedestal · (M - m)`` with ``m``, ``M``
    the channel's minimum and maximum.

    With ``pedestal`` 0 the field scales the signal above the darkest value (air carries
    no coil bias). A scanner may add a pedestal under the signal before the coil's field
    scales both; per-image z-scoring removes the pedestal but not its scaled share, which
    a ``pedestal`` (a share of the range) below the darkest value reproduces.
    """
    axes = _spatial_axes(image)
    low = tf.reduce_min(image, axes)
    pivot = low - tf.cast(pedestal, image.dtype) * (tf.reduce_max(image, axes) - low)
    return (image - pivot) * field[..., None] + pivot


def adjust_contrast(image, factor) -> tf.Tensor:
    """``(x - mean) * factor + mean`` per channel, clipped to the channel's old range."""
    axes = _spatial_axes(image)
    mean = tf.reduce_mean(image, axes)
    low, high = tf.reduce_min(image, axes), tf.reduce_max(image, axes)
    return tf.clip_by_value((image - mean) * factor + mean, low, high)


def adjust_gamma(image, gamma, retain_stats: bool = True, jit: bool = False) -> tf.Tensor:
    """nnU-Net's gamma: per channel, rescale to [0, 1], raise to ``gamma``, rescale back.

    With ``retain_stats`` the result is then shifted and scaled to the channel's original
    mean and standard deviation. Reductions stay outside XLA (slow there on CPU).
    """
    axes = _spatial_axes(image)
    low, high = tf.reduce_min(image, axes), tf.reduce_max(image, axes)
    span = high - low + 1e-7
    out = _compiled(_gamma_kernel, jit)(image, low, span, tf.cast(gamma, tf.float32))
    if retain_stats:
        mean, std = tf.reduce_mean(image, axes), tf.math.reduce_std(image, axes)
        new_mean, new_std = tf.reduce_mean(out, axes), tf.math.reduce_std(out, axes)
        out = (out - new_mean) * (std / (new_std + 1e-8)) + mean
    return out


def _gamma_kernel(image, low, span, gamma):
    return tf.pow((image - low) / span, gamma) * span + low


def low_resolution_indices(size: int, zoom) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Per axis: the two source indices and weight of nearest-down then linear-up resizing.

    Downsampling to ``L = max(round(size * zoom), 1)`` samples takes, for low sample ``l``,
    the input index ``floor((l + 0.5) * size / L)``; upsampling back reads low coordinate
    ``(o + 0.5) * L / size - 0.5`` (clamped) linearly. Composed, output ``o`` is a linear
    blend of two input indices, so the output shape stays static.
    """
    n = tf.cast(size, tf.float64)
    low = tf.maximum(tf.round(n * tf.cast(zoom, tf.float64)), 1.0)
    o = tf.range(n, dtype=tf.float64)
    c = tf.clip_by_value((o + 0.5) * low / n - 0.5, 0.0, low - 1.0)
    l0 = tf.floor(c)
    l1 = tf.minimum(l0 + 1.0, low - 1.0)

    def source(lidx):
        return tf.minimum(tf.cast(tf.floor((lidx + 0.5) * n / low), tf.int32), size - 1)

    return source(l0), source(l1), tf.cast(c - l0, tf.float32)


def simulate_low_resolution(image, zoom) -> tf.Tensor:
    """Downsample by ``zoom`` (nearest) and upsample back (linear), every spatial axis."""
    out = image
    for axis in _spatial_axes(image):
        i0, i1, w = low_resolution_indices(tf.shape(image)[axis], zoom)
        shape = [1] * image.shape.rank
        shape[axis] = -1
        a, b = tf.gather(out, i0, axis=axis), tf.gather(out, i1, axis=axis)
        out = a + (b - a) * tf.reshape(w, shape)
    return out
