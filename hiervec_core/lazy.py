"""Package namespaces that import their modules on first use (PEP 562).

A package's public names stay where users import them from (``from embedder import Embedder``),
but importing one light module of the package (``embedder.train_config``, ``service.settings``)
no longer imports torch, FastAPI or pymilvus through the package's ``__init__``: the CLI reads
its defaults from those modules and ``hiervec --help`` stays instant.

>>> __getattr__, __dir__ = lazy_exports(__name__, {"Embedder": ".inference"})  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of `package`: `exports` maps each public name
    to the module (relative to the package) that defines it; a name is imported once, then cached."""

    def __getattr__(name: str) -> object:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        loaded = importlib.import_module(module, package)
        # Every name this module exports is set at once (one import, one lookup each). An export must
        # not share its name with a submodule: importing that submodule would set the package's
        # attribute to the module (tests/test_docstrings.py checks that none does).
        for other, where in exports.items():
            if where == module:
                setattr(sys.modules[package], other, getattr(loaded, other))
        return getattr(loaded, name)

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__
