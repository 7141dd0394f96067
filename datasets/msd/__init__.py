"""msd: importing this package registers the ``msd`` TFDS builder."""

# Absolute on purpose: when the source tree is imported under another name (pytest
# collecting the builder test imports this folder as `datasets.msd`), the builder
# module still loads once, as `medseg_datasets...`, so TFDS registers it once.
from medseg_datasets.msd.msd_dataset_builder import Builder, MsdConfig

__all__ = ["Builder", "MsdConfig"]
