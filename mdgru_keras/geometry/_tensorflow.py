"""TensorFlow for the geometry modules, imported when first used.

Each geometry module holds a concept's NumPy functions and their TensorFlow twins side by side. Tools that need
only the NumPy ones (the BIDS App's group level, the QC pages, ``--help``) should not pay the 3 to 5 s of
importing TensorFlow: the modules name ``tf`` through :data:`tf`, which imports the real module on its first
attribute access.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class _ImportedOnUse:
    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attribute: str):
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attribute)


tf = _ImportedOnUse("tensorflow")
