"""nnunet_raw: importing this package registers the ``nnunet_raw`` TFDS builder."""

# Absolute on purpose, as in nifti_folder: the builder module loads once, as medseg_datasets.
from medseg_datasets.nnunet_raw.nnunet_raw_dataset_builder import (
    Builder,
    NnunetRawConfig,
    read_dataset_json,
)

__all__ = ["Builder", "NnunetRawConfig", "read_dataset_json"]
