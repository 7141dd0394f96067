"""aal_colin27: the Colin27 T1 MRI template with the AAL atlas, from Debian's mricron-data.

Real anatomy that needs no download: Debian's ``mricron-data`` package installs the
Colin27 single-subject T1 (``ch2.nii.gz``) and the hand-drawn AAL atlas of 116 regions on
the same 1 mm grid (``aal.nii.gz``, region names in ``aal.nii.txt``) into
``/usr/share/mricron/templates``.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from medseg.datasets.builder import CaseBuilder, case_features

DEFAULT_SOURCE = Path("/usr/share/mricron/templates")
IMAGE_FILE = "ch2.nii.gz"
ATLAS_FILE = "aal.nii.gz"
NAMES_FILE = "aal.nii.txt"
CASE_ID = "colin27"

_INSTALL_HINT = (
    "install Debian's mricron-data package (sudo apt-get install mricron-data), which puts "
    f"{IMAGE_FILE}, {ATLAS_FILE} and {NAMES_FILE} into {DEFAULT_SOURCE}, or pass a folder "
    "holding them as tfds.download.DownloadConfig(manual_dir=...)"
)

# Lobes from AAL's own region codes (third column of aal.nii.txt): the thousands digit
# is the lobe in AAL's numbering, e.g. 2xxx frontal, 8xxx temporal, 9xxx cerebellum.
LOBE_NAMES = (
    "background",
    "frontal",
    "temporal",
    "parietal",
    "occipital",
    "insula_and_limbic",
    "subcortical",
    "cerebellum",
)
_LOBE_OF_CODE_GROUP = {
    2: "frontal",  # precentral, frontal gyri, rolandic operculum, SMA, olfactory, rectus
    3: "insula_and_limbic",  # insula
    4: "insula_and_limbic",  # cingulum, hippocampus, parahippocampal gyrus, amygdala
    5: "occipital",  # calcarine, cuneus, lingual, occipital gyri, fusiform
    6: "parietal",  # postcentral, parietal, supramarginal, angular, precuneus, paracentral
    7: "subcortical",  # caudate, putamen, pallidum, thalamus
    8: "temporal",  # Heschl, temporal gyri and poles
    9: "cerebellum",  # cerebellar hemispheres and vermis
}


@dataclasses.dataclass(eq=False)
class AalColin27Config(tfds.core.BuilderConfig):
    """How the 116 AAL regions are grouped into classes.

    Attributes
    ----------
    grouping : str
        ``"hemispheres"``, ``"lobes"`` or ``"all"``.
    """

    grouping: str = "all"


@dataclasses.dataclass(frozen=True)
class AalRegion:
    """One line of ``aal.nii.txt``: label value, name and AAL code."""

    value: int
    name: str
    code: int


def read_regions(path) -> list[AalRegion]:
    """The regions listed in ``aal.nii.txt`` (``value name code`` per line).

    Raises
    ------
    ValueError
        If a line does not parse or a value repeats; the message names the file and line.
    """
    regions = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        match = re.fullmatch(r"\s*(\d+)\s+(\S+)\s+(\d+)\s*", line)
        if match is None:
            raise ValueError(f"{path} line {number}: expected 'value name code', got {line!r}")
        regions.append(AalRegion(int(match[1]), match[2], int(match[3])))
    values = [r.value for r in regions]
    if len(set(values)) != len(values) or not regions:
        raise ValueError(f"{path}: no regions, or repeated region values")
    return regions


def class_mapping(grouping: str, regions: list[AalRegion]) -> tuple[list[str], np.ndarray]:
    """Class names and a lookup table from AAL label value to class index.

    Parameters
    ----------
    grouping : str
        ``"hemispheres"``: background, left (names ending ``_L``), right (``_R``); the
        vermis, a midline structure with no side, is background. ``"lobes"``: see
        :data:`LOBE_NAMES`, from the AAL code's thousands digit. ``"all"``: every region,
        numbered 1..116 in the order of its AAL value.
    regions : list of AalRegion
        From :func:`read_regions`.

    Returns
    -------
    names : list of str
    lut : np.ndarray
        ``(256,)`` uint8; ``lut[aal_value]`` is the class (unlisted values map to 0).
    """
    lut = np.zeros(256, np.uint8)
    if grouping == "hemispheres":
        names = ["background", "left", "right"]
        for region in regions:
            if region.name.endswith("_L"):
                lut[region.value] = 1
            elif region.name.endswith("_R"):
                lut[region.value] = 2
    elif grouping == "lobes":
        names = list(LOBE_NAMES)
        for region in regions:
            lobe = _LOBE_OF_CODE_GROUP.get(region.code // 1000)
            if lobe is None:
                raise ValueError(f"AAL region {region} has a code outside the known lobes")
            lut[region.value] = names.index(lobe)
    elif grouping == "all":
        ordered = sorted(regions, key=lambda r: r.value)
        names = ["background"] + [r.name for r in ordered]
        for index, region in enumerate(ordered, start=1):
            lut[region.value] = index
    else:
        raise ValueError(f"unknown grouping {grouping!r}; use hemispheres, lobes or all")
    return names, lut


class Builder(CaseBuilder):
    """DatasetBuilder for aal_colin27."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "Volumes stored uncompressed (raw bytes): builds ~3x faster, ~2x the disk.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTALL_HINT
    BUILDER_CONFIGS = [
        AalColin27Config(
            name="hemispheres",
            description="3 classes: background, left and right cerebral/cerebellar hemisphere.",
            grouping="hemispheres",
        ),
        AalColin27Config(
            name="lobes",
            description="8 classes: background, frontal, temporal, parietal, occipital, "
            "insula and limbic, subcortical grey matter, cerebellum.",
            grouping="lobes",
        ),
        AalColin27Config(
            name="all",
            description="117 classes: background and the 116 AAL regions.",
            grouping="all",
        ),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "hemispheres"

    def modalities(self) -> list[str]:
        return ["T1"]

    def class_names(self) -> list[str]:
        # the class names follow the AAL region list; "all" needs it read, the others not
        if self.builder_config.grouping == "all":
            return class_mapping("all", read_regions(self._source() / NAMES_FILE))[0]
        return class_mapping(self.builder_config.grouping, [])[0]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=case_features(np.int16),
            supervised_keys=("image", "label"),
            homepage="https://www.gin.cnrs.fr/en/tools/aal/",
        )

    def _download_and_prepare(self, dl_manager, download_config):
        # remember an explicit manual_dir, so a wrong one is named in the error rather than
        # silently replaced by the system folder
        self._manual_source = download_config.manual_dir if download_config else None
        super()._download_and_prepare(dl_manager, download_config)

    def _source(self) -> Path:
        resolved = getattr(self, "_resolved_source", None)
        if resolved is not None:
            return resolved
        given = getattr(self, "_manual_source", None)
        return Path(given).expanduser() if given else DEFAULT_SOURCE

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """One ``train`` split holding the single Colin27 case."""
        source = self._source()
        try:
            # a manual dir holding the atlas wins (tfds.testing points it at dummy_data)
            manual = Path(dl_manager.manual_dir)
            if (manual / ATLAS_FILE).is_file():
                source = manual
        except Exception:  # TFDS raises AssertionError for a missing or empty dir
            pass
        self._resolved_source = source
        missing = [f for f in (IMAGE_FILE, ATLAS_FILE, NAMES_FILE) if not (source / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"aal_colin27: {missing} not found in {source}; {_INSTALL_HINT}"
            )
        _, lut = class_mapping(self.builder_config.grouping, read_regions(source / NAMES_FILE))
        return {
            "train": self._generate_cases(
                [lambda: _load(source, lut)], fingerprint=True, image_dtype=np.int16
            )
        }


def _load(source: Path, lut: np.ndarray):
    from medseg.io import read_nifti_case

    # the atlas values are 0..116; 256 keeps any uint8 atlas inside the lookup table
    record = read_nifti_case(
        CASE_ID, str(source / IMAGE_FILE), str(source / ATLAS_FILE), num_classes=256
    )
    record.label = lut[np.asarray(record.label, dtype=np.uint8)]
    return record
