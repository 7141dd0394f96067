"""Preprocessed cases, once: held in memory as a :class:`CaseTable`, and optionally in a file
cache keyed by the plan and the dataset version, written atomically (concurrent builders
and killed writers leave nothing half-written)."""

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

from medseg.pipeline.patches import (
    foreground_locations,
)
from medseg.pipeline.preprocess import PreprocessPlan, preprocess_case
from medseg.pipeline.reading import AUTOTUNE, graph_only, read_cases

CACHE_FORMAT = 1


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

    @graph_only
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
