"""The base of medseg's TFDS builders: one example per case, fingerprinted while written.

A builder subclasses :class:`CaseBuilder`, declares its classes, and returns, per split,
:meth:`CaseBuilder._generate_cases` of a list of zero-argument callables that each load
one :class:`~medseg.io.CaseRecord`. Loading lazily, one case at a time, keeps a build's
memory at the size of the largest case, not of the dataset. A split without cases is
left out of the dataset (decided before anything is written).

With :attr:`CaseBuilder.workers` above 1 (``medseg build --workers N``), cases are read,
checked and put in C order by a pool of processes (the first two by this one while the
pool starts) while this one fingerprints and writes them, in the same order: the records
and the fingerprint are those of a 1-process build.
The volumes come back through shared memory blocks (``/dev/shm/medseg<pid>_*`` on Linux),
unlinked as soon as this process has mapped them.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import multiprocessing
import os
import pickle
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import resource_tracker, shared_memory
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from medseg.datasets.fingerprint import FingerprintAccumulator, fingerprint_hash
from medseg.datasets.records import write_split
from medseg.progress import is_quiet, start_bar

log = logging.getLogger(__name__)

# An unlabelled case (a test split) stores an empty label of this shape.
NO_LABEL_SHAPE = (0, 0, 0)


def case_features(image_dtype=np.int16, channels: int | None = None) -> tfds.features.FeaturesDict:
    """The features every medseg dataset has.

    ``image`` is ``(D, H, W)`` or, with ``channels``, ``(D, H, W, C)`` (e.g. MRI sequences);
    ``label`` is ``(D, H, W)`` uint8, empty ``(0, 0, 0)`` for unlabelled cases; ``spacing``
    is in array-axis order; ``affine`` maps voxel indices to world millimetres (RAS+, as
    NIfTI); ``case_id`` names the case.
    """
    # raw bytes, uncompressed: zlib at its fastest level costs more than reading the
    # NIfTI files and the first epoch's decoding; the records take ~2x the disk of
    # .nii.gz (KiTS19: ~24 GB). medseg.datasets.records writes them in one copy.
    volume = dict(encoding=tfds.features.Encoding.BYTES)
    image_shape = (None, None, None) if channels is None else (None, None, None, channels)
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Tensor(shape=image_shape, dtype=image_dtype, **volume),
            "label": tfds.features.Tensor(shape=(None, None, None), dtype=np.uint8, **volume),
            "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32),
            "affine": tfds.features.Tensor(shape=(4, 4), dtype=np.float64),
            "case_id": tfds.features.Text(),
        }
    )


class CaseExamples:
    """The ``(key, example)`` pairs of one split: an iterator that knows its case count.

    :meth:`CaseBuilder._generate_cases` returns one, so that a split without cases is
    known (``len() == 0``) before any case is read or written.

    Attributes
    ----------
    num_cases : int
        Cases the split will yield.
    fingerprint : bool
        Whether the split's labelled cases make up the dataset fingerprint.
    loaders : list of callables or None
        The split's case loaders and ``image_dtype`` its image feature's dtype, for a
        build that reads the cases elsewhere (:mod:`medseg.datasets.beam`).
    """

    def __init__(
        self, num_cases: int, fingerprint: bool, examples: Iterator, loaders=None, image_dtype=None
    ):
        self.num_cases = num_cases
        self.fingerprint = fingerprint
        self._examples = examples
        self.loaders = loaders
        self.image_dtype = image_dtype

    def __len__(self) -> int:
        return self.num_cases

    def __iter__(self) -> CaseExamples:
        return self

    def __next__(self):
        return next(self._examples)


class CaseBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A GeneratorBasedBuilder that writes cases and stores their fingerprint.

    Subclasses implement ``_info`` (through ``self.dataset_info_from_configs``),
    ``_split_generators`` returning ``self._generate_cases(...)`` per split, and
    :meth:`class_names` / :attr:`REGIONS`. A split with no cases (e.g. KiTS19 without
    its test cases) is left out of the dataset; a fingerprinted (training) split with
    none is refused before anything is written.
    """

    # composite regions scored beside the classes, e.g. {"kidney_and_tumour": [1, 2]}
    REGIONS: dict[str, list[int]] = {}

    # processes reading cases; 1 reads them in a thread of this process (see
    # medseg.datasets.prepare, which sets it, and _pool_cases)
    workers: int = 1

    def class_names(self) -> list[str]:
        raise NotImplementedError

    def modalities(self) -> list[str]:
        """One name per image channel (``"CT"``, ``"T1"``, ...): planning normalises CT
        by the dataset's HU statistics and anything else per image."""
        return ["unknown"]

    def _generate_cases(
        self,
        loaders: Iterable[Callable[[], Any]],
        fingerprint: bool = True,
        image_dtype=None,
    ) -> CaseExamples:
        """``(key, example)`` for every loader, fingerprinting labelled cases.

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

        Returns
        -------
        CaseExamples
            An iterator of the pairs whose ``len()`` is the number of loaders; no case is
            loaded before the first pair is asked for.

        Notes
        -----
        The next case loads in a background thread while this one is written (at most
        two cases in memory); a loader's error is raised when its case is reached.
        Examples are keyed by generation order (records are written unshuffled), and each
        yielded example dict is emptied when the next one is requested, so its volumes
        are freed even though TFDS's loop still references it: consume it before
        advancing.
        """
        loaders = list(loaders)
        return CaseExamples(
            len(loaders),
            fingerprint,
            self._iter_cases(loaders, fingerprint, image_dtype),
            loaders=loaders,
            image_dtype=image_dtype,
        )

    def _iter_cases(self, loaders: list[Callable[[], Any]], fingerprint: bool, image_dtype):
        """The generator behind :meth:`_generate_cases`."""
        names = self.class_names()
        acc = FingerprintAccumulator(names, seed=0) if fingerprint else None
        if fingerprint:
            self._fingerprint_acc = acc
        seen: dict[str, int] = {}
        start = time.perf_counter()
        workers = _check_workers(self.workers, f"{self.name}: workers")
        if workers > 1 and len(loaders) > 1 and _picklable(loaders, self.name):
            workers = min(workers, len(loaders))
            log.info("%s: reading %d cases in %d processes", self.name, len(loaders), workers)
            cases = _pool_cases(loaders, len(names), image_dtype, workers)
        else:
            cases = _lookahead(loaders)
        # a bar on a terminal (medseg.progress) replaces the per-case log lines
        bar = start_bar(len(loaders), f"build {self.name}", unit="case")
        cases = _counted(cases, bar)
        # no enumerate(): its cached result tuple would keep the previous case alive
        index = -1
        for record in cases:
            index += 1
            if record.case_id in seen:
                raise ValueError(
                    f"{self.name}: case id {record.case_id!r} of case {index + 1} "
                    f"({record.source or record.case_id}) repeats case {seen[record.case_id] + 1}"
                )
            seen[record.case_id] = index
            if not isinstance(record, _Case):  # read here, not checked by a worker
                record = _checked_case(record, len(names), image_dtype)
            image, label, spacing = record.image, record.label, record.spacing
            if acc is not None and record.labelled:
                acc.add(image, label, spacing)
            if not bar.active and not is_quiet():
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
                "affine": record.affine,
                "case_id": record.case_id,
            }
            # drop this case before the next is taken from the lookahead, so at most two
            # cases (this one being written, the next being read) are alive at once
            del record, image, label
            yield index, example
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

    # set by medseg.datasets.beam when imported: (builder, generators, download_config)
    beam_split_writer = None

    def _generate_splits(self, dl_manager, download_config):
        generators = self._nonempty_splits(dl_manager)
        if download_config.beam_options is not None or download_config.beam_runner is not None:
            # a Beam pipeline reads and writes the cases (medseg build --beam); the Beam
            # module plugs itself in when imported, so the builder never imports Beam
            if CaseBuilder.beam_split_writer is None:
                raise ValueError(
                    f"{self.info.full_name}: beam_options given, but the Beam build is not "
                    "loaded: import medseg.datasets.beam first, or build with "
                    "medseg.datasets.prepare(..., beam_options=...) / medseg build --beam"
                )
            return CaseBuilder.beam_split_writer(self, generators, download_config)
        if self.info.file_format != tfds.core.FileFormat.TFRECORD:
            # TFDS's writer asks _split_generators itself: answer with the kept splits
            with tfds.core.utils.temporary_assignment(
                self, "_split_generators", lambda dl_manager: generators
            ):
                return super()._generate_splits(dl_manager, download_config)
        # each case goes straight into its shard (medseg.datasets.records) instead of
        # through TFDS's shuffler, which buffers whole volumes and writes them twice
        infos = []
        for split, generator in generators.items():
            examples = (example for _, example in generator)
            if download_config.max_examples_per_split is not None:
                examples = itertools.islice(examples, download_config.max_examples_per_split)
            template = self._get_filename_template(split_name=split)
            infos.append(write_split(examples, self.info.features, template, split))
        return infos

    def _nonempty_splits(self, dl_manager) -> dict:
        """The subclass's split generators without the splits that have no cases.

        TFDS fails a split that yields nothing, and only once the splits before it are
        written (hours, for KiTS19); the case counts are known beforehand, so an empty
        split is left out here, or refused when it is the one fingerprinted.

        Raises
        ------
        ValueError
            If the fingerprinted (training) split, or every split, has no cases.
        """
        generators = dict(self._split_generators(dl_manager))
        empty = [
            split
            for split, generator in generators.items()
            if isinstance(generator, CaseExamples) and not len(generator)
        ]
        where = self.info.full_name
        for split in empty:
            if generators[split].fingerprint or len(empty) == len(generators):
                raise ValueError(
                    f"{where}: split {split!r} has no cases, so there is nothing to build; "
                    "check the source data (manual_dir, or the config's folder and patterns)"
                )
        for split in empty:
            log.info("%s: split %r has no cases; it is left out of the dataset", where, split)
            del generators[split]
        return generators

    def _download_and_prepare(self, dl_manager, download_config):
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


def _counted(cases: Iterator, bar) -> Iterator:
    """``cases``, advancing ``bar`` once each case is consumed (written), closing it at the end.

    No ``for`` loop: its variable would hold the previous case while the next one loads.
    """
    cases = iter(cases)
    try:
        while True:
            try:
                record = next(cases)
            except StopIteration:
                return
            bar.set_postfix_str(str(record.case_id), refresh=False)
            yield record
            del record
            bar.update()
    finally:
        bar.close()


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


class _Case(NamedTuple):
    """One case checked and cast as it is written (``label`` empty when unlabelled)."""

    case_id: str
    source: str
    image: np.ndarray
    label: np.ndarray
    labelled: bool
    spacing: np.ndarray
    affine: np.ndarray


def _checked_case(record, num_classes: int, image_dtype, contiguous: bool = False) -> _Case:
    """A loaded :class:`~medseg.io.CaseRecord` range-checked and cast to the features'
    dtypes; with ``contiguous``, its volumes in C order (what the records store)."""
    source = record.source or record.case_id
    image = record.image
    if image_dtype is not None:
        image = _cast_checked(image, image_dtype, source)
    label = record.label
    if label is None:
        label = np.zeros(NO_LABEL_SHAPE, np.uint8)
    else:
        _check_labels(label, num_classes, source)
        label = label.astype(np.uint8, copy=False)
    if contiguous:
        # done by the worker, this is most of the writer's serialisation (NIfTI volumes
        # are Fortran-ordered); the writer then only joins the bytes
        image, label = _c_order(image), _c_order(label)
    return _Case(
        record.case_id,
        source,
        image,
        label,
        record.label is not None,
        # the spacing exactly as stored, so a fingerprint recomputed from the records
        # equals this one
        np.asarray(record.spacing, np.float32),
        np.asarray(record.affine, np.float64),
    )


def _c_order(array: np.ndarray) -> np.ndarray:
    """``array`` in C order (itself if it is already)."""
    if array.flags.c_contiguous:
        return array
    out = np.empty(array.shape, array.dtype)
    _copy_c_order(array, out)
    return out


def _copy_c_order(array: np.ndarray, out: np.ndarray) -> None:
    """Copy ``array`` into the C-contiguous ``out`` of its shape and dtype.

    A Fortran-ordered volume (as NIfTI readers return it) is walked in tiles spanning
    axis 0 (contiguous in ``array``) and the last axis (contiguous in ``out``): each tile
    reads whole cache lines of one and writes whole lines of the other, ~2x faster than
    one ``np.copyto`` or slabs along axis 1 (128x512x512 int16: 95 ms against 200 ms).
    """
    if array.flags.c_contiguous or array.ndim < 2:
        np.copyto(out, array)
        return
    rows = max(1, 128 // array.itemsize)  # two 64-byte cache lines of axis 0
    cols = 16
    for start in range(0, array.shape[0], rows):
        source, target = array[start : start + rows], out[start : start + rows]
        for col in range(0, array.shape[-1], cols):
            target[..., col : col + cols] = source[..., col : col + cols]


def _check_workers(workers, where: str) -> int:
    """``workers`` as an int >= 1, or a ValueError naming ``where``."""
    if isinstance(workers, bool) or not isinstance(workers, int | np.integer) or workers < 1:
        raise ValueError(
            f"{where} must be a whole number of processes >= 1, got {workers!r} "
            "(1 builds in this process; the default is one per core)"
        )
    return int(workers)


def _picklable(loaders: list[Callable[[], Any]], name: str) -> bool:
    """Whether every loader can be sent to a worker process (a lambda cannot)."""
    try:
        pickle.dumps(loaders)
    except (pickle.PicklingError, AttributeError, TypeError) as err:
        log.info("%s: cases are read in this process (loaders cannot be pickled: %s)", name, err)
        return False
    return True


# niceness of the pool processes: this one's fingerprinting and writing is the build's
# serial path, and with as many workers as cores it would otherwise get only a share of
# one; the workers are ahead anyway (cases wait for it in shared memory)
WORKER_NICENESS = 10


def _lower_priority() -> None:
    """Run in each pool process as it starts: yield the CPU to the writing process."""
    try:
        os.nice(WORKER_NICENESS)
    except (AttributeError, OSError):  # no os.nice (Windows), or not permitted
        pass


def _describe(loader: Callable[[], Any]) -> str:
    """The files (or arguments) a loader reads, for an error raised before it returns."""
    if isinstance(loader, functools.partial):
        return ", ".join(str(arg) for arg in loader.args if arg is not None) or repr(loader)
    return repr(loader)


# shared memory blocks of a build's pool are named this, its process id and "_" (short:
# macOS allows 31 characters), so a block left by a killed build can be told apart
BLOCK_PREFIX = "medseg"


def block_prefix(pid: int | None = None) -> str:
    """The name prefix of the shared memory blocks of the build in process ``pid``
    (default this one); on Linux they show as ``/dev/shm/<prefix>*`` while in use."""
    return f"{BLOCK_PREFIX}{os.getpid() if pid is None else pid}_"


class _SharedCase(NamedTuple):
    """A checked case whose C-ordered volumes wait in a shared memory block: what a pool
    process returns instead of the volumes, so they do not go through a pipe pickled.

    The block holds the image at offset 0 and the label right after it.
    """

    case_id: str
    source: str
    labelled: bool
    spacing: np.ndarray
    affine: np.ndarray
    block: str
    image_shape: tuple
    image_dtype: str
    label_shape: tuple


def _load_in_worker(
    loader: Callable[[], Any], num_classes: int, image_dtype, prefix: str = BLOCK_PREFIX
):
    """Run in a pool process: load and check one case, its volumes put in shared memory.

    Returns a :class:`_SharedCase`, or the :class:`_Case` itself (C-ordered, pickled on
    the way back) when no shared memory block can be had. An exception that could not
    travel back to the parent (unpicklable, or losing its message on the way) is
    replaced by a ValueError with the same text, so the parent reports the case's error,
    not a pickling one.
    """
    try:
        return _to_shared(_checked_case(loader(), num_classes, image_dtype), prefix)
    except Exception as err:
        try:
            copy = pickle.loads(pickle.dumps(err))
            travels = str(copy) == str(err) and type(copy) is type(err)
        except Exception:  # noqa: BLE001 - any failure means it cannot travel
            travels = False
        if travels:
            raise
        raise ValueError(f"{type(err).__name__}: {err}") from None


def _to_shared(case: _Case, prefix: str) -> _SharedCase | _Case:
    """``case`` with its volumes copied, in C order, into a new shared memory block.

    The block, named ``prefix`` and a random suffix, is left for the parent to unlink
    (:func:`_from_shared`), and removed here if anything fails before it is handed
    over. With shared memory full or missing, the case is returned C-ordered instead.
    """
    size = case.image.nbytes + case.label.nbytes
    try:
        block = _new_block(prefix, size)
    except (OSError, ValueError):  # no shared memory here, or none left
        return case._replace(image=_c_order(case.image), label=_c_order(case.label))
    try:
        try:
            _reserve(block, size)
        except OSError:
            block.close()
            block.unlink()
            return case._replace(image=_c_order(case.image), label=_c_order(case.label))
        image = np.ndarray(case.image.shape, case.image.dtype, buffer=block.buf)
        _copy_c_order(case.image, image)
        if case.label.size:
            label = np.ndarray(case.label.shape, np.uint8, buffer=block.buf, offset=image.nbytes)
            _copy_c_order(case.label, label)
            del label
        del image  # close() refuses while arrays still view the block
        block.close()
    except BaseException:
        block.unlink()  # first: close() below fails while a view of the block is alive
        try:
            block.close()
        except BufferError:
            pass  # unmapped when the failed copy's arrays are freed
        raise
    # the parent unlinks it; if this process's resource tracker kept it, it would also
    # unlink it (and warn of a leak) when the pool ends
    resource_tracker.unregister(block._name, "shared_memory")  # noqa: SLF001
    return _SharedCase(
        case.case_id,
        case.source,
        case.labelled,
        case.spacing,
        case.affine,
        block.name,
        case.image.shape,
        case.image.dtype.str,
        case.label.shape,
    )


def _new_block(prefix: str, size: int) -> shared_memory.SharedMemory:
    """A new shared memory block of ``size`` bytes named ``prefix`` + 8 hex digits."""
    while True:
        try:
            return shared_memory.SharedMemory(prefix + secrets.token_hex(4), True, size)
        except FileExistsError:
            continue


def _reserve(block: shared_memory.SharedMemory, size: int) -> None:
    """Allocate ``block``'s pages now: a full ``/dev/shm`` then raises OSError (ENOSPC)
    here instead of killing the process with SIGBUS on the first write to a missing page."""
    fd = getattr(block, "_fd", -1)
    if fd >= 0 and hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)


class _Mapped:
    """One volume inside a mapped shared memory block, for ``np.asarray``.

    The array numpy builds from this keeps it as its base, and so the block mapped until
    the array is freed (the block's name is unlinked already): no explicit close, which
    would fail while any array still used the memory.
    """

    def __init__(self, block: shared_memory.SharedMemory, address: int, shape, dtype: str):
        self._block = block
        self.__array_interface__ = {
            "data": (address, False),
            "shape": tuple(shape),
            "typestr": dtype,
            "version": 3,
        }


def _from_shared(result: _SharedCase | _Case) -> _Case:
    """The :class:`_Case` a pool process returned, its volumes mapped from shared memory.

    The block's name is unlinked at once: its memory is freed when the case's arrays are.
    """
    if isinstance(result, _Case):
        return result
    block = shared_memory.SharedMemory(name=result.block)
    block.unlink()
    view = np.frombuffer(block.buf, np.uint8)
    address = view.ctypes.data
    del view  # no buffer export left on the block (its close() would refuse)
    image = np.asarray(_Mapped(block, address, result.image_shape, result.image_dtype))
    if math.prod(result.label_shape):
        label = np.asarray(_Mapped(block, address + image.nbytes, result.label_shape, "|u1"))
    else:
        label = np.zeros(result.label_shape, np.uint8)
    return _Case(
        result.case_id, result.source, image, label, result.labelled, result.spacing, result.affine
    )


def _discard(future) -> None:
    """Unlink the shared memory block of a pool result that will not be used."""
    if not future.done() or future.cancelled() or future.exception() is not None:
        return
    result = future.result()
    if isinstance(result, _SharedCase):
        try:
            block = shared_memory.SharedMemory(name=result.block)
        except FileNotFoundError:
            return
        block.close()
        block.unlink()


# cases this process reads itself while the pool starts: ``submit`` waits for the
# forkserver to import the loaders' modules (~1 s), and the first pooled case arrived 1.7 s
# into a 13.5 s build of 20 KiTS-sized cases; read here, the first writes start at once
HEAD_CASES = 2


def _read_checked(loader: Callable[[], Any], num_classes: int, image_dtype) -> _Case:
    """Load and check one case in this process, C-ordered like a pool process's."""
    return _checked_case(loader(), num_classes, image_dtype, contiguous=True)


def _pool_cases(
    loaders: list[Callable[[], Any]], num_classes: int, image_dtype, workers: int
) -> Iterator[_Case]:
    """Yield every loader's checked case, in order, loaded by ``workers`` processes.

    The first :data:`HEAD_CASES` are read by a thread of this process while the pool
    starts; the rest by the pool. At most ``workers + 2`` cases are being loaded or
    waiting while the caller holds one. The processes come from a ``forkserver``
    (TensorFlow's threads in this process make ``fork`` unsafe) that imports the
    loaders' modules once, and run at a lower priority (:data:`WORKER_NICENESS`) than
    this one, whose writing is the serial part. Each puts its case's volumes, in C
    order, into a shared memory block named :func:`block_prefix` (not through the pipe:
    pickling ~100 MB per case cost as much CPU as reading it); this process maps it and
    unlinks its name at once.

    A loader's exception is raised, with its class and message, when its case is
    reached; a worker that dies (e.g. killed for memory) is reported naming its case's
    files. Pending loads are cancelled, the blocks of cases loaded but not taken
    unlinked, and the processes ended when the caller stops early or fails.
    """
    head = min(HEAD_CASES, len(loaders))
    context = multiprocessing.get_context("forkserver")
    modules = {getattr(getattr(f, "func", f), "__module__", None) for f in loaders}
    context.set_forkserver_preload(sorted(m for m in modules | {__name__} if m))
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_lower_priority)
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medseg-load")
    starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medseg-pool-start")
    local = deque(
        reader.submit(_read_checked, loaders[i], num_classes, image_dtype) for i in range(head)
    )
    pending: deque = deque()
    submitted = head
    prefix = block_prefix()

    def top_up():
        # the case waited for, and workers + 1 after it (the cases read here count): a
        # process done early starts the next case while this one is written
        nonlocal submitted
        while submitted < len(loaders) and len(pending) + len(local) < workers + 2:
            future = pool.submit(
                _load_in_worker, loaders[submitted], num_classes, image_dtype, prefix
            )
            pending.append(future)
            submitted += 1

    # in a thread, so this one writes the cases read here while the processes start
    started = starter.submit(top_up) if submitted < len(loaders) else None
    try:
        for index in range(len(loaders)):
            if local:
                case = local[0].result()
                local.popleft()
                yield case
                del case
                continue
            if started is not None:
                started.result()  # the pool's first submissions (and their errors)
                started = None
            top_up()
            try:
                # left in ``pending`` until taken: its block is unlinked if this fails
                result = pending[0].result()
            except BrokenProcessPool as err:
                raise RuntimeError(
                    f"a build worker process died while reading case {index + 1} "
                    f"({_describe(loaders[index])}), e.g. killed for lack of memory; "
                    "retry with fewer workers (--workers 1 reads in this process)"
                ) from err
            pending.popleft()
            case = _from_shared(result)
            del result
            yield case
            del case
    finally:
        for future in local:
            future.cancel()
        local.clear()  # a read still running finishes; its case is dropped
        reader.shutdown(wait=True)
        starter.shutdown(wait=True)  # ``pending`` is this thread's alone from here
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        # loaded but never taken (stopped early, or an earlier case failed)
        for future in pending:
            _discard(future)


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
