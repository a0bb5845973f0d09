"""Reading and writing users' files: NIfTI scans (:mod:`.nifti`) and landmark files (:mod:`.landmarks`).

Names are imported on first use, so that e.g. reading a landmark file does not import TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Volume": "nifti",
    "is_nifti_path": "nifti",
    "read_nifti_array": "nifti",
    "read_volume": "nifti",
    "write_volume": "nifti",
    "check_landmarks_inside": "landmarks",
    "landmark_format": "landmarks",
    "read_landmarks": "landmarks",
    "require_landmarks": "landmarks",
    "write_landmarks": "landmarks",
    "atomic_path": "atomic",
    "check_writable": "atomic",
    "write_bytes_atomic": "atomic",
    "write_text_atomic": "atomic",
}

__all__ = [
    "Volume",
    "atomic_path",
    "check_landmarks_inside",
    "check_writable",
    "is_nifti_path",
    "landmark_format",
    "read_landmarks",
    "read_nifti_array",
    "read_volume",
    "require_landmarks",
    "write_bytes_atomic",
    "write_landmarks",
    "write_text_atomic",
    "write_volume",
]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:
    from mdgru_keras.io.atomic import atomic_path, check_writable, write_bytes_atomic, write_text_atomic
    from mdgru_keras.io.landmarks import (
        check_landmarks_inside,
        landmark_format,
        read_landmarks,
        require_landmarks,
        write_landmarks,
    )
    from mdgru_keras.io.nifti import Volume, is_nifti_path, read_nifti_array, read_volume, write_volume


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
