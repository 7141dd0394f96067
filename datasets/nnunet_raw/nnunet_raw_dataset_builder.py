"""nnunet_raw: an nnU-Net v2 raw dataset folder as a medseg TFDS dataset.

The config is the dataset's ``dataset.json``; nothing is downloaded::

    medseg build nnunet_raw --config /data/nnUNet_raw/Dataset001_Kidney/dataset.json

or ``data.dataset=nnunet_raw data.config=/data/.../dataset.json``. The layout is
nnU-Net's: ``imagesTr/<case>_<XXXX><file_ending>`` (one file per channel of
``channel_names``), ``labelsTr/<case><file_ending>``, optional ``imagesTs/`` (an unlabelled
``test`` split). Channels become a channels-last ``(D, H, W, C)`` image.

Regions: a region-based ``dataset.json`` (a label mapped to a list, e.g.
``"whole_tumor": [1, 2, 3]``) is trained on its integer label values ``0 .. K-1`` with
medseg's softmax (not nnU-Net's sigmoid per region); its regions are stored with the
dataset (``REGIONS``, ``metadata.json``) and scored as unions of the label values by
``medseg score --labels dataset.json``. ``regions_class_order`` is not needed for that
and is ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import tensorflow_datasets as tfds

from medseg.datasets.builder import CaseBuilder, case_features
from medseg.evaluation.scoring import NNUNET_FILE_ENDINGS, labels_from_dataset_json
from medseg.io import MedsegIOError, read_nifti
from medseg.io.case import read_channel_case
from medseg.io.jsonfile import read_json
from medseg.io.nifti import AFFINE_ATOL_MM

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
# modalities planning normalises as CT (Hounsfield units): stored as int16
_CT = ("CT",)


@dataclasses.dataclass(eq=False)
class NnunetRawConfig(tfds.core.BuilderConfig):
    """An nnU-Net v2 raw dataset, as read from its ``dataset.json``.

    Attributes
    ----------
    dataset_json : str
        The ``dataset.json`` file; its folder holds ``imagesTr``, ``labelsTr``.
    class_names : tuple of str
        Names of the label values ``0 .. K-1``.
    regions : dict of str to list of int
        nnU-Net regions (unions of label values), empty for a label-based dataset; a
        one-value region named as its label is that class and is left out.
    modalities : tuple of str
        ``channel_names`` in channel order.
    file_ending : str
        ``".nii.gz"`` or ``".nii"``.
    """

    dataset_json: str = ""
    class_names: tuple[str, ...] = ()
    regions: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    modalities: tuple[str, ...] = ()
    file_ending: str = ".nii.gz"

    @property
    def root(self) -> Path:
        return Path(self.dataset_json).parent

    @property
    def image_dtype(self) -> str:
        return "int16" if tuple(self.modalities) == _CT else "float32"


def read_dataset_json(path) -> NnunetRawConfig:
    """The config of the nnU-Net raw dataset whose ``dataset.json`` is ``path``.

    Raises
    ------
    ValueError
        Naming the file: missing ``channel_names``, bad ``labels`` (see
        :func:`medseg.evaluation.scoring.labels_from_dataset_json`), or a ``file_ending``
        medseg cannot read.
    FileNotFoundError
        The file does not exist.
    """
    path = Path(path).expanduser().resolve()
    meta = read_json(path, "nnU-Net dataset.json")
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: not an nnU-Net dataset.json (expected a JSON object)")
    # nnU-Net v1 / MSD files call it "modality"
    channels = meta.get("channel_names", meta.get("modality"))
    if not isinstance(channels, dict) or not channels:
        raise ValueError(f"{path}: no 'channel_names' object (e.g. {{\"0\": \"CT\"}})")
    if sorted(channels, key=int) != [str(i) for i in range(len(channels))]:
        raise ValueError(
            f"{path}: channel_names keys {sorted(channels)} must be \"0\" .. "
            f"\"{len(channels) - 1}\""
        )
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in NNUNET_FILE_ENDINGS:
        raise ValueError(
            f"{path}: file_ending {ending!r} is not supported: medseg reads "
            f"{' and '.join(NNUNET_FILE_ENDINGS)}; convert the images to NIfTI "
            "(e.g. SimpleITK.WriteImage) and set file_ending to \".nii.gz\""
        )
    class_names, regions = labels_from_dataset_json(path)
    # a one-value region named as its label ("tumor": 2) is that class: scored once
    regions = {
        k: v for k, v in regions.items() if not (len(v) == 1 and class_names[v[0]] == k)
    }
    # TFDS config names: the folder (Dataset001_Kidney) lowercased, without other symbols
    name = re.sub(r"[^a-z0-9_]", "_", path.parent.name.lower()) or "dataset"
    return NnunetRawConfig(
        name=name,
        description=f"nnU-Net raw dataset {path.parent}",
        dataset_json=str(path),
        class_names=tuple(class_names),
        regions=regions,
        modalities=tuple(str(channels[str(i)]) for i in range(len(channels))),
        file_ending=ending,
    )


class Builder(CaseBuilder):
    """DatasetBuilder for an nnU-Net v2 raw dataset (``DatasetXXX_Name``)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # every dataset is a user's: the config comes from its dataset.json
    BUILDER_CONFIGS: list[NnunetRawConfig] = []

    @staticmethod
    def config_from_file(path) -> NnunetRawConfig:
        """The config of ``medseg build nnunet_raw --config .../dataset.json``."""
        return read_dataset_json(path)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # an instance attribute shadows CaseBuilder's class one, as in msd
        self.REGIONS = {k: list(v) for k, v in self._config.regions.items()}

    @property
    def _config(self) -> NnunetRawConfig:
        config = self.builder_config
        if not isinstance(config, NnunetRawConfig):
            raise ValueError(
                "nnunet_raw needs the dataset's dataset.json: "
                "medseg build nnunet_raw --config /path/DatasetXXX_Name/dataset.json"
            )
        return config

    def class_names(self) -> list[str]:
        return list(self._config.class_names)

    def modalities(self) -> list[str]:
        return list(self._config.modalities)

    def _info(self) -> tfds.core.DatasetInfo:
        config = self._config
        channels = len(config.modalities) if len(config.modalities) > 1 else None
        return self.dataset_info_from_configs(
            features=case_features(np.dtype(config.image_dtype), channels=channels),
            supervised_keys=("image", "label"),
            homepage="https://github.com/MIC-DKFZ/nnUNet",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """``train`` from imagesTr/labelsTr, ``test`` (unlabelled) from imagesTs."""
        del dl_manager  # the data is already on disk
        config = self._config
        dtype = np.dtype(config.image_dtype)
        train = find_cases(config, "imagesTr", "labelsTr")
        test = find_cases(config, "imagesTs", None) if (config.root / "imagesTs").is_dir() else []
        return {
            "train": self._generate_cases(train, fingerprint=True, image_dtype=dtype),
            "test": self._generate_cases(test, fingerprint=False, image_dtype=dtype),
        }


def find_cases(config: NnunetRawConfig, images: str, labels: str | None) -> list:
    """Loaders of every case of ``root/images``, each checked to have all its channels.

    Raises
    ------
    FileNotFoundError
        The folder has no images, a case misses a channel file or its label (naming the
        expected file).
    ValueError
        A file with another channel than ``channel_names`` declares.
    """
    folder = config.root / images
    ending = config.file_ending
    if not folder.is_dir():
        raise FileNotFoundError(f"nnunet_raw: folder {folder} does not exist")
    files = sorted(
        p for p in folder.iterdir() if p.name.endswith(ending) and not p.name.startswith((".", "_"))
    )
    if not files:
        raise FileNotFoundError(f"nnunet_raw: no *{ending} images in {folder}")
    num_channels = len(config.modalities)
    cases: dict[str, dict[int, Path]] = {}
    for path in files:
        match = _CHANNEL.match(path.name[: -len(ending)])
        if match is None:
            raise ValueError(
                f"nnunet_raw: {path} is not named <case>_<XXXX>{ending} (XXXX: the 4-digit "
                f"channel of {config.dataset_json})"
            )
        channel = int(match["channel"])
        if channel >= num_channels:
            raise ValueError(
                f"nnunet_raw: {path} is channel {channel}, but {config.dataset_json} declares "
                f"{num_channels} channel(s) in channel_names; remove it or declare it"
            )
        cases.setdefault(match["case"], {})[channel] = path
    loaders = []
    for case, channels in cases.items():
        missing = [folder / f"{case}_{c:04d}{ending}" for c in range(num_channels) if c not in channels]
        if missing:
            raise FileNotFoundError(
                f"nnunet_raw: case {case!r} misses channel file {missing[0]} "
                f"({num_channels} channels in {config.dataset_json})"
            )
        label = None
        if labels is not None:
            label = config.root / labels / f"{case}{ending}"
            if not label.is_file():
                raise FileNotFoundError(f"nnunet_raw: case {case!r} has no label: expected {label}")
        paths = [channels[c] for c in range(num_channels)]
        loaders.append(functools.partial(read_channels, case, paths, label, config))
    return loaders


def read_channels(case: str, paths: list[Path], label: Path | None, config: NnunetRawConfig):
    """One case: its channel files stacked channels-last, and its label.

    Every file's shape and affine are compared from the headers before any volume is
    read; label values must be declared in ``dataset.json``.
    """
    headers = [(p, nib.load(p)) for p in [*paths, *([label] if label is not None else [])]]
    first, ref = headers[0]
    for path, img in headers[1:]:
        if img.shape[:3] != ref.shape[:3]:
            raise MedsegIOError(
                f"nnunet_raw: case {case!r}: {path} has shape {img.shape[:3]} but {first} has "
                f"{ref.shape[:3]}; every channel and the label must share one grid"
            )
        if not np.allclose(img.affine, ref.affine, atol=AFFINE_ATOL_MM):
            diff = float(np.abs(img.affine - ref.affine).max())
            raise MedsegIOError(
                f"nnunet_raw: case {case!r}: {path} has another affine than {first} (max "
                f"difference {diff:.4g} mm); every channel and the label must share one grid"
            )
    del headers
    # the channels stacked channels-last by the reader medseg predict uses for these files
    record = read_channel_case(case, paths)
    label_array = None
    if label is not None:
        raw, _, _ = read_nifti(label)
        raw = raw[..., 0] if raw.ndim == 4 else raw
        values = np.unique(raw)
        declared = len(config.class_names)
        bad = [v.item() for v in values if v < 0 or v >= declared or v != np.round(v)]
        if bad:
            raise MedsegIOError(
                f"nnunet_raw: {label}: label values {bad} are not declared in 'labels' of "
                f"{config.dataset_json} (declared 0..{declared - 1}); declare or remove them"
            )
        label_array = raw.astype(np.uint8)
    record.label = label_array
    record.source = ", ".join(str(p) for p in [*paths, *([label] if label else [])])
    return record
