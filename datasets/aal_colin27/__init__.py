"""aal_colin27: importing this package registers the ``aal_colin27`` TFDS builder."""

# Absolute on purpose: when the source tree is imported under another name (pytest
# collecting the builder test imports this folder as `datasets.aal_colin27`), the
# builder module still loads once, as `medseg_datasets...`, so TFDS registers it once.
from medseg_datasets.aal_colin27.aal_colin27_dataset_builder import AalColin27Config, Builder

__all__ = ["AalColin27Config", "Builder"]
