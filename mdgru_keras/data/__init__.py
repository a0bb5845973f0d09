"""Data: the TFRecord dataset on disk (``records``), the ``tf.data`` crop pipeline (``pipeline``) and its
augmentation (``augment``); the AFIDs demo data (``demo``) and the synthetic population."""
