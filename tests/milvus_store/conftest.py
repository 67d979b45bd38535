"""Store targets: Milvus Lite in tmp_path, a `milvus-lite server` process, and Docker's Milvus.

The same test class runs against each (fixture `target`); Docker's case is skipped with
the reason where no Docker engine answers.
"""

import itertools
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..ports import free_port

MILVUS_IMAGE = "milvusdb/milvus:v2.5.14"  # pinned: the standalone release docker-compose.yml runs


@dataclass
class Target:
    name: str
    uri: str
    lite_engine: bool  # Milvus Lite's engine (in process or as a server): no templates, Lite's indexes


_names = itertools.count()


def fresh_collection() -> str:
    return f"c{next(_names)}_{int(time.time() * 1000) % 100000}"


def wait_until_serving(port: int, process: subprocess.Popen, seconds: float = 90) -> None:
    """Until a client call succeeds: the port is bound before the gRPC service answers."""
    from pymilvus import MilvusClient

    deadline = time.monotonic() + seconds
    last_error = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"milvus-lite server exited with {process.returncode}: {process.stdout.read()}")
        with socket.socket() as sock:
            listening = sock.connect_ex(("127.0.0.1", port)) == 0
        if listening:
            try:
                client = MilvusClient(uri=f"http://127.0.0.1:{port}", timeout=5)
                client.get_server_version()
                client.close()
                return
            except Exception as exc:  # not serving yet
                last_error = exc
        time.sleep(0.5)
    raise RuntimeError(f"milvus-lite server on port {port} did not serve within {seconds}s: {last_error}")


@pytest.fixture(scope="session")
def lite_server(tmp_path_factory):
    """A `milvus-lite server` on a free loopback port, for client/server tests here."""
    executable = shutil.which("milvus-lite", path=str(Path(sys.executable).parent)) or shutil.which("milvus-lite")
    if executable is None:
        pytest.fail("milvus-lite is a runtime dependency but its `milvus-lite` command is missing")
    port = free_port()
    data = tmp_path_factory.mktemp("milvus-lite-server")
    process = subprocess.Popen(
        [executable, "server", "--data-dir", str(data), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_until_serving(port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


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
