"""nifti_folder: importing this package registers the ``nifti_folder`` TFDS builder."""

# Absolute on purpose: when the source tree is imported under another name (pytest
# collecting the builder test imports this folder as `datasets.nifti_folder`), the
# builder module still loads once, as `medseg_datasets...`, so TFDS registers it once.
from medseg_datasets.nifti_folder.nifti_folder_dataset_builder import Builder, NiftiFolderConfig

__all__ = ["Builder", "NiftiFolderConfig"]
