"""The base of medseg's TFDS builders: one example per case, fingerprinted while written.

A builder subclasses :class:`CaseBuilder`, declares its classes, and yields from
:meth:`CaseBuilder._generate_cases` with an iterable of zero-argument callables that each
load one :class:`~medseg.io.CaseRecord`. Loading lazily, one case at a time, keeps a
build's memory at the size of the largest case, not of the dataset.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from medseg.datasets.fingerprint import FingerprintAccumulator, fingerprint_hash

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
    volume = dict(encoding=tfds.features.Encoding.ZLIB)
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


class CaseBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A GeneratorBasedBuilder that writes cases and stores their fingerprint.

    Subclasses implement ``_info`` (with ``metadata=tfds.core.MetadataDict()``),
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
        """Yield ``(case_id, example)`` for every loader, fingerprinting labelled cases.

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
        """
        names = self.class_names()
        acc = FingerprintAccumulator(names, seed=0) if fingerprint else None
        if fingerprint:
            self._fingerprint_acc = acc
        loaders = list(loaders)
        start = time.perf_counter()
        for index, load in enumerate(loaders):
            record = load()
            image = record.image
            if image_dtype is not None:
                image = _cast_checked(image, image_dtype, record.source or record.case_id)
            label = record.label
            if label is None:
                label = np.zeros(NO_LABEL_SHAPE, np.uint8)
            else:
                _check_labels(label, len(names), record.source or record.case_id)
                label = label.astype(np.uint8, copy=False)
                if acc is not None:
                    acc.add(image, label, record.spacing)
            log.info(
                "%s: case %d/%d %s %s (%.1f s)",
                self.name,
                index + 1,
                len(loaders),
                record.case_id,
                tuple(image.shape),
                time.perf_counter() - start,
            )
            yield (
                record.case_id,
                {
                    "image": image,
                    "label": label,
                    "spacing": np.asarray(record.spacing, np.float32),
                    "affine": np.asarray(record.affine, np.float64),
                    "case_id": record.case_id,
                },
            )
        if acc is not None:
            self._store_fingerprint(acc)

    def _generate_examples(self, *args, **kwargs):
        # TFDS requires the method; medseg's builders all generate through _generate_cases
        return self._generate_cases(*args, **kwargs)

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


def _check_labels(label: np.ndarray, num_classes: int, source: str) -> None:
    values = np.unique(label)
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

