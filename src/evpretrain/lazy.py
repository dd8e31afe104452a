"""Packages whose names load on first use (PEP 562), so that importing one light module of a package (a config, a
contract) does not import the heavy ones beside it (torch, numba)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], list[str]]:
    """The module ``__getattr__`` and ``__all__`` of ``package`` whose public names are ``exports`` (name -> the
    submodule that defines it): ``__getattr__, __all__ = lazy_exports(__name__, {...})``."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f"{package}.{exports[name]}"), name)

    return __getattr__, sorted(exports)
