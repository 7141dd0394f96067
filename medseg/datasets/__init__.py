"""The library side of medseg's datasets: find, build and describe TFDS builders.

The builders themselves live in the ``medseg_datasets`` package (the repository's
``datasets/`` folder); importing a builder's module registers it with TFDS.
"""

from __future__ import annotations

import importlib

import tensorflow_datasets as tfds

from medseg.datasets.fingerprint import Fingerprint, FingerprintAccumulator, fingerprint_hash

__all__ = [
    "KNOWN_DATASETS",
    "FingerprintAccumulator",
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
) -> tfds.core.DatasetBuilder:
    """:func:`get_builder`, then build the dataset unless it is already built.

    Builds in-process with ``download_and_prepare`` (the ``tfds build`` CLI would need
    apache-beam). ``manual_dir`` is where a manually downloaded dataset (``kits19``,
    ``msd``) lies.

    Returns
    -------
    tfds.core.DatasetBuilder
        A builder whose dataset is ready for ``as_dataset`` and :func:`read_fingerprint`.
    """
    builder = get_builder(name, config=config, data_dir=data_dir)
    if not builder.is_prepared():
        download_config = None
        if manual_dir is not None:
            download_config = tfds.download.DownloadConfig(manual_dir=str(manual_dir))
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
