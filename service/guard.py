"""Connection guards below the ASGI app, where slow clients are visible: `hiervec serve` runs
uvicorn with `GuardedH11Protocol`.

A client that trickles its request headers (a byte now and then, "slowloris") never reaches
the app, so no middleware can bound it, and uvicorn neither times out headers nor limits
connections per client. Each connection here must finish a request's headers within
`header_timeout_s` of opening (or of its previous response), or it is closed; and one client
address holds at most `max_per_client` connections, the next ones are answered 503 and closed.
Requests in progress are bounded in the app (`service.middleware.CountRequests`), so the
connections that wait for headers take no request slot from anybody.

The settings come from the environment when the module is imported (uvicorn's worker
processes import it by name): ``HIERVEC_HEADER_TIMEOUT_S`` and ``HIERVEC_MAX_CONNECTIONS_PER_CLIENT``.
For the open internet put a proxy in front anyway (README, "HTTP service").
"""

from __future__ import annotations

import json
import os
from collections import Counter

from uvicorn.protocols.http.h11_impl import H11Protocol

from .settings import ServerSettings

HEADER_TIMEOUT_S = ServerSettings.header_timeout_s
MAX_CONNECTIONS_PER_CLIENT = ServerSettings.max_connections_per_client
HEADER_END = b"\r\n\r\n"


def _too_many_response() -> bytes:
    body = json.dumps({"error": {"status": 503, "code": "too_many_connections",
                                 "message": "too many connections from this address; retry later"}}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 5\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on request headers and a bound on connections per client."""

    header_timeout_s = float(os.environ.get("HIERVEC_HEADER_TIMEOUT_S", HEADER_TIMEOUT_S))
    max_per_client = int(os.environ.get("HIERVEC_MAX_CONNECTIONS_PER_CLIENT", MAX_CONNECTIONS_PER_CLIENT))
    open_per_client: Counter = Counter()  # this process's connections by client address (one event loop)
    closed_slow = 0  # connections closed for not finishing their headers in time (for tests and logs)
    turned_away = 0  # connections answered 503 because their client held `max_per_client` already

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._host = self.client[0] if self.client else ""
        self._header_timer = None
        self._tail = b""
        type(self).open_per_client[self._host] += 1
        if type(self).open_per_client[self._host] > self.max_per_client:
            type(self).turned_away += 1
            transport.write(_too_many_response())
            transport.close()
            return
        self._arm()

    def connection_lost(self, exc) -> None:
        self._cancel()
        counts = type(self).open_per_client
        counts[self._host] -= 1
        if counts[self._host] <= 0:
            del counts[self._host]
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._header_timer is not None:  # waiting for the end of a request's headers
            seen = self._tail + data
            if HEADER_END in seen:
                self._cancel()
            else:
                self._tail = seen[-(len(HEADER_END) - 1):]
        super().data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():  # the next request on this connection has its own deadline
            self._tail = b""
            self._arm()

    def _arm(self) -> None:
        self._cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _cancel(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            type(self).closed_slow += 1
            self.transport.close()


def configure(header_timeout_s: float, max_per_client: int) -> str:
    """Set the guards for this process and for the worker processes it starts (through the
    environment); returns the protocol's import path for uvicorn's ``http`` option."""
    os.environ["HIERVEC_HEADER_TIMEOUT_S"] = str(header_timeout_s)
    os.environ["HIERVEC_MAX_CONNECTIONS_PER_CLIENT"] = str(max_per_client)
    GuardedH11Protocol.header_timeout_s, GuardedH11Protocol.max_per_client = header_timeout_s, max_per_client
    return f"{__name__}:GuardedH11Protocol"
