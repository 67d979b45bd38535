"""The library packages import their modules on first use (`hiervec_core.lazy`): every public name
resolves to what its module defines, no name hides a submodule, and importing a package loads
none of torch, pymilvus, FastAPI or Ray."""

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGES = ("embedder", "milvus_store", "hiervec_app", "service", "scaleout")


@pytest.mark.parametrize("name", PACKAGES)
def test_every_export_resolves_and_none_shares_a_submodules_name(name):
    package = importlib.import_module(name)
    exports = package._EXPORTS
    assert set(package.__all__) <= set(exports) and set(package.__all__) <= set(dir(package))
    submodules = {info.name for info in pkgutil.iter_modules(package.__path__)}
    assert not submodules & set(exports), submodules & set(exports)
    for export, module in exports.items():
        value = getattr(package, export)
        assert value is getattr(importlib.import_module(module, name), export)
    with pytest.raises(AttributeError, match=f"module '{name}' has no attribute 'nothing_here'"):
        package.nothing_here  # noqa: B018


def test_importing_the_packages_loads_no_engine():
    code = ("import sys, " + ", ".join(PACKAGES) + "\n"
            "print(sorted(m for m in ('torch', 'pymilvus', 'fastapi', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "[]"


def test_the_application_room_never_imports_torch_or_a_face():
    code = ("import pkgutil, importlib, sys, hiervec_app\n"
            "for m in pkgutil.iter_modules(hiervec_app.__path__): importlib.import_module('hiervec_app.' + m.name)\n"
            "print(sorted(m for m in ('torch', 'fastapi', 'click', 'ray', 'cli', 'service') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "[]"
