"""The stateless stream of training patches (and the fixed validation patches).

read (:mod:`~medseg.pipeline.reading`) → preprocess once (:mod:`~medseg.pipeline.cache`)
→ per element: choose a case, sample a patch (foreground oversampling, blank-patch
skipping), augment → batch → one-hot → prefetch.

A training batch is a pure function of ``(seed, step)``. Element ``e`` (the ``e``-th patch
of the stream) takes its case from a seeded permutation of the cases for round
``e // num_cases`` (every case once per round: the shuffle) and all other randomness from
the stateless seed ``(seed, e)``. Nothing depends on what was drawn before, so a pipeline
started at ``start_step`` yields exactly the batches an uninterrupted one yields from
there (kill and resume), and parallel maps cannot change what an element is.
"""

from __future__ import annotations

import tensorflow as tf

from medseg.config import PatchConfig
from medseg.pipeline.cache import CaseTable, _as_table
from medseg.pipeline.patches import (
    pad_case,
    sample_patch,
    slab_to_slice,
)
from medseg.pipeline.reading import graph_only as _graph_only

AUTOTUNE = tf.data.AUTOTUNE
PATCH_MODES = ("patch", "slice", "full")
# bump when what a cached case holds changes: old caches are then never read
_ENDLESS = 2**62


def check_patch_config(patch: PatchConfig) -> None:
    """Raise a clear error, naming the key, for a patch config the pipeline cannot use."""
    if patch.mode not in PATCH_MODES:
        raise ValueError(f"patch.mode={patch.mode!r}: use one of {', '.join(PATCH_MODES)}")
    for key in ("foreground_share", "min_foreground"):
        if not 0.0 <= getattr(patch, key) <= 1.0:
            raise ValueError(f"patch.{key}={getattr(patch, key)} must be in [0, 1]")
    for key, low in (("batch_size", 1), ("max_redraws", 0), ("pad_multiple", 1)):
        if getattr(patch, key) < low:
            raise ValueError(f"patch.{key}={getattr(patch, key)} must be ≥ {low}")
    if min(patch.patch_size) < 1:
        raise ValueError(f"patch.patch_size={list(patch.patch_size)} must be positive")
    if patch.mode == "slice" and patch.patch_size[0] % 2 == 0:
        raise ValueError(
            f"patch.patch_size={list(patch.patch_size)}: slice mode needs an odd slab "
            "thickness (first axis) so the labelled slice is its centre, e.g. 1 or 3"
        )


def case_order(index: tf.Tensor, num_cases: int, seed: int) -> tf.Tensor:
    """Case of stream element ``index``: every round of ``num_cases`` elements visits each
    case once, in the order of a permutation seeded by ``(seed, round)``."""
    index = tf.cast(index, tf.int64)
    round_seed = tf.stack([tf.constant(seed, tf.int64), -1 - index // num_cases])
    order = tf.random.experimental.stateless_shuffle(tf.range(num_cases), seed=round_seed)
    return order[index % num_cases]




def _augmenter(config, transforms=()):
    """``(image, label, seed) -> (image, label)``: the configured augmentation (none when
    ``config`` is None or disabled), then ``transforms`` and those ``config.extra`` names
    (:class:`~medseg.pipeline.transforms.Compose`); None when there is nothing to apply."""
    from medseg.pipeline.transforms import Augmentation, Compose, load_transform

    builtin = Augmentation(config) if config is not None and config.enabled else None
    named = [load_transform(spec) for spec in (config.extra if config is not None else ())]
    composed = Compose(builtin, [*named, *transforms])
    return composed if composed else None


def _sampler(table: CaseTable, patch: PatchConfig, augment=None):
    """``(case index, seed (2,)) -> (image, int32 label)`` for ``patch.mode``."""

    def sample(case_index, seed):
        image, label, coords, classes = table.lookup(case_index)
        s_patch, s_augment = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        if patch.mode == "full":
            image, label = pad_case(image, label, patch.patch_size, patch.pad_multiple)
        else:
            image, label = sample_patch(
                image,
                label,
                coords,
                classes,
                patch.patch_size,
                patch.foreground_share,
                s_patch,
                patch.min_foreground,
                patch.max_redraws,
            )
        label = tf.cast(label, tf.int32)
        if patch.mode == "slice":
            image, label = slab_to_slice(image, label)
        if augment is not None:
            shapes = image.shape, label.shape
            image, label = augment(image, label, s_augment)
            # the augmentation's XLA function drops static dims (the channel count)
            image, label = tf.ensure_shape(image, shapes[0]), tf.ensure_shape(label, shapes[1])
        return image, label

    return sample


def _batch(ds: tf.data.Dataset, patch: PatchConfig, num_classes: int) -> tf.data.Dataset:
    """Batch, then one-hot the labels (late: one op per batch, and 1/K the memory before)."""
    if patch.mode == "full":  # cases differ in shape: pad each batch to its largest
        ds = ds.padded_batch(patch.batch_size, drop_remainder=True)
    else:
        ds = ds.batch(patch.batch_size, drop_remainder=True)

    def one_hot(image, label):
        return image, tf.one_hot(label, num_classes, dtype=tf.float32)

    return ds.map(one_hot, num_parallel_calls=AUTOTUNE)


def training_dataset(
    cases: tf.data.Dataset | CaseTable,
    num_cases: int,
    patch: PatchConfig,
    num_classes: int,
    seed: int,
    deterministic: bool = True,
    augment=None,
    start_step: int = 0,
    transforms=(),
) -> tf.data.Dataset:
    """Endless batches ``(image (B, *patch, C), one-hot label (B, *patch, K))``.

    Parameters
    ----------
    cases : tf.data.Dataset or CaseTable
        :func:`preprocessed_cases`; read into memory once here.
    augment : AugmentConfig, optional
        Augmentation of each patch, seeded by the element (none if None or disabled), then
        the transforms its ``extra`` names.
    transforms : sequence of callables, optional
        Further ``(image, label, seed) -> (image, label)`` transforms of each patch, each
        with its own seed stream (:mod:`medseg.pipeline.transforms`).
    start_step : int
        First batch to yield: the batch at step ``s`` depends only on ``(seed, s)``, so
        resuming at ``start_step`` continues the interrupted stream exactly (when
        ``deterministic``; otherwise parallel maps may reorder elements between batches).

    In ``"slice"`` mode images are ``(B, H, W, k*C)`` and labels ``(B, H, W, K)``; in
    ``"full"`` mode every element is a whole case (padded, see
    :func:`~medseg.pipeline.patches.pad_case`).
    """
    check_patch_config(patch)
    if start_step < 0:
        raise ValueError(f"start_step={start_step} must be ≥ 0")
    table = _as_table(cases, num_cases)
    augmenter = _augmenter(augment, transforms)
    if augmenter is not None and augmenter.builtin is not None and patch.mode == "full":
        # cases differ in shape; augment's resampling kernels need static patch shapes
        raise ValueError(
            "patch.mode='full' cannot be augmented (whole cases have no fixed shape): set "
            "augment.enabled=false, or use patch.mode='patch' with a large patch.patch_size"
        )
    sample = _sampler(table, patch, augmenter)

    @_graph_only
    def element(index):
        case = case_order(index, len(table), seed)
        return sample(case, tf.stack([tf.constant(seed, tf.int64), index]))

    ds = tf.data.Dataset.range(start_step * patch.batch_size, _ENDLESS)
    ds = ds.map(element, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    ds = _batch(ds, patch, num_classes)
    return ds.prefetch(AUTOTUNE).with_options(_options(deterministic))


def validation_dataset(
    cases: tf.data.Dataset | CaseTable,
    num_cases: int,
    patch: PatchConfig,
    num_classes: int,
    seed: int,
) -> tf.data.Dataset:
    """A fixed set of ``patch.validation_patches`` patches per case, the same every epoch.

    The patch count is rounded up to whole batches (cycling through the patches again), so
    no batch is partial: a distribution strategy would hand some replica an empty share.
    In ``"full"`` mode each case is one element.
    """
    check_patch_config(patch)
    table = _as_table(cases, num_cases)
    per_case = 1 if patch.mode == "full" else patch.validation_patches
    sample = _sampler(table, patch)

    @_graph_only
    def element(index):
        return sample(index // per_case, tf.stack([tf.constant(seed + 2, tf.int64), index]))

    total = len(table) * per_case
    padded = -(-total // patch.batch_size) * patch.batch_size
    ds = tf.data.Dataset.range(total).map(element, num_parallel_calls=AUTOTUNE).cache()
    ds = _batch(ds.repeat().take(padded), patch, num_classes)
    return ds.prefetch(AUTOTUNE).with_options(_options(True))


def _options(deterministic: bool) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = deterministic
    # Keras would otherwise shard by file, which breaks with a single-record-file split.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options
