"""kits_phantom: importing this package registers the ``kits_phantom`` TFDS builder."""

# Absolute on purpose: when the source tree is imported under another name (pytest
# collecting the builder test imports this folder as `datasets.kits_phantom`), the
# builder module still loads once, as `medseg_datasets...`, so TFDS registers it once.
from medseg_datasets.kits_phantom.kits_phantom_dataset_builder import Builder, KitsPhantomConfig

__all__ = ["Builder", "KitsPhantomConfig"]
