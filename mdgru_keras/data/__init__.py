"""Datasets: TFRecords and the ``tf.data`` pipeline, augmentation, the AFIDs demo data and the synthetic
population (see ``docs/ARCHITECTURE.md``)."""
