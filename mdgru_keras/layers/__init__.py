"""Keras layers of mdgru-keras: the strided convolutional GRU, the multi-dimensional GRU, and strided 3D
convolutions trained without strided-convolution gradient kernels."""

from mdgru_keras.layers.cgru import CGRU
from mdgru_keras.layers.mdgru import MDGRU
from mdgru_keras.layers.strided_conv import StridedConv3D, StridedConv3DTranspose, upgrade_strided_convolutions

__all__ = ["CGRU", "MDGRU", "StridedConv3D", "StridedConv3DTranspose", "upgrade_strided_convolutions"]
