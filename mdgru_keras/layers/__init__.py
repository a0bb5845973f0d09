"""Keras layers of mdgru-keras: the strided convolutional GRU and the multi-dimensional GRU."""

from mdgru_keras.layers.cgru import CGRU
from mdgru_keras.layers.mdgru import MDGRU

__all__ = ["CGRU", "MDGRU"]
