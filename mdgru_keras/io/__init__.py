"""Reading and writing users' files: NIfTI scans (:mod:`.nifti`) and landmark files (:mod:`.landmarks`)."""

from mdgru_keras.io.landmarks import (
    check_landmarks_inside,
    landmark_format,
    read_landmarks,
    require_landmarks,
    write_landmarks,
    write_text_atomic,
)
from mdgru_keras.io.nifti import Volume, is_nifti_path, read_volume, write_volume

__all__ = [
    "Volume",
    "check_landmarks_inside",
    "is_nifti_path",
    "landmark_format",
    "read_landmarks",
    "read_volume",
    "require_landmarks",
    "write_landmarks",
    "write_text_atomic",
    "write_volume",
]
