"""Where the store lives and how to authenticate, with secrets kept out of every message.

URI: a Milvus Lite file path ending in ``.db`` (the default, ``./hiervec.db``), or
``http(s)://host:port`` for a Milvus server or cluster (also ``tcp://``, ``grpc://``,
``unix:``). Token, or user and password, come from arguments or ``HIERVEC_MILVUS_TOKEN``.
"""

from __future__ import annotations

import os
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hiervec_core.names import DEFAULT_URI

from .errors import StoreConnectionError

URI_ENV = "HIERVEC_MILVUS_URI"
TOKEN_ENV = "HIERVEC_MILVUS_TOKEN"
_REMOTE = re.compile(r"^(https?|tcp|grpcs?|unix)://", re.IGNORECASE)
_USERINFO = re.compile(r"(//)([^/@]+)@")


@dataclass(frozen=True)
class ConnectionSettings:
    uri: str
    token: str | None = field(default=None, repr=False)
    user: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @classmethod
    def resolve(
        cls, uri: str | os.PathLike | None = None, *, token: str | None = None, user: str | None = None,
        password: str | None = None,
    ) -> ConnectionSettings:
        uri = str(uri) if uri is not None else os.environ.get(URI_ENV) or DEFAULT_URI
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        if (user is None) != (password is None):
            raise StoreConnectionError("give both user and password, or neither")
        settings = cls(uri, token, user, password)
        if settings.is_local and not uri.endswith(".db"):
            raise StoreConnectionError(
                f"{settings.display_uri!r} is neither a Milvus Lite file path ending in .db nor an "
                f"http(s):// server address"
            )
        return settings

    @property
    def is_local(self) -> bool:
        """A Milvus Lite file opened in this process."""
        return not _REMOTE.match(self.uri)

    @property
    def display_uri(self) -> str:
        """The URI with any user:password@ part masked."""
        return _USERINFO.sub(r"\1***@", self.uri)

    @property
    def secrets(self) -> tuple[str, ...]:
        found = [s for s in (self.token, self.password) if s]
        match = _USERINFO.search(self.uri)
        if match:
            found.append(match.group(2))
            _, _, uri_password = match.group(2).partition(":")
            if uri_password:
                found.append(uri_password)
        return tuple(found)

    def redact(self, text: str) -> str:
        """`text` with every secret of these settings replaced by ``***``."""
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return text

    def client_kwargs(self) -> dict:
        # pymilvus pings idle channels every 10 s; servers on gRPC's default policy
        # (Milvus Lite's, in process or as `milvus-lite server`) answer with GOAWAY
        # "too_many_pings" and the shared channel fails the next call. Ping only while
        # calls are in flight.
        grpc_options = {"grpc.keepalive_permit_without_calls": 0}
        if self.is_local:
            Path(self.uri).expanduser().parent.mkdir(parents=True, exist_ok=True)
            return {"uri": str(Path(self.uri).expanduser()), "grpc_options": grpc_options}
        kwargs: dict = {"uri": self.uri, "grpc_options": grpc_options}
        if self.token:
            kwargs["token"] = self.token
        elif self.user is not None:
            kwargs["user"], kwargs["password"] = self.user, self.password
        return kwargs

    def __repr__(self) -> str:
        auth = "token" if self.token else "user/password" if self.user else "none"
        return f"ConnectionSettings(uri={self.display_uri!r}, auth={auth})"


class LiteServers:
    """Who in this process uses the Milvus Lite file at each path, so that the last one to close stops it.

    Opened by path, pymilvus starts Lite's server on threads of this process
    (``milvus_lite.server_manager``), shared by every client of that path, and stops it only
    at exit: a closed store would keep the file's lock, its background compaction and index
    threads, and its open files until then. `HierStore` holds the path while its client is
    open and lets go in `close`; the last to let go stops the server, which flushes what it
    holds, finishes its background work and releases the lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users: Counter[str] = Counter()

    @staticmethod
    def key(path: str) -> str:
        return os.path.abspath(path)  # how milvus_lite.server_manager names its servers

    def hold(self, path: str) -> str:
        key = self.key(path)
        with self._lock:
            self._users[key] += 1
        return key

    def let_go(self, key: str) -> None:
        with self._lock:  # held while stopping: an opener waits rather than reusing a server being stopped
            self._users[key] -= 1
            if self._users[key] > 0:
                return
            del self._users[key]
            try:
                from milvus_lite.server_manager import server_manager_instance
            except ImportError:  # pymilvus without milvus-lite opens no file
                return
            server_manager_instance.release_server(key)

    def users(self, path: str) -> int:
        with self._lock:
            return self._users.get(self.key(path), 0)


LITE_SERVERS = LiteServers()
