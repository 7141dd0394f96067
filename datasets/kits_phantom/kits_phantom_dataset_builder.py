"""kits_phantom: KiTS19-like synthetic abdominal CT with kidney and tumour labels."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import tensorflow_datasets as tfds

from medseg.datasets.builder import CaseBuilder, case_features
from medseg.io import kits19_affine
from medseg.io.record import CaseRecord

from .phantom import CLASS_NAMES, PhantomSpec, make_case

_HOMEPAGE = "https://kits19.grand-challenge.org/"
_DEFAULT_SPEC = PhantomSpec()  # the config's phantom knobs default to the phantom's


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
    tumour_probability, noise_sigma, tumour_hu, tumour_texture_hu, tumour_size, \
kidney_shape_noise, renal_sinus_size, bias_field
        Passed on to :class:`PhantomSpec` (see there); the defaults are its defaults.
    """

    num_cases: int = 12
    inplane: int = 128
    z_extent_mm: tuple[float, float] = (115.0, 125.0)
    seed: int = 0
    slice_spacing_mm: tuple[float, float] = (2.5, 5.0)
    inplane_spacing_mm: tuple[float, float] = (0.6, 0.9)
    tumour_probability: float = _DEFAULT_SPEC.tumour_probability
    noise_sigma: float = _DEFAULT_SPEC.noise_sigma
    tumour_hu: float = _DEFAULT_SPEC.tumour_hu
    tumour_texture_hu: float = _DEFAULT_SPEC.tumour_texture_hu
    tumour_size: tuple[float, float] = _DEFAULT_SPEC.tumour_size
    kidney_shape_noise: float = _DEFAULT_SPEC.kidney_shape_noise
    renal_sinus_size: tuple[float, float] = _DEFAULT_SPEC.renal_sinus_size
    bias_field: float = _DEFAULT_SPEC.bias_field

    def phantom_spec(self) -> PhantomSpec:
        """The :class:`PhantomSpec` of this config's cases."""
        return PhantomSpec(
            inplane=self.inplane,
            z_extent_mm=tuple(self.z_extent_mm),
            slice_spacing_mm=tuple(self.slice_spacing_mm),
            inplane_spacing_mm=tuple(self.inplane_spacing_mm),
            tumour_probability=self.tumour_probability,
            noise_sigma=self.noise_sigma,
            tumour_hu=self.tumour_hu,
            tumour_texture_hu=self.tumour_texture_hu,
            tumour_size=tuple(self.tumour_size),
            kidney_shape_noise=self.kidney_shape_noise,
            renal_sinus_size=tuple(self.renal_sinus_size),
            bias_field=self.bias_field,
        )


class Builder(CaseBuilder):
    """DatasetBuilder for kits_phantom."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "Volumes stored uncompressed (raw bytes): builds ~3x faster, ~2x the disk.",
    }
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
        KitsPhantomConfig(
            # at `kits` spacings a 256 px slice is < 160 px at 1.62 mm; this field of view
            # (270-330 mm, abdominal) keeps MIScnn's KiTS19 patch of 80 x 160 x 160 inside
            name="bench",
            description=(
                "6 cases of 96-208 x 256 x 256 voxels at 1.05-1.3 mm in-plane, for "
                "benchmarks/pipeline.py (80 x 160 x 160 patches fit at 3.22 x 1.62 x 1.62 mm)."
            ),
            num_cases=6,
            inplane=256,
            z_extent_mm=(480.0, 520.0),
            inplane_spacing_mm=(1.05, 1.3),
        ),
        KitsPhantomConfig(
            # for tuning recipes: `small`'s geometry with every hard knob of the phantom on
            name="hard",
            description=(
                "24 cases of 23-50 x 160 x 160 voxels, harder than `small`: irregular "
                "kidney outlines, renal sinus fat at the hilum (C-shaped kidneys, labelled "
                "background), tumours 25 HU darker than the kidney (125 vs 150 HU, texture "
                "std 22 HU) and 30-95 % of its width, a third of the cases tumour-free, a "
                "smooth bias field (about 16 HU RMS on soft tissue) and 20 HU noise."
            ),
            num_cases=24,
            inplane=160,
            z_extent_mm=(115.0, 125.0),
            # not `small`'s seed 0 (which would re-render its anatomy); 13 gives 8 of 24
            # cases tumour-free, the expected third
            seed=13,
            tumour_probability=0.67,
            noise_sigma=20.0,
            tumour_hu=125.0,
            tumour_texture_hu=22.0,
            tumour_size=(0.3, 0.95),
            kidney_shape_noise=0.15,
            renal_sinus_size=(0.35, 0.5),
            bias_field=0.015,
        ),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "small"

    # KiTS19's official "kidney" score is of kidney and tumour together (label > 0)
    REGIONS = {"kidney_and_tumour": [1, 2]}

    def modalities(self) -> list[str]:
        return ["CT"]

    def class_names(self) -> list[str]:
        return list(CLASS_NAMES)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=case_features(np.int16),
            supervised_keys=("image", "label"),
            homepage=_HOMEPAGE,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """One ``train`` split with every case; medseg splits off validation itself."""
        del dl_manager  # nothing is downloaded: the phantom makes its own data
        config = self.builder_config
        loaders = [functools.partial(_load_case, config, i) for i in range(config.num_cases)]
        return {"train": self._generate_cases(loaders, fingerprint=True)}


def _load_case(config: KitsPhantomConfig, index: int) -> CaseRecord:
    image, label, spacing = make_case((config.seed, index), config.phantom_spec())
    # the record stores float32 spacing: the fingerprint and affine use exactly that
    spacing = tuple(float(s) for s in np.asarray(spacing, dtype=np.float32))
    return CaseRecord(
        case_id=f"case_{index:05d}",
        image=image,
        spacing=spacing,
        affine=kits19_affine(spacing),
        label=label,
        source=f"kits_phantom/{config.name} case {index}",
    )
