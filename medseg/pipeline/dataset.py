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

Bounded memory (``patch.cases_in_memory = R`` with cases in shards on disk,
:class:`~medseg.pipeline.cache.ShardedCases`; MONAI's SmartCache idea, kept stateless):
the stream is cut into phases of ``patch.replace_every`` steps. In phase ``p`` the
resident cases are a window of ``R`` consecutive entries of a permutation of the cases
seeded by ``seed`` (:func:`resident_cases`), shifted by ``r`` (``patch.replace_share``
of ``R``) per phase, so consecutive phases share ``R - r`` cases and only ``r`` are read
from disk, ahead of time, while the previous phase trains. Element ``e`` takes slot
``case_order(e, R, seed)`` of its phase's window: still a pure function of
``(seed, e)``, so resume stays exact. Resident are the ``R`` cases of the current phase
plus the ``r`` being loaded for the next.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from medseg.config import PatchConfig
from medseg.pipeline.cache import CaseTable, ShardedCases, _as_table, _check_count
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
    if patch.cases_in_memory is not None and patch.cases_in_memory < 1:
        raise ValueError(
            f"patch.cases_in_memory={patch.cases_in_memory} must be ≥ 1, or null to keep "
            "every case in memory"
        )
    if patch.replace_every < 1:
        raise ValueError(f"patch.replace_every={patch.replace_every} must be ≥ 1 (steps)")
    if not 0.0 < patch.replace_share <= 1.0:
        raise ValueError(
            f"patch.replace_share={patch.replace_share} must be in (0, 1]: the share of the "
            "resident cases replaced every patch.replace_every steps"
        )
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


def replaced_per_phase(cases_in_memory: int, replace_share: float) -> int:
    """Cases swapped in per phase: ``replace_share`` of the window, at least one."""
    return min(cases_in_memory, max(1, round(cases_in_memory * replace_share)))


def residence_order(num_cases: int, seed: int) -> np.ndarray:
    """The seeded permutation of the cases that the resident window slides along."""
    return np.random.default_rng([seed, 14]).permutation(num_cases)


def resident_cases(
    phase: int, num_cases: int, cases_in_memory: int, replace_share: float, seed: int
) -> np.ndarray:
    """Case indices resident in ``phase`` (slot order): entries ``p*r .. p*r + R - 1``
    (cyclically) of :func:`residence_order`, so every case is resident once per
    ``num_cases / r`` phases."""
    r = replaced_per_phase(cases_in_memory, replace_share)
    positions = (phase * r + np.arange(min(cases_in_memory, num_cases))) % num_cases
    return residence_order(num_cases, seed)[positions]


def stream_memory(cases, num_cases: int, patch: PatchConfig) -> tuple[int, int | None]:
    """Planned ``(resident cases, their bytes)`` of :func:`training_dataset` on ``cases``.

    Bytes are the largest cases' (an upper bound); None for cases not preprocessed yet
    (a dataset: all ``num_cases`` are read into memory).
    """
    if isinstance(cases, CaseTable):
        fields = zip(cases.images, cases.labels, cases.coords, cases.classes, strict=True)
        return len(cases), sum(
            sum(t.shape.num_elements() * t.dtype.size for t in f) for f in fields
        )
    if not isinstance(cases, ShardedCases):
        return num_cases, None
    resident = len(cases)
    if patch.cases_in_memory is not None and patch.cases_in_memory < len(cases):
        window = patch.cases_in_memory
        resident = window + replaced_per_phase(window, patch.replace_share)
    return resident, sum(sorted(cases.nbytes, reverse=True)[:resident])


def describe_stream_memory(cases, num_cases: int, patch: PatchConfig) -> str:
    """One line on the planned RAM of the training stream (:func:`stream_memory`)."""
    resident, nbytes = stream_memory(cases, num_cases, patch)
    if nbytes is None:
        return (
            f"training stream: all {num_cases} preprocessed cases in memory (bound it with "
            "patch.cases_in_memory and preprocess.cache_dir)"
        )
    mib = nbytes / 2**20
    if resident < num_cases:
        window = patch.cases_in_memory
        return (
            f"training stream: at most {resident} of {num_cases} preprocessed cases in memory "
            f"({window} resident + {resident - window} loading ahead, every "
            f"{patch.replace_every} steps), planned {mib:.1f} MiB ({nbytes} bytes)"
        )
    return (
        f"training stream: all {num_cases} preprocessed cases in memory, planned "
        f"{mib:.1f} MiB ({nbytes} bytes)"
    )


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
    cases: tf.data.Dataset | CaseTable | ShardedCases,
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
    cases : tf.data.Dataset, CaseTable or ShardedCases
        :func:`preprocessed_cases`, read into memory once here; or the cases as shards on
        disk (:func:`~medseg.pipeline.cache.sharded_cases`), streamed through a window of
        ``patch.cases_in_memory`` resident cases (module docstring), or all read into
        memory when that is None or covers every case.
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
    bounded = patch.cases_in_memory is not None
    if bounded and not isinstance(cases, ShardedCases):
        raise ValueError(
            f"patch.cases_in_memory={patch.cases_in_memory} streams cases from shards on "
            "disk: pass ShardedCases (medseg.pipeline.sharded_cases, which needs "
            "preprocess.cache_dir), or set patch.cases_in_memory to null"
        )
    augmenter = _augmenter(augment, transforms)
    if augmenter is not None and augmenter.builtin is not None and patch.mode == "full":
        # cases differ in shape; augment's resampling kernels need static patch shapes
        raise ValueError(
            "patch.mode='full' cannot be augmented (whole cases have no fixed shape): set "
            "augment.enabled=false, or use patch.mode='patch' with a large patch.patch_size"
        )
    if bounded and patch.cases_in_memory < len(cases):
        _check_count(len(cases), num_cases)
        ds = _bounded_elements(cases, patch, seed, deterministic, augmenter, start_step)
        ds = _batch(ds, patch, num_classes)
        return ds.prefetch(AUTOTUNE).with_options(_options(deterministic))
    table = _as_table(cases, num_cases)
    sample = _sampler(table, patch, augmenter)

    @_graph_only
    def element(index):
        case = case_order(index, len(table), seed)
        return sample(case, tf.stack([tf.constant(seed, tf.int64), index]))

    ds = tf.data.Dataset.range(start_step * patch.batch_size, _ENDLESS)
    ds = ds.map(element, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    ds = _batch(ds, patch, num_classes)
    return ds.prefetch(AUTOTUNE).with_options(_options(deterministic))


def _bounded_elements(
    shards: ShardedCases, patch: PatchConfig, seed: int, deterministic: bool, augmenter, start_step
) -> tf.data.Dataset:
    """The unbatched elements of the bounded stream from ``start_step`` (module docstring).

    A ``scan`` over phases carries the resident window: phase ``p + 1`` keeps slots
    ``r ..`` of phase ``p`` (the same tensors, no copy) and reads ``r`` shards; the first
    phase read reads them all. ``prefetch(1)`` reads the next phase while this one trains.
    """
    n, window = len(shards), patch.cases_in_memory
    r = replaced_per_phase(window, patch.replace_share)
    per_phase = patch.replace_every * patch.batch_size
    start = start_step * patch.batch_size
    order = tf.constant(residence_order(n, seed), tf.int64)
    empty = (
        tf.zeros([0, 0, 0, shards.channels], tf.float32),
        tf.zeros([0, 0, 0], tf.as_dtype(shards.label_dtype)),
        tf.zeros([0, 3], tf.int32),
        tf.zeros([0], tf.int32),
    )

    @_graph_only
    def advance(state, phase):
        started, slots = state
        resident = []
        for j in range(window):
            case = order[(phase * r + j) % n]
            if j + r < window:  # resident in the previous phase too, at slot j + r
                kept = slots[j + r]
                resident.append(
                    tf.cond(started, lambda kept=kept: kept, lambda c=case: shards.load(c))
                )
            else:
                resident.append(shards.load(case))
        resident = tuple(resident)
        return (tf.constant(True), resident), (phase, resident)

    def phase_elements(phase, resident):
        # (index, the phase's cases) per element: handles of the same tensors, no copies
        low = tf.maximum(phase * per_phase, start)
        indices = tf.data.Dataset.range(low, (phase + 1) * per_phase)
        return indices.map(lambda index: (index, resident))

    @_graph_only
    def element(index, resident):
        table = CaseTable(("",) * window, *(tuple(f) for f in zip(*resident, strict=True)))
        slot = case_order(index, window, seed)
        sample = _sampler(table, patch, augmenter)
        return sample(slot, tf.stack([tf.constant(seed, tf.int64), index]))

    initial = (tf.constant(False), (empty,) * window)
    phases = tf.data.Dataset.range(start // per_phase, _ENDLESS).scan(initial, advance)
    # one parallel map over all phases (a map per phase would restart its threads each phase)
    ds = phases.prefetch(1).flat_map(phase_elements)
    return ds.map(element, num_parallel_calls=AUTOTUNE, deterministic=deterministic)


def validation_dataset(
    cases: tf.data.Dataset | CaseTable | ShardedCases,
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
    per_case = 1 if patch.mode == "full" else patch.validation_patches
    if isinstance(cases, ShardedCases):
        # bounded: one case read at a time; only the patches are kept (the cache below),
        # few and small, so they need no window of their own
        _check_count(len(cases), num_cases)
        total = len(cases) * per_case
        ds = _validation_from_shards(cases, patch, seed, per_case)
    else:
        table = _as_table(cases, num_cases)
        sample = _sampler(table, patch)

        @_graph_only
        def element(index):
            return sample(index // per_case, tf.stack([tf.constant(seed + 2, tf.int64), index]))

        total = len(table) * per_case
        ds = tf.data.Dataset.range(total).map(element, num_parallel_calls=AUTOTUNE)
    padded = -(-total // patch.batch_size) * patch.batch_size
    ds = ds.cache()
    ds = _batch(ds.repeat().take(padded), patch, num_classes)
    return ds.prefetch(AUTOTUNE).with_options(_options(True))


def _validation_from_shards(shards: ShardedCases, patch: PatchConfig, seed: int, per_case: int):
    """The validation elements of :func:`validation_dataset`, reading one shard at a time."""

    @_graph_only
    def case_patches(case):
        table = CaseTable(("",), *((f,) for f in shards.load(case)))
        sample = _sampler(table, patch)

        def element(index):
            return sample(0, tf.stack([tf.constant(seed + 2, tf.int64), index]))

        indices = tf.data.Dataset.range(case * per_case, (case + 1) * per_case)
        return indices.map(element, num_parallel_calls=AUTOTUNE)

    return tf.data.Dataset.range(len(shards)).flat_map(case_patches)


def _options(deterministic: bool) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = deterministic
    # Keras would otherwise shard by file, which breaks with a single-record-file split.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options
