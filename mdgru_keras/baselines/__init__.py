"""Baselines the MD-GRU localizer is compared with: atlas registration (``registration``) and a 3D U-Net.

Submodules are imported on use, so that SimpleITK or TensorFlow load only when a baseline runs.
"""
