"""Store targets: Milvus Lite in tmp_path, a `milvus-lite server` process, the real Milvus 2.3
standalone of PyPI's `milvus` package, and Docker's Milvus 2.5.

The same test class runs against each (fixture `target`); Docker's case is skipped with
the reason where no Docker engine answers, the embedded server's where its package is
not installed. Milvus 2.3 takes one vector field per collection: there the tests use the
image-vector-only layout (`Target.spec`) and skip what needs level vectors, saying so.
"""

import itertools
import time
from dataclasses import dataclass, replace

import pytest

from milvus_store import CollectionSpec


MILVUS_IMAGE = "milvusdb/milvus:v2.5.14"  # pinned: the standalone release docker-compose.yml runs


@dataclass
class Target:
    name: str
    uri: str
    lite_engine: bool  # Milvus Lite's engine (in process or as a server): no templates, Lite's indexes
    level_vectors: bool = True  # takes a vector field per level (Milvus 2.3 takes one vector field)
    templates: bool | None = None  # templated filter_params (Milvus 2.5+); None: every full server
    partition_key: bool = True  # files upserted rows under the right partition (not Milvus < 2.3.10)

    def __post_init__(self) -> None:
        if self.templates is None:
            self.templates = not self.lite_engine

    def spec(self, spec: CollectionSpec) -> CollectionSpec:
        """`spec` in the layout this target can hold."""
        return spec if self.level_vectors else replace(spec, vector_levels=())

    def needs_level_vectors(self) -> None:
        if not self.level_vectors:
            pytest.skip(f"{self.name} takes one vector field per collection: no per-level vectors to search")


_names = itertools.count()


def fresh_collection() -> str:
    return f"c{next(_names)}_{int(time.time() * 1000) % 100000}"


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
        pytest.param("milvus-2.3", marks=pytest.mark.server),
        pytest.param("docker", marks=pytest.mark.server),
    ]
)
def target(request, tmp_path):
    if request.param == "lite":
        return Target("lite", str(tmp_path / "store.db"), True)
    if request.param == "milvus-lite-server":
        return Target("milvus-lite-server", request.getfixturevalue("lite_server"), True)
    if request.param == "milvus-2.3":
        return Target("Milvus 2.3 (milvus-server)", request.getfixturevalue("embedded_milvus"), False,
                      level_vectors=False, templates=False, partition_key=False)
    return Target("docker", request.getfixturevalue("docker_milvus"), False)
