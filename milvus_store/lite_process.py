"""A Milvus Lite file served from a process of its own.

Opened by path, Milvus Lite runs inside the opening process: pymilvus starts Lite's gRPC
server on a thread there (``milvus_lite.server_manager``), and every search and write is
then parsed, filtered and answered by Python code sharing that process's interpreter lock
with whatever else it does. A long-running process that also embeds and answers HTTP
(``hiervec serve``) loses a large share of its time to it (BENCHMARKS.md, "The HTTP service
under load"). `LiteProcess` runs the same server, on the same file, in a child process
instead, and hands back its ``http://127.0.0.1:PORT`` URI; clients use it like any
server, and several processes (``serve --workers``) can share one Lite file through it.

>>> with LiteProcess("./hiervec.db") as lite:                      # doctest: +SKIP
...     store = HierStore(lite.uri, "images")

The child binds a free loopback port itself and reports it, holds the file's lock while it
runs, and stops when it is stopped, or when its parent dies (its stdin closes): a crashed
parent never leaves the file locked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from .connection import ConnectionSettings
from .errors import StoreConnectionError

READY = "hiervec-lite-port"
logger = logging.getLogger(__name__)


class LiteProcess:
    """`milvus-lite`'s server on the Lite file `path`, in a child process, on a free loopback port."""

    def __init__(self, path: str | os.PathLike, *, start_seconds: float = 120, port: int = 0):
        settings = ConnectionSettings.resolve(path)
        if not settings.is_local:
            raise StoreConnectionError(f"{settings.display_uri!r} is a server address, not a Milvus Lite file")
        self.path = Path(settings.uri).expanduser().resolve()
        self.start_seconds = start_seconds
        self.port = port  # 0: a free one, chosen by the child; after a start, the one it serves on
        self.uri: str | None = None
        self.process: subprocess.Popen | None = None

    def start(self) -> LiteProcess:
        from .store import _locked_by_another_process

        if _locked_by_another_process(str(self.path)):
            raise StoreConnectionError(f"cannot open Milvus at {str(self.path)!r}: another process has it open "
                                       f"(a Milvus Lite file is used by one process at a time)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen([sys.executable, "-m", "milvus_store.lite_process", str(self.path),
                                         str(self.port)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        said: list[str] = []
        timer = threading.Timer(self.start_seconds, self.process.kill)
        timer.start()
        try:
            for line in self.process.stdout:
                if line.startswith(READY):
                    self.port = int(line.split()[1])
                    self.uri = f"http://127.0.0.1:{self.port}"
                    for stream in (self.process.stdout, self.process.stderr):  # a full pipe would stall the child
                        threading.Thread(target=_forward, args=(stream,), daemon=True,
                                         name=f"lite-process-{self.process.pid}").start()
                    return self
                said.append(line)
        finally:
            timer.cancel()
        self.process.wait()
        reason = (self.process.stderr.read().strip().splitlines() or said or ["it exited"])[-1]
        raise StoreConnectionError(f"cannot serve Milvus Lite file {str(self.path)!r} from a process of its own: "
                                   f"{reason}")

    def stop(self, seconds: float = 30) -> None:
        """Stop the server (it finishes the calls in progress and closes the file)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.stdin.close()  # the child stops on end of input, as when this process dies
        try:
            process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def restart(self) -> LiteProcess:
        """Start the server again after it died, on the same port (clients keep their URI)."""
        if self.process is not None:
            self.process.wait()  # reap it: no zombie
            self.process = None
        return self.start()

    def __enter__(self) -> LiteProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _forward(stream) -> None:
    """What the child says once it serves, to this process's log, line by line, until it exits."""
    with contextlib.suppress(ValueError, OSError):  # the pipe closed under the reader
        for line in stream:
            if line.strip():
                logger.warning("Milvus Lite process: %s", line.rstrip())


def _serve(path: str, port: int = 0) -> None:
    """The child: serve `path` on `port` (0: a free loopback port), say which, and stop when stdin closes."""
    from milvus_lite.adapter.grpc.server import start_server_in_thread

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the terminal reaches the parent, which stops us
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a stop from outside still closes the file
    server, db, port = start_server_in_thread(data_dir=path, host="127.0.0.1", port=port)
    try:
        print(f"{READY} {port}", flush=True)
        sys.stdin.read()  # until the parent closes it or dies
    finally:
        server.stop(grace=5).wait()
        db.close()


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    _serve(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
