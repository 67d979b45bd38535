import re
from pathlib import Path

import pytest

from tests.milvus_store.conftest import MILVUS_IMAGE

pytestmark = pytest.mark.unit


def test_compose_runs_the_milvus_release_the_server_tests_pin():
    compose = (Path(__file__).parents[1] / "docker-compose.yml").read_text()
    images = re.findall(r"^\s+image:\s*(\S+)", compose, flags=re.M)
    assert MILVUS_IMAGE in images
    assert all(":" in image and not image.endswith(":latest") for image in images), images
