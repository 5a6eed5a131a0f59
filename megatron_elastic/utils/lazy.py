"""Lazy package exports: names resolved from their submodule on first use, so importing a package
(the command line imports several) does not import torch, transformers or Model-Optimizer."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, namespace: dict, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package`` whose ``exports`` map a name to its module.

    A module name starting with ``.`` is relative to ``package``. The resolved value is cached in
    ``namespace`` (the package's globals), so each name is looked up once."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = exports[name]
        value = getattr(importlib.import_module(package + module if module.startswith(".") else module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
