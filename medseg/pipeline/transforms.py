"""Transforms of training patches, the built-in augmentation and the user's own.

A transform is any callable ``(image, label, seed) -> (image, label)`` on one patch:
``image`` ``(*spatial, C)`` float32, ``label`` ``(*spatial)`` int32, ``seed`` a ``(2,)``
int64 stateless seed (draw with ``tf.random.stateless_*``), traced into the ``tf.data``
graph like TorchIO's transforms are applied to a subject. :class:`Compose` chains them and
gives each its own seed stream, so adding a transform never changes the draws of another,
and a patch depends only on ``(seed, step)`` as before (resume stays exact).

The user's transforms are named in the config (``augment.extra =
["my_pkg.transforms:RandomSpike"]``: a callable, or a class instantiated without
arguments) or passed to :func:`medseg.workflows.run_experiment` (``transforms=[...]``);
they run after the built-in :class:`Augmentation`. Their names are logged with the run.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import tensorflow as tf

from medseg.config import TRANSFORM_SPEC, AugmentConfig

__all__ = [
    "Augmentation",
    "Compose",
    "TransformError",
    "load_transform",
    "transform_name",
]

Transform = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]

# user transform i draws from stream USER_STREAM + i of the patch's augmentation seed;
# the built-in augmentation keeps the seed itself (its draws are those of earlier releases)
USER_STREAM = 1000


class TransformError(ValueError):
    """A transform that cannot be loaded or that fails on a patch, named."""


class Augmentation:
    """nnU-Net's augmentation as configured by ``augment.*``
    (:func:`~medseg.pipeline.augment.augment`)."""

    def __init__(self, config: AugmentConfig):
        from medseg.pipeline.augment import check_augment_config

        check_augment_config(config)  # fail here, naming the key, not inside a tf.data map
        self.config = config

    def __call__(self, image, label, seed):
        from medseg.pipeline.augment import augment

        return augment(image, label, self.config, seed)

    def __repr__(self) -> str:
        return "Augmentation(augment.*)"


class Compose:
    """Apply transforms in order, the first with the patch's seed, the ``i``-th user
    transform with its own stream (``USER_STREAM + i``).

    Parameters
    ----------
    builtin : Augmentation or None
        The configured augmentation (None: off).
    extra : sequence of callables
        The user's transforms, applied after it.
    """

    def __init__(self, builtin: Transform | None, extra: Sequence[Transform] = ()):
        self.builtin = builtin
        self.extra = list(extra)

    def __bool__(self) -> bool:
        return self.builtin is not None or bool(self.extra)

    @property
    def names(self) -> list[str]:
        return [transform_name(t) for t in self.extra]

    def __call__(self, image, label, seed):
        if self.builtin is not None:
            image, label = self.builtin(image, label, seed)
        seed = tf.cast(seed, tf.int64)
        for index, transform in enumerate(self.extra):
            own = tf.random.experimental.stateless_fold_in(seed, USER_STREAM + index)
            image, label = _apply(transform, image, label, own)
        return image, label


def _apply(transform, image, label, seed):
    name = transform_name(transform)
    try:
        out = transform(image, label, seed)
        image_out, label_out = out
        image_out = tf.convert_to_tensor(image_out)
        label_out = tf.convert_to_tensor(label_out)
    except TransformError:
        raise
    except Exception as err:  # a user's code: say whose it was
        raise TransformError(
            f"augment transform {name} failed on a patch of shape {image.shape}: "
            f"{type(err).__name__}: {err}"
        ) from err
    if image_out.shape.rank != image.shape.rank or label_out.shape.rank != label.shape.rank:
        raise TransformError(
            f"augment transform {name} returned shapes {image_out.shape} and "
            f"{label_out.shape} for a patch {image.shape} with label {label.shape}: a "
            "transform keeps the patch's shape"
        )
    return tf.cast(image_out, image.dtype), tf.cast(label_out, label.dtype)


def transform_name(transform) -> str:
    """``module:qualname`` of a transform (of its class for an instance)."""
    target = transform if callable(transform) and hasattr(transform, "__qualname__") else type(
        transform
    )
    return f"{getattr(target, '__module__', '?')}:{getattr(target, '__qualname__', repr(target))}"


def load_transform(spec: str, key: str = "augment.extra") -> Transform:
    """The transform ``module:attribute`` names (a class is instantiated without arguments).

    Raises
    ------
    TransformError
        Naming ``key`` and the entry when the module or attribute is missing or the object
        is not callable.
    """
    if not TRANSFORM_SPEC.match(spec):
        raise TransformError(f"{key} entry {spec!r} is not of the form module:attribute")
    module_name, _, attribute = spec.partition(":")
    try:
        target = importlib.import_module(module_name)
    except ImportError as err:
        raise TransformError(f"{key} entry {spec!r}: cannot import {module_name!r} ({err})") from err
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise TransformError(f"{key} entry {spec!r}: {module_name!r} has no {attribute!r}")
        target = getattr(target, part)
    if isinstance(target, type):
        try:
            target = target()
        except Exception as err:
            raise TransformError(
                f"{key} entry {spec!r}: cannot create it without arguments ({err})"
            ) from err
    if not callable(target):
        raise TransformError(f"{key} entry {spec!r} is not callable")
    return target
