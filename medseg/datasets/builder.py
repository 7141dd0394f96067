"""The base of medseg's TFDS builders: one example per case, fingerprinted while written.

A builder subclasses :class:`CaseBuilder`, declares its classes, and yields from
:meth:`CaseBuilder._generate_cases` with an iterable of zero-argument callables that each
load one :class:`~medseg.io.CaseRecord`. Loading lazily, one case at a time, keeps a
build's memory at the size of the largest case, not of the dataset.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle as tfds_shuffle
from tensorflow_datasets.core import utils as tfds_utils

from medseg.datasets.fingerprint import FingerprintAccumulator, fingerprint_hash

log = logging.getLogger(__name__)

# An unlabelled case (a test split) stores an empty label of this shape.
NO_LABEL_SHAPE = (0, 0, 0)

# zlib level of the volume features: level 1 is ~7x faster than zlib's default 6 on CT
# volumes for ~2 % bigger records; decoding (any level) is unchanged.
VOLUME_ZLIB_LEVEL = 1
# zlib.Z_RLE would compress CT ~35 % faster again, for records ~6 % bigger than level 1's
VOLUME_ZLIB_STRATEGY = zlib.Z_DEFAULT_STRATEGY
# Volumes are compressed in chunks of this size on several threads (zlib releases the GIL)
# and joined into one zlib stream, as pigz does.
_ZLIB_CHUNK_BYTES = 8 << 20
# TFDS keeps up to 1 GB of serialized records in memory before spilling them to disk;
# medseg's records are whole volumes, so spill early and keep a build's memory flat.
_WRITE_BUFFER_BYTES = 64 << 20


def zlib_compress(data, level: int = VOLUME_ZLIB_LEVEL, workers: int | None = None) -> bytes:
    """One zlib stream of ``data`` (bytes, or an array's C-order bytes), made in parallel.

    The bytes are compressed in chunks of about ``_ZLIB_CHUNK_BYTES`` on ``workers``
    threads (zlib and numpy copies release the GIL). Each chunk is raw deflate ended by a
    sync flush (the last by a finish), so their concatenation behind a zlib header and
    before the adler32 of the whole input is a standard zlib stream (as pigz writes) that
    ``zlib.decompress`` and ``tf.io.decode_compressed(..., "ZLIB")`` read like any other.
    A Fortran-ordered array (as NIfTI readers return) is put in C order chunk by chunk,
    in the workers, so it is never copied whole.
    """
    array = data if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
    chunk_bytes = _ZLIB_CHUNK_BYTES
    if array.ndim >= 2 and array.size and not array.flags.c_contiguous:
        rows = max(1, chunk_bytes // max(array[0].nbytes, 1))
        pieces = [
            (lambda start=start: _c_contiguous(array[start : start + rows]))
            for start in range(0, array.shape[0], rows)
        ]
    else:
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        pieces = [
            (lambda start=start: flat[start : start + chunk_bytes])
            for start in range(0, max(flat.size, 1), chunk_bytes)
        ]
    workers = workers or os.cpu_count() or 1
    strategy = VOLUME_ZLIB_STRATEGY
    if workers < 2 or len(pieces) < 2:
        compressor = zlib.compressobj(level, zlib.DEFLATED, zlib.MAX_WBITS, 8, strategy)
        whole = _c_contiguous(array).reshape(-1).view(np.uint8)
        return compressor.compress(whole) + compressor.flush()
    last = len(pieces) - 1

    def deflate(index: int) -> tuple[bytes, int, int]:
        piece = pieces[index]().reshape(-1).view(np.uint8)
        compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, 8, strategy)
        flush = zlib.Z_FINISH if index == last else zlib.Z_SYNC_FLUSH
        body = compressor.compress(piece) + compressor.flush(flush)
        return body, zlib.adler32(piece), piece.size

    with ThreadPoolExecutor(max_workers=min(workers, len(pieces))) as pool:
        parts = list(pool.map(deflate, range(len(pieces))))
    checksum = 1  # the adler32 of no bytes
    for _, adler, size in parts:
        checksum = _adler32_combine(checksum, adler, size)
    header = zlib.compress(b"", level)[:2]
    return b"".join([header, *(body for body, _, _ in parts), checksum.to_bytes(4, "big")])


def _adler32_combine(adler1: int, adler2: int, len2: int) -> int:
    """The adler32 of ``a + b`` from those of ``a`` and ``b`` (zlib's adler32_combine)."""
    base = 65521
    rem = len2 % base
    low1, high1 = adler1 & 0xFFFF, adler1 >> 16
    low2, high2 = adler2 & 0xFFFF, adler2 >> 16
    low = (low1 + low2 + base - 1) % base
    high = (rem * low1 + high1 + high2 + base - rem) % base
    return low | (high << 16)


class VolumeTensor(tfds.features.Tensor):
    """``tfds.features.Tensor`` whose ZLIB encoding compresses fast (level 1, in parallel).

    Only writing differs: the records and ``features.json`` are exactly those of a plain
    ``Tensor(encoding=ZLIB)`` (this class saves itself under ``Tensor``'s name), so
    reading, ``decode_example`` and datasets built before are unchanged.
    """

    @property
    def _fully_qualified_class_name(self):
        base = tfds.features.Tensor
        return f"{base.__module__}.{base.__name__}"

    def encode_example(self, example_data):
        if self._encoding != tfds.features.Encoding.ZLIB or example_data is None:
            return super().encode_example(example_data)
        array = np.asarray(example_data)
        if array.dtype != self._serialized_dtype:
            raise ValueError(f"Dtype {array.dtype} do not match {self._serialized_dtype}")
        try:
            tfds_utils.assert_shape_match(array.shape, self._serialized_shape)
        except (AssertionError, ValueError) as e:
            raise ValueError(
                f"Shape {array.shape} does not match {self._serialized_shape} for feature "
                f"with doc {self.doc} ({e})"
            ) from e
        value = zlib_compress(array)
        if self._dynamic_shape:
            return {"value": value, "shape": array.shape}
        return value


def _c_contiguous(array: np.ndarray, block: int = 16) -> np.ndarray:
    """``np.ascontiguousarray``, ~3x faster for Fortran-ordered volumes and their slabs.

    Copying a Fortran-ordered array to C order in one go walks one of them against its
    memory order; blocks of ``block`` indices along axis 1 keep both walks in cache.
    """
    if array.flags.c_contiguous or array.ndim < 2:
        return np.ascontiguousarray(array)
    out = np.empty(array.shape, array.dtype)
    for start in range(0, array.shape[1], block):
        out[:, start : start + block] = array[:, start : start + block]
    return out


@contextlib.contextmanager
def _small_write_buffer(limit: int | None = None):
    """Have TFDS's writer spill records to its temporary buckets beyond ``limit`` bytes."""
    limit = _WRITE_BUFFER_BYTES if limit is None else limit
    previous = tfds_shuffle.MAX_MEM_BUFFER_SIZE
    tfds_shuffle.MAX_MEM_BUFFER_SIZE = min(previous, limit)
    try:
        yield
    finally:
        tfds_shuffle.MAX_MEM_BUFFER_SIZE = previous


def case_features(image_dtype=np.int16, channels: int | None = None) -> tfds.features.FeaturesDict:
    """The features every medseg dataset has.

    ``image`` is ``(D, H, W)`` or, with ``channels``, ``(D, H, W, C)`` (e.g. MRI sequences);
    ``label`` is ``(D, H, W)`` uint8, empty ``(0, 0, 0)`` for unlabelled cases; ``spacing``
    is in array-axis order; ``affine`` maps voxel indices to world millimetres (RAS+, as
    NIfTI); ``case_id`` names the case.
    """
    volume = dict(encoding=tfds.features.Encoding.ZLIB)
    image_shape = (None, None, None) if channels is None else (None, None, None, channels)
    return tfds.features.FeaturesDict(
        {
            "image": VolumeTensor(shape=image_shape, dtype=image_dtype, **volume),
            "label": VolumeTensor(shape=(None, None, None), dtype=np.uint8, **volume),
            "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32),
            "affine": tfds.features.Tensor(shape=(4, 4), dtype=np.float64),
            "case_id": tfds.features.Text(),
        }
    )


class CaseBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A GeneratorBasedBuilder that writes cases and stores their fingerprint.

    Subclasses implement ``_info`` (through ``self.dataset_info_from_configs``),
    ``_split_generators`` returning ``self._generate_cases(...)`` per split, and
    :meth:`class_names` / :attr:`REGIONS`.
    """

    # composite regions scored beside the classes, e.g. {"kidney_and_tumour": [1, 2]}
    REGIONS: dict[str, list[int]] = {}

    def class_names(self) -> list[str]:
        raise NotImplementedError

    def _generate_cases(
        self,
        loaders: Iterable[Callable[[], Any]],
        fingerprint: bool = True,
        image_dtype=None,
    ):
        """Yield ``(key, example)`` for every loader, fingerprinting labelled cases.

        Parameters
        ----------
        loaders : iterable of callables
            Each returns a :class:`~medseg.io.CaseRecord` when called; errors it raises
            name the case's files.
        fingerprint : bool
            Whether this split's labelled cases make up the dataset fingerprint (the
            training split's do; a test split's do not).
        image_dtype : numpy dtype, optional
            The image feature's dtype; images are cast to it after a range check.

        Notes
        -----
        The next case loads in a background thread while this one is written (at most
        two cases in memory); a loader's error is raised when its case is reached.
        Examples are keyed by generation order (records are written unshuffled), and each
        yielded example dict is emptied when the next one is requested, so its volumes
        are freed even though TFDS's loop still references it: consume it before
        advancing.
        """
        names = self.class_names()
        acc = FingerprintAccumulator(names, seed=0) if fingerprint else None
        if fingerprint:
            self._fingerprint_acc = acc
        loaders = list(loaders)
        # int keys in generation order, spread over the key space: with shuffling
        # disabled TFDS writes records sorted by key and, once it spills to its temporary
        # buckets, each case lands in a bucket of its own (read back one at a time)
        key_step = (1 << tfds_shuffle.HKEY_SIZE) // max(len(loaders), 1)
        seen: dict[str, int] = {}
        start = time.perf_counter()
        # no enumerate(): its cached result tuple would keep the previous case alive
        index = -1
        for record in _lookahead(loaders):
            index += 1
            if record.case_id in seen:
                raise ValueError(
                    f"{self.name}: case id {record.case_id!r} of case {index + 1} "
                    f"({record.source or record.case_id}) repeats case {seen[record.case_id] + 1}"
                )
            seen[record.case_id] = index
            image = record.image
            if image_dtype is not None:
                image = _cast_checked(image, image_dtype, record.source or record.case_id)
            label = record.label
            if label is None:
                label = np.zeros(NO_LABEL_SHAPE, np.uint8)
            else:
                _check_labels(label, len(names), record.source or record.case_id)
                label = label.astype(np.uint8, copy=False)
            # the spacing exactly as stored, so a fingerprint recomputed from the records
            # equals this one
            spacing = np.asarray(record.spacing, np.float32)
            if acc is not None and record.label is not None:
                acc.add(image, label, spacing)
            log.info(
                "%s: case %d/%d %s %s (%.1f s)",
                self.name,
                index + 1,
                len(loaders),
                record.case_id,
                tuple(image.shape),
                time.perf_counter() - start,
            )
            example = {
                "image": image,
                "label": label,
                "spacing": spacing,
                "affine": np.asarray(record.affine, np.float64),
                "case_id": record.case_id,
            }
            # drop this case before the next is taken from the lookahead, so at most two
            # cases (this one being written, the next being read) are alive at once
            del record, image, label
            yield index * key_step, example
            # TFDS's loop (an enumerate) still references this dict while asking for the
            # next case: empty it, so this case's volumes are freed before that loads
            example.clear()
            del example
        if acc is not None:
            self._store_fingerprint(acc)

    def dataset_info_from_configs(self, **kwargs):
        # records are written in generation order: medseg shuffles in its tf.data
        # pipeline, and TFDS's write-time shuffle would buffer whole volumes
        kwargs.setdefault("disable_shuffling", True)
        # where _store_fingerprint puts the fingerprint (saved as metadata.json)
        kwargs.setdefault("metadata", tfds.core.MetadataDict())
        return super().dataset_info_from_configs(**kwargs)

    def _generate_examples(self, *args, **kwargs):
        # TFDS requires the method; medseg's builders all generate through _generate_cases
        return self._generate_cases(*args, **kwargs)

    def _download_and_prepare(self, dl_manager, download_config):
        with _small_write_buffer():
            super()._download_and_prepare(dl_manager, download_config)
        # TFDS writes metadata.json only after this returns; storing again here also
        # covers a generator not run to its end (download_config.max_examples_per_split)
        acc = getattr(self, "_fingerprint_acc", None)
        if acc is not None:
            self._store_fingerprint(acc)

    def _store_fingerprint(self, acc: FingerprintAccumulator) -> None:
        fingerprint = acc.result()
        self.info.metadata["class_names"] = list(self.class_names())
        self.info.metadata["regions"] = {k: list(v) for k, v in self.REGIONS.items()}
        self.info.metadata["fingerprint"] = fingerprint
        self.info.metadata["fingerprint_hash"] = fingerprint_hash(fingerprint)


def _lookahead(loaders: list[Callable[[], Any]]):
    """Yield ``loader()`` for every loader, the next one loading in a thread meanwhile.

    At most two cases are alive: the one the caller holds and the next one loading. The
    caller must drop its reference to a case before asking for the next (it then starts
    the load after that). A loader's exception is raised, unchanged, when its case is
    reached.
    """
    if not loaders:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="medseg-load") as pool:
        pending = pool.submit(loaders[0])
        try:
            for index in range(len(loaders)):
                record = pending.result()
                pending = None
                if index + 1 < len(loaders):
                    pending = pool.submit(loaders[index + 1])
                yield record
                del record
        finally:
            if pending is not None:
                pending.cancel()


def _check_labels(label: np.ndarray, num_classes: int, source: str) -> None:
    flat = label.ravel(order="K")  # no copy of a Fortran-ordered label
    if not flat.size or (flat.min() >= 0 and flat.max() < num_classes):
        return
    values = np.unique(flat)
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise ValueError(
            f"{source}: label values {bad.tolist()} are outside the declared classes "
            f"0..{num_classes - 1}"
        )


def _cast_checked(image: np.ndarray, dtype, source: str) -> np.ndarray:
    dtype = np.dtype(dtype)
    if image.dtype == dtype:
        return image
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        lo, hi = float(np.min(image)), float(np.max(image))
        if lo < info.min or hi > info.max:
            raise ValueError(
                f"{source}: intensities {lo}..{hi} do not fit the dataset's {dtype} images"
            )
        if np.issubdtype(image.dtype, np.floating):
            image = np.rint(image)
    return image.astype(dtype)
