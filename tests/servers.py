"""Servers the tests start on loopback: free ports and `milvus-lite server` processes."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiteServer:
    """`milvus-lite server` on `data_dir`: a separate Milvus process, stoppable and restartable on one port."""

    def __init__(self, data_dir: Path, port: int | None = None):
        self.data_dir, self.port = Path(data_dir), port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, seconds: float = 90) -> LiteServer:
        executable = shutil.which("milvus-lite", path=str(Path(sys.executable).parent)) or shutil.which("milvus-lite")
        if executable is None:
            raise RuntimeError("milvus-lite is a runtime dependency but its `milvus-lite` command is missing")
        self.process = subprocess.Popen(
            [executable, "server", "--data-dir", str(self.data_dir), "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        wait_until_serving(self.port, self.process, seconds)
        return self

    def stop(self, *, kill: bool = False) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> LiteServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_until_serving(port: int, process: subprocess.Popen, seconds: float = 90) -> None:
    """Until a client call succeeds: the port is bound before the gRPC service answers.

    The probe connects exactly as `HierStore` does (pymilvus shares channels), so it
    never leaves behind a channel that pings the server into a GOAWAY.
    """
    from pymilvus import MilvusClient

    from milvus_store import ConnectionSettings

    deadline = time.monotonic() + seconds
    last_error = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"milvus-lite server exited with {process.returncode}: {process.stdout.read()}")
        with socket.socket() as sock:
            listening = sock.connect_ex(("127.0.0.1", port)) == 0
        if listening:
            try:
                client = MilvusClient(**ConnectionSettings.resolve(f"http://127.0.0.1:{port}").client_kwargs(),
                                      timeout=5)
                client.get_server_version()
                client.close()
                return
            except Exception as exc:  # not serving yet
                last_error = exc
        time.sleep(0.5)
    raise RuntimeError(f"milvus-lite server on port {port} did not serve within {seconds}s: {last_error}")
