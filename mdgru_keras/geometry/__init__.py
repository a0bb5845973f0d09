"""Coordinate math of mdgru-keras (being split into one module per concept; see the modules)."""

from mdgru_keras.geometry.resampling import *  # noqa: F403  (temporary, while the split is under way)
