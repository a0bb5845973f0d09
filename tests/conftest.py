"""Shared test settings: quiet TensorFlow, deterministic seeds, and memory handed back between test files."""

import ctypes
import ctypes.util
import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True, scope="module")
def _return_memory_after_each_file():
    """Each pytest worker runs many test files in one process (make test: two workers, a file at a time). The
    models and volumes of a finished file are garbage, but glibc keeps the freed memory in its arenas, and a
    worker grew to 17 GB and was killed for memory on a 24 GB machine (2026-12-06). Collect and trim after every
    file (malloc_trim: glibc only; elsewhere a no-op)."""
    yield
    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
