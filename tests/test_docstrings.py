"""Every example in every module's docstrings runs and passes (`+SKIP` marks the ones that need
files, a model or a server); the examples that run are counted, so skipping them all fails."""

import doctest
import importlib
import pkgutil

import pytest

import cli
import embedder
import hiervec_app
import hiervec_core
import milvus_store
import scaleout
import service

MODULES = sorted(name for package in (hiervec_core, embedder, milvus_store, hiervec_app, scaleout, cli, service)
                 for name in [package.__name__] + [f"{package.__name__}.{m.name}"
                                                    for m in pkgutil.iter_modules(package.__path__)])
NEEDS_MILVUS = {"milvus_store.store"}  # its example opens a Milvus Lite file in a temporary folder
RUNNABLE_AT_LEAST = 26  # examples that ran when this test was written


def runnable(name: str) -> int:
    module = importlib.import_module(name)
    return sum(1 for test in doctest.DocTestFinder().find(module) for example in test.examples
               if not example.options.get(doctest.SKIP))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.lite if n in NEEDS_MILVUS else pytest.mark.unit)
                                  for n in MODULES])
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


@pytest.mark.unit
def test_the_examples_are_not_all_skipped():
    assert sum(runnable(name) for name in MODULES) >= RUNNABLE_AT_LEAST
