"""The library side of medseg's datasets: find, build and describe TFDS builders.

The builders themselves live in the ``medseg_datasets`` package (the repository's
``datasets/`` folder); importing a builder's module registers it with TFDS.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
import sys
from pathlib import Path

import tensorflow_datasets as tfds

try:
    import fcntl
except ImportError:  # not POSIX: builds are not serialised
    fcntl = None

from medseg.datasets.fingerprint import Fingerprint, FingerprintAccumulator, fingerprint_hash

__all__ = [
    "KNOWN_DATASETS",
    "FingerprintAccumulator",
    "build_lock",
    "build_lock_path",
    "Fingerprint",
    "fingerprint_hash",
    "get_builder",
    "prepare",
    "modalities",
    "read_fingerprint",
]

# dataset name -> module whose import registers the builder with TFDS
KNOWN_DATASETS: dict[str, str] = {
    "kits_phantom": "medseg_datasets.kits_phantom",
    "nifti_folder": "medseg_datasets.nifti_folder",
    "aal_colin27": "medseg_datasets.aal_colin27",
    "kits19": "medseg_datasets.kits19",
    "msd": "medseg_datasets.msd",
    "nnunet_raw": "medseg_datasets.nnunet_raw",
}


def get_builder(
    name: str, config: str | None = None, data_dir: str | None = None
) -> tfds.core.DatasetBuilder:
    """The TFDS builder of a known dataset (not built by this call).

    Parameters
    ----------
    name : str
        A key of :data:`KNOWN_DATASETS`.
    config : str, optional
        Builder config name; None means the builder's default config. For builders of
        users' own data (``nifti_folder``), a path to a ``.json`` config file.
    data_dir : str, optional
        TFDS data dir; None means TFDS's default (``~/tensorflow_datasets``).

    Returns
    -------
    tfds.core.DatasetBuilder

    Raises
    ------
    ValueError
        If ``name`` is not a known dataset or ``config`` not one of its configs; the
        message lists the valid choices.
    """
    if name not in KNOWN_DATASETS:
        known = ", ".join(sorted(KNOWN_DATASETS))
        raise ValueError(f"unknown dataset {name!r}; known datasets: {known}")
    importlib.import_module(KNOWN_DATASETS[name])
    builder_cls = tfds.builder_cls(name)
    config_from_file = getattr(builder_cls, "config_from_file", None)
    if config is not None and config.endswith(".json") and config_from_file is not None:
        # a user's own dataset (e.g. nifti_folder) is described by a config file
        return builder_cls(config=config_from_file(config), data_dir=data_dir)
    if config is not None and config not in builder_cls.builder_configs:
        configs = ", ".join(builder_cls.builder_configs) or "(none)"
        raise ValueError(f"dataset {name!r} has no config {config!r}; its configs: {configs}")
    full_name = f"{name}/{config}" if config is not None else name
    return tfds.builder(full_name, data_dir=data_dir)


def prepare(
    name: str,
    config: str | None = None,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    workers: int = 1,
    beam_options=None,
) -> tfds.core.DatasetBuilder:
    """:func:`get_builder`, then build the dataset unless it is already built.

    Builds with ``download_and_prepare`` (the ``tfds build`` CLI would need
    apache-beam). ``manual_dir`` is where a manually downloaded dataset (``kits19``,
    ``msd``) lies. ``workers`` processes read the cases (``medseg build`` uses one per
    core); 1 reads them in this process. The records and the fingerprint do not depend
    on it. As with any ``multiprocessing`` use, a script calling this with ``workers``
    above 1 needs the ``if __name__ == "__main__":`` guard (the workers import it).

    Concurrent calls for one unbuilt dataset (``medseg tune --workers N``, two
    ``medseg build``) build it once: the build holds :func:`build_lock`, the others wait
    for it (printing one line) and then read what it built.

    ``beam_options`` (Beam's flags, a string such as ``"--runner=DirectRunner
    --direct_num_workers=2"`` or a list; ``""`` for Beam's defaults) builds with an
    Apache Beam pipeline instead (:mod:`medseg.datasets.beam`, ``pip install
    'medseg[beam]'``): the same records and fingerprint, on any Beam runner; ``workers``
    is then not used (the runner's flags set its parallelism).

    Returns
    -------
    tfds.core.DatasetBuilder
        A builder whose dataset is ready for ``as_dataset`` and :func:`read_fingerprint`.

    Raises
    ------
    ValueError
        If ``workers`` is not a whole number >= 1 (checked before anything is read).
    medseg.config.ConfigError
        If ``beam_options`` is given but Apache Beam is not installed, or its flags or
        runner are unusable (checked before anything is read).
    """
    from medseg.datasets.builder import _check_workers

    workers = _check_workers(workers, "prepare(workers=...) / medseg build --workers")
    if beam_options is not None:
        from medseg.datasets.beam import pipeline_options

        beam_options = pipeline_options(
            beam_options, "prepare(beam_options=...) / medseg build --beam-options"
        )
    builder = get_builder(name, config=config, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    with build_lock(builder):
        if builder.is_prepared():
            # built by the process we waited for; a fresh builder reads its dataset info
            return get_builder(name, config=config, data_dir=data_dir)
        # read by CaseBuilder's case loop (a plain TFDS builder has no use for it)
        builder.workers = workers
        download_config = None
        if manual_dir is not None or beam_options is not None:
            download_config = tfds.download.DownloadConfig(
                manual_dir=None if manual_dir is None else str(manual_dir),
                beam_options=beam_options,
            )
        try:
            builder.download_and_prepare(download_config=download_config)
        except AssertionError as err:
            if "Manual directory" not in str(err):
                raise
            # TFDS asserts; a missing manual download is the user's to fix, so say how
            raise FileNotFoundError(
                f"{name}: the manually downloaded data was not found "
                f"(give its folder with --manual-dir / manual_dir=). {err}"
            ) from None
    return builder


def build_lock_path(builder: tfds.core.DatasetBuilder) -> Path:
    """The lock file of a builder's dataset: ``<data dir>/<name>/<config>/<version>.lock``.

    It lies beside the version folder TFDS builds, outside it (TFDS builds in a
    temporary folder and renames it into place), and stays after the build: removing
    it could let a waiting process lock a file a newcomer no longer sees.
    """
    data_path = Path(os.fspath(builder.data_path))
    return data_path.with_name(f"{data_path.name}.lock")


@contextlib.contextmanager
def build_lock(builder: tfds.core.DatasetBuilder):
    """Hold the exclusive lock of a builder's dataset (:func:`build_lock_path`).

    A process holding it is building that dataset; another waits, printing one line
    to stderr, until it is released. The lock is an ``fcntl.flock``: the kernel releases
    it when its process dies, so a killed build never blocks the next. Without
    ``fcntl`` (not POSIX), or for a data dir that is not a local path (``gs://``),
    nothing is locked.
    """
    if fcntl is None or "://" in os.fspath(builder.data_path):
        yield
        return
    path = build_lock_path(builder)
    path.parent.mkdir(parents=True, exist_ok=True)
    # "a+": opening never truncates what the holder wrote
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            print(
                f"medseg: waiting for {holder} building {builder.info.full_name} (lock {path})",
                file=sys.stderr,
                flush=True,
            )
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            # who holds it, for the waiting line of the next process
            handle.truncate(0)
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_fingerprint(builder: tfds.core.DatasetBuilder) -> Fingerprint:
    """The fingerprint stored with a built dataset, read without reading any record.

    TFDS keeps ``builder.info.metadata`` as ``metadata.json`` beside
    ``dataset_info.json`` in the dataset dir; the builder puts the fingerprint there.

    Parameters
    ----------
    builder : tfds.core.DatasetBuilder
        A builder of a built dataset.

    Returns
    -------
    Fingerprint
        The fingerprint (see :class:`FingerprintAccumulator`), a dict with typed accessors.

    Raises
    ------
    FileNotFoundError
        If the dataset has no stored fingerprint (not built, or built by a builder that
        does not record one); the message names the dataset dir.
    """
    # `info.metadata` (not a held reference) makes TFDS load metadata.json lazily
    metadata = builder.info.metadata
    fingerprint = metadata.get("fingerprint") if metadata is not None else None
    if fingerprint is None:
        state = "is built" if builder.is_prepared() else "is not built"
        raise FileNotFoundError(
            f"no fingerprint stored for dataset {builder.info.full_name} in "
            f"{builder.data_dir} (the dataset {state}; a built dataset keeps it in "
            f"metadata.json; rebuild it with medseg.datasets.prepare)"
        )
    return Fingerprint.of(
        dict(fingerprint), where=f"fingerprint of {builder.info.full_name} in {builder.data_dir}"
    )


def modalities(builder: tfds.core.DatasetBuilder) -> tuple[str, ...]:
    """The image channels' modalities of a builder (``("CT",)``, ``("T1",)``, ...).

    A builder that does not say (``"unknown"``, or a generic name such as ``"image"``)
    is taken as CT when its stored foreground intensities look like Hounsfield units
    (0.5 % percentile below -200), else as an MR-like modality.
    """
    names = list(builder.modalities()) if hasattr(builder, "modalities") else ["unknown"]
    if names in (["unknown"], ["image"]):
        stats = (builder.info.metadata or {}).get("fingerprint", {}).get("foreground_intensity")
        low = (stats or {}).get("percentile_00_5")
        if low is not None and low < -200:
            return ("CT",)
    return tuple(names)
