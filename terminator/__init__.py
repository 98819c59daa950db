"""terminator: the HyperZ·Z·W operator and the Terminator network (arXiv 2401.17948).

Submodules load on first access (``terminator.ops`` builds or loads the compiled
ops then), so ``python -m terminator --help`` compiles nothing.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("terminator-hyperzzw")
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0.0.0+unknown"

_SUBMODULES = ("ops", "nn", "models", "losses", "optim")
__all__ = [*_SUBMODULES, "__version__"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'terminator' has no attribute {name!r}")
