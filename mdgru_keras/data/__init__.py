"""Data: the TFRecord dataset on disk (``records``), the ``tf.data`` crop pipeline (``pipeline``) and its
augmentation (``augment``); demo data and the synthetic population."""
