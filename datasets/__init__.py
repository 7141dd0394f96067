"""medseg's TFDS dataset builders (installed as the ``medseg_datasets`` package)."""
