"""kits_phantom: KiTS19-like synthetic abdominal CT with kidney and tumour labels."""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from medseg.datasets.fingerprint import FingerprintAccumulator, fingerprint_hash
from medseg.io import kits19_affine

from .phantom import CLASS_NAMES, PhantomSpec, make_case

_HOMEPAGE = "https://kits19.grand-challenge.org/"


@dataclasses.dataclass(eq=False)
class KitsPhantomConfig(tfds.core.BuilderConfig):
    """Size and seed of a kits_phantom variant.

    Attributes
    ----------
    num_cases : int
        Cases in the ``train`` split.
    inplane : int
        Rows and columns of every slice.
    z_extent_mm : tuple of float
        Range of the scan length; slices = extent / slice spacing (2.5-5 mm).
    seed : int
        Case ``i`` is ``phantom.make_case((seed, i), ...)``.
    slice_spacing_mm, inplane_spacing_mm : tuple of float
        Ranges of the slice and in-plane spacing.
    """

    num_cases: int = 12
    inplane: int = 128
    z_extent_mm: tuple[float, float] = (115.0, 125.0)
    seed: int = 0
    slice_spacing_mm: tuple[float, float] = (2.5, 5.0)
    inplane_spacing_mm: tuple[float, float] = (0.6, 0.9)

    def phantom_spec(self) -> PhantomSpec:
        """The :class:`PhantomSpec` of this config's cases."""
        return PhantomSpec(
            inplane=self.inplane,
            z_extent_mm=tuple(self.z_extent_mm),
            slice_spacing_mm=tuple(self.slice_spacing_mm),
            inplane_spacing_mm=tuple(self.inplane_spacing_mm),
        )


class Builder(tfds.core.GeneratorBasedBuilder):
    """DatasetBuilder for kits_phantom."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        KitsPhantomConfig(
            name="tiny",
            description="4 cases of 10-21 x 48 x 48 voxels, for tests.",
            num_cases=4,
            inplane=48,
            z_extent_mm=(48.0, 52.0),
        ),
        KitsPhantomConfig(
            name="small",
            # 160 px keeps every case ≥ 64 px in-plane at the demo's 1.5 mm target spacing
            description="16 cases of 23-50 x 160 x 160 voxels, for the demo.",
            num_cases=16,
            inplane=160,
            z_extent_mm=(115.0, 125.0),
        ),
        KitsPhantomConfig(
            name="kits",
            description="6 cases of 96-208 x 256 x 256 voxels (KiTS19-like), for benchmarks.",
            num_cases=6,
            inplane=256,
            z_extent_mm=(480.0, 520.0),
        ),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "small"

    def _info(self) -> tfds.core.DatasetInfo:
        volume = dict(shape=(None, None, None), encoding=tfds.features.Encoding.ZLIB)
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(dtype=np.int16, **volume),
                    "label": tfds.features.Tensor(dtype=np.uint8, **volume),
                    "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32),
                    "affine": tfds.features.Tensor(shape=(4, 4), dtype=np.float64),
                    "case_id": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage=_HOMEPAGE,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """One ``train`` split with every case; medseg splits off validation itself."""
        del dl_manager  # nothing is downloaded: the phantom makes its own data
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        """Yield ``(case_id, example)`` one case at a time, fingerprinting each."""
        config = self.builder_config
        spec = config.phantom_spec()
        acc = FingerprintAccumulator(list(CLASS_NAMES), seed=config.seed)
        self._fingerprint_acc = acc
        for index in range(config.num_cases):
            image, label, spacing = make_case((config.seed, index), spec)
            # the fingerprint sees the spacing exactly as the record stores it
            spacing = np.asarray(spacing, dtype=np.float32)
            acc.add(image, label, spacing)
            case_id = f"case_{index:05d}"
            yield (
                case_id,
                {
                    "image": image,
                    "label": label,
                    "spacing": spacing,
                    "affine": kits19_affine(spacing),
                    "case_id": case_id,
                },
            )
        self._store_fingerprint(acc)

    def _download_and_prepare(self, dl_manager, download_config):
        super()._download_and_prepare(dl_manager, download_config)
        # TFDS writes info (with metadata.json) only after this returns; storing again
        # here also covers a generator that was not run to its end
        # (download_config.max_examples_per_split).
        acc = getattr(self, "_fingerprint_acc", None)
        if acc is not None:
            self._store_fingerprint(acc)

    def _store_fingerprint(self, acc: FingerprintAccumulator) -> None:
        fingerprint = acc.result()
        self.info.metadata["class_names"] = list(CLASS_NAMES)
        # KiTS19's official "kidney" score is of kidney and tumour together (label > 0)
        self.info.metadata["regions"] = {"kidney_and_tumour": [1, 2]}
        self.info.metadata["fingerprint"] = fingerprint
        self.info.metadata["fingerprint_hash"] = fingerprint_hash(fingerprint)
