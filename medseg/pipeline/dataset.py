"""``tf.data`` pipelines from a built TFDS dataset to batches of training patches.

read → preprocess (once: held in memory, and optionally in a file cache keyed by the plan
and the dataset version) → per element: choose a case, sample a patch (foreground
oversampling, blank-patch skipping), augment → batch → one-hot → prefetch.

A training batch is a pure function of ``(seed, step)``. Element ``e`` (the ``e``-th patch
of the stream) takes its case from a seeded permutation of the cases for round
``e // num_cases`` (every case once per round: the shuffle) and all other randomness from
the stateless seed ``(seed, e)``. Nothing depends on what was drawn before, so a pipeline
started at ``start_step`` yields exactly the batches an uninterrupted one yields from
there (kill and resume), and parallel maps cannot change what an element is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from medseg.config import PatchConfig
from medseg.pipeline.patches import (
    foreground_locations,
    pad_case,
    sample_patch,
    slab_to_slice,
)
from medseg.pipeline.preprocess import PreprocessPlan, preprocess_case

AUTOTUNE = tf.data.AUTOTUNE
PATCH_MODES = ("patch", "slice", "full")
# bump when what a cached case holds changes: old caches are then never read
CACHE_FORMAT = 1
_ENDLESS = 2**62


def read_case_ids(builder: tfds.core.DatasetBuilder, split: str) -> list[str]:
    """The case ids of ``split``, in record order, without decoding any volume."""
    ds = builder.as_dataset(split=split, decoders=_skip_volumes(builder), shuffle_files=False)
    return [cid.decode() for cid in ds.map(lambda ex: ex["case_id"]).as_numpy_iterator()]


def split_cases(
    case_ids: Sequence[str], validation_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Seeded split of case ids into (training, validation), each sorted.

    At least one case goes to each side when there are two or more cases.
    """
    ids = sorted(case_ids)
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"data.validation_fraction={validation_fraction} must be in [0, 1)")
    n_val = int(round(len(ids) * validation_fraction))
    if validation_fraction > 0 and len(ids) >= 2:
        n_val = min(max(n_val, 1), len(ids) - 1)
    order = np.random.default_rng(seed).permutation(len(ids))
    val = sorted(ids[i] for i in order[:n_val])
    train = sorted(ids[i] for i in order[n_val:])
    return train, val


def read_cases(
    builder: tfds.core.DatasetBuilder, split: str, case_ids: Sequence[str] | None = None
) -> tf.data.Dataset:
    """Decoded examples of ``split``, restricted to ``case_ids`` if given.

    Volumes of cases that are filtered out are never decompressed.
    """
    features = builder.info.features
    ds = builder.as_dataset(split=split, decoders=_skip_volumes(builder), shuffle_files=False)
    if case_ids is not None:
        wanted = tf.constant(list(case_ids), tf.string)
        ds = ds.filter(lambda ex: tf.reduce_any(tf.equal(ex["case_id"], wanted)))

    def decode(ex):
        ex = dict(ex)
        for key in ("image", "label"):
            if key in ex:
                ex[key] = features[key].decode_example(ex[key])
        return ex

    return ds.map(decode, num_parallel_calls=AUTOTUNE)


def _skip_volumes(builder) -> dict:
    names = builder.info.features.keys()
    return {k: tfds.decode.SkipDecoding() for k in ("image", "label") if k in names}


def check_patch_fits(
    fingerprint: dict,
    plan: PreprocessPlan,
    patch_size: Sequence[int],
    dataset: str = "dataset",
    mode: str = "patch",
) -> None:
    """Raise a clear error if ``patch_size`` exceeds any case's preprocessed shape.

    Uses the fingerprint's shapes and spacings, so no record is read. In ``"full"`` mode
    cases are padded up to the patch size, so any size fits.
    """
    if mode == "full":
        return
    shapes = np.asarray(fingerprint["shapes"], dtype=np.float64)[:, :3]
    spacings = np.asarray(fingerprint["spacings"], dtype=np.float64)
    if plan.target_spacing is not None:
        shapes = np.maximum(np.round(shapes * spacings / np.asarray(plan.target_spacing)), 1)
    too_small = np.any(shapes < np.asarray(patch_size), axis=1)
    if too_small.any():
        i = int(np.argmax(too_small))
        smallest = tuple(int(s) for s in shapes.min(axis=0))
        raise ValueError(
            f"patch size {tuple(patch_size)} is larger than the preprocessed volume of "
            f"{int(too_small.sum())} case(s) of {dataset} (case #{i} is "
            f"{tuple(int(s) for s in shapes[i])} at spacing {plan.target_spacing}; smallest "
            f"extent per axis {smallest}): choose patch.patch_size ≤ {smallest} or a finer "
            f"preprocess.target_spacing"
        )


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


def _case_seed(seed: int, case_id: tf.Tensor) -> tf.Tensor:
    bucket = tf.strings.to_hash_bucket_fast(case_id, 2**31 - 1)
    return tf.stack([tf.constant(seed, tf.int64), bucket])


def cache_key(
    builder: tfds.core.DatasetBuilder,
    split: str,
    case_ids: Sequence[str],
    plan: PreprocessPlan,
    num_classes: int,
    seed: int,
) -> str:
    """Hex digest of everything a cached preprocessed case depends on.

    The dataset's name, config and version, its fingerprint hash (content), the split and
    cases, the preprocessing plan, the class count and the seed of the foreground-location
    subsample: a change to any of them gives another key, so a stale cache is never read.
    """
    from medseg import datasets  # the pipeline only needs this for the file cache

    values = {
        "format": CACHE_FORMAT,
        "dataset": builder.info.full_name,
        "fingerprint": datasets.fingerprint_hash(datasets.read_fingerprint(builder)),
        "split": split,
        "cases": sorted(case_ids),
        "plan": plan.to_dict(),
        "num_classes": int(num_classes),
        "seed": int(seed),
    }
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:24]


def preprocessed_cases(
    builder: tfds.core.DatasetBuilder,
    split: str,
    case_ids: Sequence[str],
    plan: PreprocessPlan,
    num_classes: int,
    seed: int,
    deterministic: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> tf.data.Dataset:
    """Preprocessed cases with their foreground locations, cached after one pass.

    Each element holds ``case_id``, ``image`` ``(d, h, w, C)`` float32, ``label``
    ``(d, h, w)`` (uint8 for up to 256 classes, else int32), ``coords`` and ``classes``
    (:func:`~medseg.pipeline.patches.foreground_locations`).

    Without ``cache_dir`` the cache is in memory and filled by the first pass. With it,
    the cases are preprocessed now, unless an earlier run already did, into
    ``cache_dir/<dataset>/<key>/`` (:func:`cache_key`), and read from there. The cache is
    written under a private temporary name and renamed once complete, so an interrupted
    write is never taken for a cache (tf.data's own ``.lockfile`` would instead block the
    next run with "concurrent caching iterator" after a kill, and a partly iterated cache
    is discarded).
    """
    label_dtype = tf.uint8 if num_classes <= 256 else tf.int32

    @_graph_only
    def prepare(ex):
        image, label = preprocess_case(ex["image"], ex["label"], ex["spacing"], plan)
        coords, classes = foreground_locations(label, num_classes, _case_seed(seed, ex["case_id"]))
        return {
            "case_id": ex["case_id"],
            "image": image,
            "label": tf.cast(label, label_dtype),
            "coords": coords,
            "classes": classes,
        }

    ds = read_cases(builder, split, case_ids)
    ds = ds.map(prepare, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    if cache_dir is None:
        return ds.cache()
    key = cache_key(builder, split, case_ids, plan, num_classes, seed)
    root = Path(cache_dir) / builder.info.full_name.replace("/", "_")
    final = root / key
    if not (final / "cases.index").is_file():
        _write_file_cache(ds, root, final)
    return ds.cache(str(final / "cases"))


def _write_file_cache(ds: tf.data.Dataset, root: Path, final: Path) -> None:
    """One pass of ``ds`` into a tf.data file cache at ``final/cases``, atomically."""
    for stale in root.glob(f"{final.name}.partial-*"):
        if not _alive(stale.name.split("-")[-2]):  # left by a killed run: never complete
            shutil.rmtree(stale, ignore_errors=True)
    partial = root / f"{final.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    partial.mkdir(parents=True)
    try:
        ds.cache(str(partial / "cases")).reduce(np.int64(0), lambda count, _: count + 1)
        try:
            partial.rename(final)
        except OSError:  # another process finished the same cache first: use theirs
            if not (final / "cases.index").is_file():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, OverflowError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@dataclass(frozen=True)
class CaseTable:
    """Preprocessed cases held in memory, for random access from graph code.

    Volumes keep their own shapes (no padding to a common one); :meth:`lookup` hands out a
    case's tensors without copying them, so per element only the patch is copied.
    """

    case_ids: tuple[str, ...]
    images: tuple[tf.Tensor, ...]
    labels: tuple[tf.Tensor, ...]
    coords: tuple[tf.Tensor, ...]
    classes: tuple[tf.Tensor, ...]

    @classmethod
    def from_dataset(cls, cases: tf.data.Dataset) -> CaseTable:
        """Read every element of :func:`preprocessed_cases` once (preprocessing it if needed)."""
        fields = {k: [] for k in ("case_id", "image", "label", "coords", "classes")}
        # sorted by case id: a non-deterministic map may have yielded them in any order
        for case in sorted(cases, key=lambda c: c["case_id"].numpy()):
            for key, values in fields.items():
                values.append(case[key])
        return cls(
            case_ids=tuple(c.numpy().decode() for c in fields["case_id"]),
            images=tuple(fields["image"]),
            labels=tuple(fields["label"]),
            coords=tuple(fields["coords"]),
            classes=tuple(fields["classes"]),
        )

    def __len__(self) -> int:
        return len(self.case_ids)

    def lookup(self, index: tf.Tensor):
        """``(image, label, coords, classes)`` of case ``index`` (a scalar int tensor)."""

        def branch(k):
            return lambda: (self.images[k], self.labels[k], self.coords[k], self.classes[k])

        if len(self) == 1:
            return branch(0)()
        return tf.switch_case(tf.cast(index, tf.int32), [branch(k) for k in range(len(self))])


def _as_table(cases, num_cases: int) -> CaseTable:
    table = cases if isinstance(cases, CaseTable) else CaseTable.from_dataset(cases)
    if len(table) == 0:
        raise ValueError("no cases to sample patches from (empty case list or split)")
    if len(table) != num_cases:
        raise ValueError(f"num_cases={num_cases} but the case dataset holds {len(table)} cases")
    return table


def case_order(index: tf.Tensor, num_cases: int, seed: int) -> tf.Tensor:
    """Case of stream element ``index``: every round of ``num_cases`` elements visits each
    case once, in the order of a permutation seeded by ``(seed, round)``."""
    index = tf.cast(index, tf.int64)
    round_seed = tf.stack([tf.constant(seed, tf.int64), -1 - index // num_cases])
    order = tf.random.experimental.stateless_shuffle(tf.range(num_cases), seed=round_seed)
    return order[index % num_cases]


def _graph_only(fn):
    """Skip AutoGraph's source conversion (of this and everything it calls): the sampling and
    augmentation code is written with explicit ``tf.cond``/``tf.while_loop``, and converting
    it would only add seconds of tracing to every pipeline's start."""
    return tf.autograph.experimental.do_not_convert(fn)


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
