"""Preprocessed cases, once: held in memory as a :class:`CaseTable`, and optionally in a file
cache keyed by the plan and the dataset version, written atomically (concurrent builders
and killed writers leave nothing half-written). For streams of bounded memory the file
cache also holds the cases as one shard file per case (:class:`ShardedCases`), read back
one case at a time."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from medseg.io.atomic import write_atomically
from medseg.io.errors import MedsegIOError
from medseg.pipeline.patches import (
    foreground_locations,
)
from medseg.pipeline.preprocess import PreprocessPlan, preprocess_case
from medseg.pipeline.reading import AUTOTUNE, graph_only, read_cases
from medseg.progress import start_bar

CACHE_FORMAT = 1

# A file cache's writer refreshes its lock file (host, PID, heartbeat time) this often
# while it writes; a lock not refreshed for WRITER_TIMEOUT_S is a dead writer's, whatever
# its host (generous: it also absorbs clock skew between hosts sharing the cache).
HEARTBEAT_S = 30.0
WRITER_TIMEOUT_S = 600.0
WRITER_SUFFIX = ".writer"


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
        image, label = preprocess_case(
            ex["image"], ex["label"], ex["spacing"], plan, case_id=ex["case_id"]
        )
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


def sharded_cases(
    builder: tfds.core.DatasetBuilder,
    split: str,
    case_ids: Sequence[str],
    plan: PreprocessPlan,
    num_classes: int,
    seed: int,
    deterministic: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> ShardedCases:
    """:func:`preprocessed_cases` as one shard file per case, for bounded-memory streams.

    The shards go into the file cache's folder (``cache_dir/<dataset>/<key>/shards/``),
    written once from it (:func:`write_case_shards`) and reused by later runs.
    """
    if cache_dir is None:
        raise ValueError(
            "patch.cases_in_memory keeps the preprocessed cases on disk, but "
            "preprocess.cache_dir is not set: set preprocess.cache_dir to a directory, or "
            "patch.cases_in_memory to null (every case in memory)"
        )
    cases = preprocessed_cases(
        builder, split, case_ids, plan, num_classes, seed, deterministic, cache_dir
    )
    key = cache_key(builder, split, case_ids, plan, num_classes, seed)
    folder = Path(cache_dir) / builder.info.full_name.replace("/", "_") / key / "shards"
    if (folder / SHARD_INDEX).is_file():
        return ShardedCases.open(folder)
    return write_case_shards(cases, folder)


SHARD_INDEX = "index.json"


SHARD_FIELDS = ("image", "label", "coords", "classes")


@dataclass(frozen=True)
class ShardedCases:
    """Preprocessed cases on disk, one shard per case, sorted by case id.

    A shard is four raw little-endian files ``<name>.image`` ``(d, h, w, C)`` float32,
    ``<name>.label`` ``(d, h, w)``, ``<name>.coords`` ``(N, 3)`` and ``<name>.classes``
    ``(N,)`` int32, whose shapes the index holds: reading one back is a file read and a
    reinterpretation (:meth:`load`), several times faster than parsing serialized tensors.
    ``nbytes`` are the cases' sizes in memory, for planning a stream's memory.
    """

    folder: Path
    case_ids: tuple[str, ...]
    files: tuple[str, ...]
    shapes: tuple[tuple[int, int, int], ...]
    locations: tuple[int, ...]
    channels: int
    label_dtype: str

    @classmethod
    def open(cls, folder: str | os.PathLike) -> ShardedCases:
        """The shards written by :func:`write_case_shards` into ``folder``, their sizes checked."""
        folder = Path(folder)
        index = folder / SHARD_INDEX
        try:
            record = json.loads(index.read_text(encoding="utf-8"))
            cases = record["cases"]
            shards = cls(
                folder=folder,
                case_ids=tuple(str(c["case_id"]) for c in cases),
                files=tuple(str(c["file"]) for c in cases),
                shapes=tuple(tuple(int(v) for v in c["shape"]) for c in cases),
                locations=tuple(int(c["locations"]) for c in cases),
                channels=int(record["channels"]),
                label_dtype=tf.as_dtype(record["label_dtype"]).name,
            )
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{index}: no case shards here; write them with write_case_shards (or "
                "delete the folder so the next run writes them)"
            ) from None
        except (ValueError, KeyError, TypeError) as err:
            raise MedsegIOError(
                f"{index} is not a shard index ({type(err).__name__}: {err}): delete "
                f"{folder} so the next run writes the shards again"
            ) from None
        shards._check_files(index)
        return shards

    def _check_files(self, index: Path) -> None:
        # a missing or truncated shard would otherwise fail deep inside a training stream
        missing = [f"{f}.{k}" for f in self.files for k in SHARD_FIELDS]
        missing = [name for name in missing if not (self.folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{self.folder / missing[0]}: {len(missing)} case shard file(s) listed in "
                f"{index} are missing: delete {self.folder} so the next run writes the "
                "shards again"
            )
        for i, name in enumerate(self.files):
            for field, expected in zip(SHARD_FIELDS, self._field_bytes(i), strict=True):
                path = self.folder / f"{name}.{field}"
                size = path.stat().st_size
                if size != expected:
                    raise MedsegIOError(
                        f"{path}: the {field} of case {self.case_ids[i]} holds {size} bytes, "
                        f"{index} says {expected} (truncated or overwritten): delete "
                        f"{self.folder} so the next run writes the shards again"
                    )

    def _field_bytes(self, i: int) -> tuple[int, int, int, int]:
        voxels = int(np.prod(self.shapes[i]))
        label = tf.as_dtype(self.label_dtype).size
        return (
            voxels * self.channels * 4,
            voxels * label,
            self.locations[i] * 12,
            self.locations[i] * 4,
        )

    @property
    def nbytes(self) -> tuple[int, ...]:
        """Bytes of every case in memory, in case order."""
        return tuple(sum(self._field_bytes(i)) for i in range(len(self)))

    def __len__(self) -> int:
        return len(self.case_ids)

    def paths(self) -> list[str]:
        """Shard of every case (its files without the field suffix), in case order."""
        return [str(self.folder / f) for f in self.files]

    def load(self, index: tf.Tensor):
        """``(image, label, coords, classes)`` of case ``index`` (an int tensor), from disk."""
        index = tf.cast(index, tf.int32)
        path = tf.gather(tf.constant(self.paths()), index)
        shape = tf.gather(tf.constant(self.shapes, tf.int32), index)
        count = tf.gather(tf.constant(self.locations, tf.int32), index)

        def read(field, dtype, dims):
            return tf.reshape(tf.io.decode_raw(tf.io.read_file(path + "." + field), dtype), dims)

        image = read("image", tf.float32, tf.concat([shape, [self.channels]], 0))
        label = read("label", tf.as_dtype(self.label_dtype), shape)
        coords = read("coords", tf.int32, tf.stack([count, 3]))
        classes = read("classes", tf.int32, count[None])
        image.set_shape([None, None, None, self.channels])
        label.set_shape([None, None, None])
        coords.set_shape([None, 3])
        classes.set_shape([None])
        return image, label, coords, classes

    def table(self) -> CaseTable:
        """Every case in memory (the unbounded stream)."""
        loaded = [self.load(tf.constant(i)) for i in range(len(self))]
        return CaseTable(self.case_ids, *(tuple(field) for field in zip(*loaded, strict=True)))


def write_case_shards(cases: tf.data.Dataset, folder: str | os.PathLike) -> ShardedCases:
    """Write every element of :func:`preprocessed_cases` into ``folder`` as one shard per case.

    One case is held at a time. The shards and their index are written into
    ``<folder>.partial-<id>/`` under a writer lock (as the file cache) and renamed to
    ``folder`` once complete; a folder another writer completed first is used instead.
    """
    folder = Path(folder)
    if (folder / SHARD_INDEX).is_file():
        raise FileExistsError(f"{folder}: case shards are already written here; open them")
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(folder.parent, folder.name)
    partial = folder.with_name(f"{folder.name}.partial-{uuid.uuid4().hex[:12]}")
    with _writer_lock(partial.with_name(partial.name + WRITER_SUFFIX)):
        partial.mkdir()
        # one step per case written (medseg.progress)
        known = int(cases.cardinality())
        bar = start_bar(known if known >= 0 else None, "write case shards", unit="case")
        try:
            records, channels, label_dtype = [], None, None
            for case in cases:
                case_id = case["case_id"].numpy().decode()
                bar.set_postfix_str(case_id)
                name = hashlib.sha256(case_id.encode()).hexdigest()[:16]
                for field in SHARD_FIELDS:
                    # raw little-endian bytes: what tf.io.decode_raw reads back
                    array = case[field].numpy()
                    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
                    (partial / f"{name}.{field}").write_bytes(array.tobytes())
                records.append(
                    {
                        "case_id": case_id,
                        "file": name,
                        "shape": [int(v) for v in case["label"].shape],
                        "locations": int(case["classes"].shape[0]),
                    }
                )
                channels, label_dtype = int(case["image"].shape[-1]), case["label"].dtype.name
                bar.update()
            if not records:
                raise ValueError(f"{folder}: no cases to write as shards (empty case list)")
            records.sort(key=lambda r: r["case_id"])
            index = {"cases": records, "channels": channels, "label_dtype": label_dtype}
            (partial / SHARD_INDEX).write_text(json.dumps(index), encoding="utf-8")
            try:
                partial.rename(folder)
            except OSError:  # another process finished the same shards first: use theirs
                if not (folder / SHARD_INDEX).is_file():
                    raise
        finally:
            bar.close()
            shutil.rmtree(partial, ignore_errors=True)
    return ShardedCases.open(folder)


def _write_file_cache(ds: tf.data.Dataset, root: Path, final: Path) -> None:
    """One pass of ``ds`` into a tf.data file cache at ``final/cases``, atomically.

    The cache is written into ``<key>.partial-<id>/`` beside ``final`` while its writer
    lock ``<key>.partial-<id>.writer`` (:func:`_writer_lock`) is held, and renamed to
    ``final`` once complete. Partial writes of dead writers (:func:`_writer_is_stale`)
    are removed first.
    """
    _remove_stale_partials(root, final.name)
    partial = root / f"{final.name}.partial-{uuid.uuid4().hex[:12]}"
    # the lock exists before the partial folder and goes after it: a partial folder
    # without its lock is never a live writer's
    with _writer_lock(partial.with_name(partial.name + WRITER_SUFFIX)):
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


def _host() -> dict:
    """This machine: host name and kernel boot id (containers on one host may share a
    name with another machine; the boot id tells machines and reboots apart)."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = ""
    return {"host": socket.gethostname(), "boot_id": boot_id}


def _write_lock(path: Path) -> None:
    record = {**_host(), "pid": os.getpid(), "heartbeat": time.time()}
    # atomically: a reader never sees half a lock
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(record), encoding="utf-8"))


@contextlib.contextmanager
def _writer_lock(path: Path):
    """Hold a cache writer's lock file at ``path``: host, PID and a heartbeat time,
    refreshed every :data:`HEARTBEAT_S` by a background thread; removed on exit."""
    _write_lock(path)
    stop = threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):  # a full disk: the next beat tries again
                _write_lock(path)

    thread = threading.Thread(target=beat, name="medseg-cache-heartbeat", daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join()
        path.unlink(missing_ok=True)


def _writer_is_stale(lock: Path, now: float | None = None) -> bool:
    """Whether the cache writer of lock file ``lock`` is gone.

    Stale when the lock is missing, when its heartbeat is older than
    :data:`WRITER_TIMEOUT_S` (any host), or when it is this host's and its PID is
    dead. A live PID on another host means nothing here: only the heartbeat counts.
    """
    now = time.time() if now is None else now
    try:
        record = json.loads(lock.read_text(encoding="utf-8"))
        heartbeat = float(record["heartbeat"])
        same_host = {k: record.get(k) for k in ("host", "boot_id")} == _host()
        pid = int(record["pid"])
    except FileNotFoundError:
        return True
    except (OSError, ValueError, TypeError, KeyError):
        # not a lock this module wrote: judge it by its age alone
        try:
            return now - lock.stat().st_mtime > WRITER_TIMEOUT_S
        except OSError:
            return True
    if now - heartbeat > WRITER_TIMEOUT_S:
        return True
    return same_host and not _alive(pid)


def _remove_stale_partials(root: Path, key: str) -> None:
    """Remove the partial writes of cache ``key`` whose writers are gone, and their locks."""
    for entry in root.glob(f"{key}.partial-*"):
        if entry.name.endswith(WRITER_SUFFIX):
            # a lock without its folder: a writer killed before it made the folder
            folder = entry.with_name(entry.name[: -len(WRITER_SUFFIX)])
            if not folder.exists() and _writer_is_stale(entry):
                entry.unlink(missing_ok=True)
            continue
        lock = entry.with_name(entry.name + WRITER_SUFFIX)
        if _writer_is_stale(lock):  # left by a killed run: never complete
            shutil.rmtree(entry, ignore_errors=True)
            lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host."""
    if pid <= 0:  # 0 and negatives address process groups, not one process
        return False
    try:
        os.kill(pid, 0)
    except (OverflowError, ProcessLookupError):
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
    if isinstance(cases, ShardedCases):
        _check_count(len(cases), num_cases)  # before reading any shard
        return cases.table()
    table = cases if isinstance(cases, CaseTable) else CaseTable.from_dataset(cases)
    _check_count(len(table), num_cases)
    return table


def _check_count(found: int, num_cases: int) -> None:
    if found == 0:
        raise ValueError("no cases to sample patches from (empty case list or split)")
    if found != num_cases:
        raise ValueError(f"num_cases={num_cases} but the case dataset holds {found} cases")
