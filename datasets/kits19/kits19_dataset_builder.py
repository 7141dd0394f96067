"""kits19: the KiTS19 kidney and kidney-tumour CT challenge data, from a manual download."""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from medseg.datasets.builder import CaseBuilder, case_features
from medseg.io import MedsegIOError, read_nifti_case, spacing_from_affine

log = logging.getLogger(__name__)

_HOMEPAGE = "https://kits19.grand-challenge.org/"
CLASS_NAMES = ("background", "kidney", "tumour")
# KiTS19's cases 00000-00209 were released with segmentations; 00210-00299 are its test set
NUM_LABELLED = 210
IMAGE_FILE = "imaging.nii.gz"
LABEL_FILE = "segmentation.nii.gz"
# cases whose labels are commonly excluded for annotation problems (see README.md)
CLEAN_EXCLUDE = tuple(f"case_{i:05d}" for i in (15, 23, 37, 68, 125, 133))
_CASE_RE = re.compile(r"^case_(\d{5})$")


@dataclasses.dataclass(eq=False)
class Kits19Config(tfds.core.BuilderConfig):
    """Which KiTS19 cases a variant holds.

    Attributes
    ----------
    exclude : tuple of str
        Case ids (``"case_00015"``) left out of every split.
    """

    exclude: tuple[str, ...] = ()


class Builder(CaseBuilder):
    """DatasetBuilder for KiTS19 (manual download)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "Volumes stored uncompressed (raw bytes): builds ~3x faster, ~2x the disk.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    KiTS19's licence (CC BY-NC-SA 4.0) does not allow redistribution, so medseg never
    downloads or ships the data. Get it yourself:

        git clone https://github.com/neheller/kits19
        cd kits19 && python -m starter_code.get_imaging

    then point `manual_dir` at the clone's `data/` folder (the one holding
    `case_00000/imaging.nii.gz`, `case_00000/segmentation.nii.gz`, ...):

        medseg build kits19 --manual-dir /path/to/kits19/data

    or, from Python:

        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir="/path/to/kits19/data"))
    """
    BUILDER_CONFIGS = [
        Kits19Config(name="default", description="All cases."),
        Kits19Config(
            name="clean",
            description=(
                "All cases but 15, 23, 37, 68, 125 and 133, commonly excluded for label problems."
            ),
            exclude=CLEAN_EXCLUDE,
        ),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "default"
    # KiTS19's official "kidney" score is of kidney and tumour together (label > 0)
    REGIONS = {"kidney_and_tumour": [1, 2]}

    def modalities(self) -> list[str]:
        return ["CT"]

    def class_names(self) -> list[str]:
        """Names of the label values 0, 1, 2."""
        return list(CLASS_NAMES)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=case_features(np.int16),
            supervised_keys=("image", "label"),
            homepage=_HOMEPAGE,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """``train``: labelled cases 00000-00209; ``test``: unlabelled cases 00210-00299.

        A folder without the test cases (only the labelled ones downloaded) builds the
        ``train`` split alone: :class:`CaseBuilder` leaves a split without cases out.
        """
        train, test = find_cases(Path(dl_manager.manual_dir), self.builder_config.exclude)
        return {
            "train": self._generate_cases(train, fingerprint=True, image_dtype=np.int16),
            "test": self._generate_cases(test, fingerprint=False, image_dtype=np.int16),
        }


def find_cases(root: Path, exclude=()) -> tuple[list, list]:
    """The loaders of KiTS19's training and test cases under ``root``.

    Every case folder is checked before anything is read, so a missing file fails the
    build at once, not hours into it.

    Parameters
    ----------
    root : Path
        The kits19 repository's ``data/`` folder.
    exclude : iterable of str
        Case ids to skip.

    Returns
    -------
    train, test : list of callables
        Zero-argument loaders of :class:`~medseg.io.CaseRecord`, in case order.

    Raises
    ------
    MedsegIOError
        If ``root`` holds no case folders, a case folder has no imaging, a case of the
        labelled range (< 210) has no segmentation, or no labelled case is left to train
        on; the message names the folder.
    """
    if not root.is_dir():
        raise MedsegIOError(f"{root}: KiTS19 manual_dir does not exist")
    exclude = set(exclude)
    cases = sorted(p for p in root.iterdir() if p.is_dir() and _CASE_RE.match(p.name) is not None)
    if not cases:
        raise MedsegIOError(
            f"{root}: no case_XXXXX folders found; manual_dir must be the kits19 "
            "repository's data/ folder (see Builder.MANUAL_DOWNLOAD_INSTRUCTIONS)"
        )
    train, test, problems = [], [], []
    for folder in cases:
        if folder.name in exclude:
            continue
        image = folder / IMAGE_FILE
        label = folder / LABEL_FILE
        labelled_range = int(_CASE_RE.match(folder.name).group(1)) < NUM_LABELLED
        if not image.is_file():
            problems.append(f"{folder}: no {IMAGE_FILE} (run python -m starter_code.get_imaging)")
            continue
        if labelled_range and not label.is_file():
            problems.append(f"{folder}: no {LABEL_FILE} for a case of the labelled range")
            continue
        # a test case with a segmentation (released later) keeps it
        load = functools.partial(load_case, folder.name, image, label if label.is_file() else None)
        (train if labelled_range else test).append(load)
    if problems:
        raise MedsegIOError("KiTS19 cases missing files:\n  " + "\n  ".join(problems))
    if not train:
        # checked here, before the test split is written, not after it
        raise MedsegIOError(
            f"{root}: no labelled KiTS19 case (case_00000..case_{NUM_LABELLED - 1:05d} with "
            f"{LABEL_FILE}) to build the train split from; found {len(test)} test case(s)"
            + (f" and excluded {len(exclude)}" if exclude else "")
            + "; manual_dir must be the kits19 repository's data/ folder"
        )
    unknown = sorted(exclude - {p.name for p in cases})
    if unknown:
        # a typo in `exclude` would otherwise silently keep the case it meant to drop
        log.warning("kits19: excluded cases not found in %s: %s", root, ", ".join(unknown))
    log.info("kits19: %d training and %d test cases in %s", len(train), len(test), root)
    return train, test


def load_case(case_id: str, image_path: Path, label_path: Path | None):
    """Read one case, keeping KiTS19's (slices, rows, cols) array and anti-diagonal affine.

    Spacing comes from the affine's column norms: the affine is anti-diagonal, so its
    diagonal holds zeros and one spacing, not the three spacings.
    """
    record = read_nifti_case(case_id, image_path, label_path, num_classes=len(CLASS_NAMES))
    spacing = tuple(float(s) for s in spacing_from_affine(record.affine))
    return dataclasses.replace(record, spacing=spacing)
