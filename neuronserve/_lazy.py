"""Module-level ``__getattr__`` that imports heavy names (torch and friends) on first use."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_attributes(package: str, names: dict[str, str]) -> Callable[[str], object]:
    """A ``__getattr__`` for ``package`` that resolves ``name`` from module ``names[name]``."""

    def __getattr__(name: str) -> object:
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
