"""Store targets: Milvus Lite in tmp_path, a `milvus-lite server` process, and Docker's Milvus.

The same test class runs against each (fixture `target`); Docker's case is skipped with
the reason where no Docker engine answers.
"""

import itertools
import time
from dataclasses import dataclass

import pytest

from ..servers import LiteServer

MILVUS_IMAGE = "milvusdb/milvus:v2.5.14"  # pinned: the standalone release docker-compose.yml runs


@dataclass
class Target:
    name: str
    uri: str
    lite_engine: bool  # Milvus Lite's engine (in process or as a server): no templates, Lite's indexes


_names = itertools.count()


def fresh_collection() -> str:
    return f"c{next(_names)}_{int(time.time() * 1000) % 100000}"


@pytest.fixture(scope="session")
def lite_server(tmp_path_factory):
    """A `milvus-lite server` on a free loopback port, for client/server tests here."""
    with LiteServer(tmp_path_factory.mktemp("milvus-lite-server")) as server:
        yield server.uri


@pytest.fixture(scope="session")
def docker_milvus():
    """Milvus standalone in Docker via testcontainers; skipped with the reason without Docker."""
    from docker.errors import DockerException
    from testcontainers.community.milvus import MilvusContainer

    try:
        container = MilvusContainer(MILVUS_IMAGE)
    except DockerException as exc:
        pytest.skip(f"no Docker engine for testcontainers' Milvus ({MILVUS_IMAGE}): {exc}")
    with container:
        yield container.get_connection_url()


@pytest.fixture(
    params=[
        pytest.param("lite", marks=pytest.mark.lite),
        pytest.param("milvus-lite-server", marks=pytest.mark.server),
        pytest.param("docker", marks=pytest.mark.server),
    ]
)
def target(request, tmp_path):
    if request.param == "lite":
        return Target("lite", str(tmp_path / "store.db"), True)
    if request.param == "milvus-lite-server":
        return Target("milvus-lite-server", request.getfixturevalue("lite_server"), True)
    return Target("docker", request.getfixturevalue("docker_milvus"), False)
