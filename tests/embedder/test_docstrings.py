import doctest

import pytest

from embedder import hierarchy, inference, losses, model

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("module", [hierarchy, losses, model, inference], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module)
    assert result.failed == 0
