"""Coordinate math of mdgru-keras, one module per concept; import from the module itself.

* :mod:`~mdgru_keras.geometry.affine_maps` — 4x4 affine maps of points: voxel <-> world (``voxel_to_world``
  applies any 4x4 affine), voxel spacing, translations, rotations, RAS <-> LPS for ITK.
* :mod:`~mdgru_keras.geometry.windows` — windows of a volume: centred origins, origins around a point,
  zero-padded crops, fine windows shared by nearby points.
* :mod:`~mdgru_keras.geometry.coordinate_classes` — window coordinate <-> class per axis, decoding of per-axis
  probabilities (argmax, parabola), peak mass (confidence), pooling to one class per voxel.
* :mod:`~mdgru_keras.geometry.training_crops` — placement of training windows and their resampling through one
  ``window -> volume`` affine (the ``tf.data`` pipeline).
* :mod:`~mdgru_keras.geometry.resampling` — the model's grid of a scan: closest canonical (RAS) orientation,
  resampling to the model spacing, the exported model's bounded central grid.
* :mod:`~mdgru_keras.geometry.protocol_planes` — AFIDs landmarks that the protocol places in the coronal plane of
  AC or PC: estimates projected onto those planes, and synthetic labels placed on them.
* :mod:`~mdgru_keras.geometry.shape_prior` — the reference landmarks (the template's) mapped by the robust affine
  fit to a set of estimates: where the estimates agree each landmark should be, to catch gross errors; the
  fit's nearest rotation, the axes of the localizer's aligned windows.

Two concepts with one user each live next to it: the Gaussian heatmaps of the U-Net baseline in
:mod:`mdgru_keras.baselines.heatmaps`, the rigid poses and deformations of the synthetic population in
:mod:`mdgru_keras.data.deformation`.

Conventions (see ``docs/GEOMETRY.md`` for pictures):

* Volumes are arrays ``[x, y, z]`` in RAS voxel order (after :func:`mdgru_keras.io.nifti.read_volume`).
* Continuous voxel coordinates put voxel *centres* at integers (nibabel's convention): voxel ``i`` covers
  ``[i - 0.5, i + 0.5)``.
* ``world_mm`` is RAS millimetres, reached through a 4x4 ``voxel_to_world`` affine.
* A *window* is an axis-aligned block of a volume: ``window_voxel = volume_voxel - window_origin_voxel`` (the
  localizer's aligned windows and the training crops are sampled through an affine map instead).
* A window of ``size`` input voxels has ``C = n * size / factor`` coordinate classes per axis (superresolution
  ``n``, input downsampling ``factor``); see :mod:`~mdgru_keras.geometry.coordinate_classes`.

Functions have a NumPy form; those that run inside a TensorFlow graph also have a TensorFlow form next to it
(suffix ``_tf``), and the tests check that both agree.
"""
