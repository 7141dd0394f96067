"""msd: the Medical Segmentation Decathlon's ten tasks, from a manual download."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from medseg.datasets.builder import CaseBuilder, case_features
from medseg.io import MedsegIOError, read_nifti_case, spacing_from_affine

log = logging.getLogger(__name__)

_HOMEPAGE = "http://medicaldecathlon.com/"
DATASET_JSON = "dataset.json"


@dataclasses.dataclass(eq=False)
class MsdConfig(tfds.core.BuilderConfig):
    """One Decathlon task: its classes, modalities and how its images are stored.

    The config's ``name`` is the task's folder name (``Task04_Hippocampus``).

    Attributes
    ----------
    labels : tuple of str
        Class names of label values 0, 1, ... as in the task's ``dataset.json``.
    modalities : tuple of str
        Image channels as in ``dataset.json``'s ``modality``; more than one means the
        images are 4D NIfTI and become a channels-last image feature.
    image_dtype : str
        ``"float32"`` for MR tasks (intensities are arbitrary units), ``"int16"`` for CT
        (Hounsfield units).
    regions : dict
        Composite regions scored beside the classes.
    """

    labels: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()
    image_dtype: str = "float32"
    regions: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    @property
    def channels(self) -> int | None:
        """None for single-modality tasks, else the number of modalities."""
        return len(self.modalities) if len(self.modalities) > 1 else None


def _task(name, labels, modalities, image_dtype, description, regions=None):
    return MsdConfig(
        name=name,
        description=description,
        labels=tuple(labels),
        modalities=tuple(modalities),
        image_dtype=image_dtype,
        regions=dict(regions or {}),
    )


# labels and modalities as the official dataset.json files spell them
TASKS = [
    _task(
        "Task01_BrainTumour",
        ["background", "edema", "non-enhancing tumor", "enhancing tumour"],
        ["FLAIR", "T1w", "t1gd", "T2w"],
        "float32",
        "Gliomas (BraTS 2016/2017), multiparametric MRI, 4 channels.",
        # BraTS's evaluation regions in the Decathlon's label numbering
        regions={"whole_tumour": [1, 2, 3], "tumour_core": [2, 3]},
    ),
    _task("Task02_Heart", ["background", "left atrium"], ["MRI"], "float32", "Left atrium, MRI."),
    _task(
        "Task03_Liver", ["background", "liver", "cancer"], ["CT"], "int16", "Liver and tumour, CT."
    ),
    _task(
        "Task04_Hippocampus",
        ["background", "Anterior", "Posterior"],
        ["MRI"],
        "float32",
        "Hippocampus head and body, MRI.",
    ),
    _task(
        "Task05_Prostate",
        ["background", "PZ", "TZ"],
        ["T2", "ADC"],
        "float32",
        "Prostate peripheral and transition zones, multiparametric MRI, 2 channels.",
    ),
    _task("Task06_Lung", ["background", "cancer"], ["CT"], "int16", "Lung tumours, CT."),
    _task(
        "Task07_Pancreas",
        ["background", "pancreas", "cancer"],
        ["CT"],
        "int16",
        "Pancreas and tumour, CT.",
    ),
    _task(
        "Task08_HepaticVessel",
        ["background", "Vessel", "Tumour"],
        ["CT"],
        "int16",
        "Hepatic vessels and tumour, CT.",
    ),
    _task("Task09_Spleen", ["background", "spleen"], ["CT"], "int16", "Spleen, CT."),
    _task(
        "Task10_Colon",
        ["background", "colon cancer primaries"],
        ["CT"],
        "int16",
        "Colon cancer primaries, CT.",
    ),
]


class Builder(CaseBuilder):
    """DatasetBuilder for the Medical Segmentation Decathlon (manual download)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "Volumes stored uncompressed (raw bytes): builds ~3x faster, ~2x the disk.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download the task's tarball (e.g. Task04_Hippocampus.tar) from
    http://medicaldecathlon.com/ (CC BY-SA 4.0), extract it, and point `manual_dir` at
    the folder holding `TaskXX_Name/` (or at the task folder itself):

        medseg build msd --config Task04_Hippocampus --manual-dir /path/to/msd

    or, from Python:

        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir="/path/to/msd"))
    """
    BUILDER_CONFIGS = TASKS
    DEFAULT_BUILDER_CONFIG_NAME = "Task04_Hippocampus"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # regions differ per task; an instance attribute shadows CaseBuilder's class one
        self.REGIONS = {k: list(v) for k, v in self.builder_config.regions.items()}

    def class_names(self) -> list[str]:
        """The task's class names, background first."""
        return list(self.builder_config.labels)

    def modalities(self) -> list[str]:
        return list(self.builder_config.modalities)

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        return self.dataset_info_from_configs(
            features=case_features(np.dtype(config.image_dtype), config.channels),
            supervised_keys=("image", "label"),
            homepage=_HOMEPAGE,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """``train`` from dataset.json's ``training`` list, ``test`` (unlabelled) from ``test``.

        An empty or absent ``test`` list builds the ``train`` split alone
        (:class:`CaseBuilder` leaves a split without cases out).
        """
        config = self.builder_config
        task_dir = find_task_dir(Path(dl_manager.manual_dir), config.name)
        train, test = find_cases(task_dir, config)
        dtype = np.dtype(config.image_dtype)
        return {
            "train": self._generate_cases(train, fingerprint=True, image_dtype=dtype),
            "test": self._generate_cases(test, fingerprint=False, image_dtype=dtype),
        }


def _visible(path: Path) -> bool:
    # the Decathlon's tarballs carry macOS `._*` resource forks beside every file
    return not path.name.startswith(".")


def find_task_dir(root: Path, task: str) -> Path:
    """The task folder: ``root/task`` or ``root`` itself if it holds a dataset.json.

    Raises
    ------
    MedsegIOError
        If neither is found; the message lists the task folders ``root`` does hold.
    """
    if (root / task / DATASET_JSON).is_file():
        return root / task
    if (root / DATASET_JSON).is_file():
        return root
    found = []
    if root.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p))
    raise MedsegIOError(
        f"{root}: no {task}/{DATASET_JSON} (nor {DATASET_JSON}) in manual_dir; "
        f"folders found: {', '.join(found) or '(none)'}"
    )


def read_dataset_json(task_dir: Path) -> dict:
    """Parse ``dataset.json``, naming it in any error."""
    path = task_dir / DATASET_JSON
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MedsegIOError(f"{path}: cannot read {DATASET_JSON}: {err}") from err
    if not isinstance(meta, dict):
        raise MedsegIOError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def _indexed(meta: dict, key: str, path: Path) -> list[str]:
    """``{"0": a, "1": b}`` as ``[a, b]``, checking the keys run 0..n-1."""
    table = meta.get(key)
    if not isinstance(table, dict):
        raise MedsegIOError(f"{path}: no {key!r} table")
    try:
        items = sorted((int(k), str(v)) for k, v in table.items())
    except ValueError as err:
        raise MedsegIOError(f"{path}: {key!r} keys must be integers: {table}") from err
    if [k for k, _ in items] != list(range(len(items))):
        raise MedsegIOError(f"{path}: {key!r} keys must run 0..{len(items) - 1}: {table}")
    return [v for _, v in items]


def check_dataset_json(meta: dict, path: Path, config: MsdConfig) -> None:
    """Raise if dataset.json's labels or modalities are not the config's.

    Names are compared ignoring case and surrounding spaces, so only a different task
    (or a relabelled one) fails, not a spelling variant.
    """

    def norm(names):
        return [n.strip().casefold() for n in names]

    for key, expected in (("labels", config.labels), ("modality", config.modalities)):
        actual = _indexed(meta, key, path)
        if norm(actual) != norm(expected):
            raise MedsegIOError(
                f"{path}: {key} {actual} do not match the {config.name} config's "
                f"{list(expected)}; is this the right task folder?"
            )


def resolve_entry(task_dir: Path, entry, path: Path) -> Path:
    """A dataset.json file path, checked to stay inside the task folder.

    The check is lexical (``..`` and absolute paths), so a task folder whose sub-folders
    are symlinks to other storage still works.
    """
    if not isinstance(entry, str) or not entry:
        raise MedsegIOError(f"{path}: expected a file path, got {entry!r}")
    if os.path.isabs(entry) or Path(entry).is_absolute():
        raise MedsegIOError(f"{path}: absolute path {entry!r} is not allowed")
    joined = os.path.normpath(os.path.join(task_dir, entry))
    base = os.path.normpath(task_dir)
    if os.path.commonpath([base, joined]) != base:
        raise MedsegIOError(f"{path}: path {entry!r} resolves outside {task_dir}")
    return Path(joined)


def _case_id(image: Path) -> str:
    name = image.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return image.stem


def find_cases(task_dir: Path, config: MsdConfig) -> tuple[list, list]:
    """Loaders of a task's training and test cases, as its dataset.json lists them.

    Every listed file is checked to exist before anything is read.

    Returns
    -------
    train, test : list of callables
        Zero-argument loaders of :class:`~medseg.io.CaseRecord`.

    Raises
    ------
    MedsegIOError
        On a dataset.json that does not match the config, lists a path outside the task
        folder or a file that does not exist, repeats a case, or lists no training case.
    """
    path = task_dir / DATASET_JSON
    meta = read_dataset_json(task_dir)
    check_dataset_json(meta, path, config)
    training, test = meta.get("training", []), meta.get("test", [])
    if not isinstance(training, list) or not isinstance(test, list):
        raise MedsegIOError(f"{path}: 'training' and 'test' must be lists")

    pairs = []
    for entry in training:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise MedsegIOError(f"{path}: training entry {entry!r} needs 'image' and 'label'")
        pairs.append(
            (
                resolve_entry(task_dir, entry["image"], path),
                resolve_entry(task_dir, entry["label"], path),
            )
        )
    unlabelled = [(resolve_entry(task_dir, entry, path), None) for entry in test]

    seen, missing = set(), []
    splits = []
    for cases in (pairs, unlabelled):
        loaders = []
        for image, label in cases:
            if not _visible(image):
                log.warning("%s: skipping hidden file %s", path, image)
                continue
            case_id = _case_id(image)
            if case_id in seen:
                raise MedsegIOError(f"{path}: case {case_id} is listed twice")
            seen.add(case_id)
            missing += [str(p) for p in (image, label) if p is not None and not p.is_file()]
            loaders.append(functools.partial(load_case, case_id, image, label, config))
        splits.append(loaders)
    if missing:
        raise MedsegIOError(f"{path}: listed files do not exist:\n  " + "\n  ".join(missing))
    if not splits[0]:
        # checked before anything is written: the train split is what a task is built for
        raise MedsegIOError(
            f"{path}: 'training' lists no case (of visible files); a task needs labelled "
            "training cases: check that this is the task's dataset.json"
        )
    log.info("msd %s: %d training and %d test cases", config.name, *map(len, splits))
    return splits[0], splits[1]


def load_case(case_id: str, image_path: Path, label_path: Path | None, config: MsdConfig):
    """Read one case; multi-modal images come back channels-last ``(X, Y, Z, C)``."""
    record = read_nifti_case(case_id, image_path, label_path, num_classes=len(config.labels))
    image = record.image
    channels = config.channels
    if channels is None and image.ndim == 4 and image.shape[-1] == 1:
        image = image[..., 0]  # a single-modality volume saved as 4D with one channel
    expected_ndim = 3 if channels is None else 4
    if image.ndim != expected_ndim or (channels is not None and image.shape[-1] != channels):
        raise MedsegIOError(
            f"{image_path}: image shape {image.shape} does not fit {config.name} "
            f"({len(config.modalities)} modalities: {', '.join(config.modalities)})"
        )
    spacing = tuple(float(s) for s in spacing_from_affine(record.affine))
    return dataclasses.replace(record, image=image, spacing=spacing)
