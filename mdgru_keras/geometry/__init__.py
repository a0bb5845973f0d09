"""Coordinate math of mdgru-keras (being split into one module per concept; see the modules)."""

# temporary, while the importers move to the concept modules
from mdgru_keras.geometry.affine_maps import *  # noqa: F403
from mdgru_keras.geometry.coordinate_classes import *  # noqa: F403
from mdgru_keras.geometry.resampling import *  # noqa: F403
from mdgru_keras.geometry.training_crops import *  # noqa: F403
from mdgru_keras.geometry.windows import *  # noqa: F403
