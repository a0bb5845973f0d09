"""The BIDS app (``mdgru-localize bids BIDS_DIR OUTPUT_DIR participant|group``): landmarks of a BIDS dataset's
anatomical scans, written as a BIDS-derivatives dataset.

* :mod:`.layout` — the input: checks that a folder is a BIDS dataset and finds its T1w (and T2w) scans with
  pybids, per participant and session;
* :mod:`.derivatives` — the output: the derivatives dataset (``dataset_description.json``, one 3D Slicer
  ``.fcsv`` and a JSON sidecar per scan), when a scan's outputs are complete, and the group table and summary.

The per-scan localization itself is :func:`mdgru_keras.prediction.predict_scan`, as in ``predict``. pybids (and
pandas behind it) is imported only when a dataset is indexed.
"""
