"""kits19: importing this package registers the ``kits19`` TFDS builder."""

# Absolute on purpose: when the source tree is imported under another name (pytest
# collecting the builder test imports this folder as `datasets.kits19`), the builder
# module still loads once, as `medseg_datasets...`, so TFDS registers it once.
from medseg_datasets.kits19.kits19_dataset_builder import Builder, Kits19Config

__all__ = ["Builder", "Kits19Config"]
