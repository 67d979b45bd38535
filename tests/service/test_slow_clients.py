"""Slow clients starve no one: a connection that trickles its headers is closed after the header
deadline, one address holds a bounded number of connections, and connections waiting for headers
take no request slot (requests in progress are bounded in the app), so other clients keep getting
answers throughout. A bounded loop on loopback: slow clients from 127.0.0.2, a normal one from
127.0.0.3 (Linux routes all of 127.0.0.0/8 to the loopback interface)."""

from __future__ import annotations

import http.client
import socket
import threading
import time

import pytest

from ..servers import free_port
from .conftest import ingest_catalogue

pytestmark = pytest.mark.lite
SLOW, NORMAL = "127.0.0.2", "127.0.0.3"


def trickle(sock: socket.socket, started: float, stop: threading.Event, outcome: list) -> None:
    """Wait 0.5 s for a refusal, then send header lines forever, one every 0.2 s; record how the
    connection ended and when (seconds since `started`, before it connected): ("refused", s, answer)
    for a 503, ("closed", s) for a connection the server closed, ("answered", s, answer) otherwise.

    A refused connection that had unread bytes when the server closed it is reset, and a reset
    can discard the 503 before it is read: waiting first leaves the server nothing unread (and
    the test still tells such a refusal from a deadline cut by its time, before the deadline).
    """
    sock.settimeout(0.5)
    try:
        first = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
        while not stop.is_set():
            try:
                answer = sock.recv(4096)
            except TimeoutError:
                sock.sendall(first or b"X-Slow: 1\r\n")
                first = b""
                sock.settimeout(0.2)
                continue
            except OSError:
                outcome.append(("closed", time.monotonic() - started))
                return
            if not answer:
                outcome.append(("closed", time.monotonic() - started))
            elif b" 503 " in answer.split(b"\r\n", 1)[0]:
                outcome.append(("refused", time.monotonic() - started, answer))
            else:
                outcome.append(("answered", time.monotonic() - started, answer))
            return
        outcome.append(("still open", time.monotonic() - started))
    except OSError:  # the server closed it between our recv and sendall
        outcome.append(("closed", time.monotonic() - started))
    finally:
        sock.close()


def test_trickling_clients_are_cut_off_and_others_keep_getting_answers(catalogue, tmp_path):
    import uvicorn

    from service import Service, ServiceSettings, create_app
    from service.guard import GuardedH11Protocol

    try:  # the addresses this test needs
        socket.create_connection(("127.0.0.1", 9), timeout=1, source_address=(SLOW, 0)).close()
    except ConnectionRefusedError:
        pass
    except OSError as exc:
        pytest.skip(f"cannot open connections from {SLOW} here: {exc}")
    service = Service.open(ServiceSettings(lite_process=False, model=str(catalogue.model), uri=str(tmp_path / "slow.db"), max_requests=4,
                                           image_roots=(str(catalogue.tree),), media_dir=None))
    ingest_catalogue(service, catalogue)
    saved = GuardedH11Protocol.header_timeout_s, GuardedH11Protocol.max_per_client
    GuardedH11Protocol.header_timeout_s, GuardedH11Protocol.max_per_client = 1.0, 6
    closed_before, turned_away_before = GuardedH11Protocol.closed_slow, GuardedH11Protocol.turned_away
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning",
                                           http=GuardedH11Protocol))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    stop, outcomes, slow = threading.Event(), [], []
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        # twice the per-client bound, three times the request slots; all connected before any
        # trickles, so that none arrives after the first ones were cut off and freed their places
        connecting = time.monotonic()
        sockets = [socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(SLOW, 0))
                   for _ in range(12)]
        slow = [threading.Thread(target=trickle, args=(sock, connecting, stop, outcomes), daemon=True) for sock in sockets]
        for client in slow:
            client.start()
        answers, started = [], time.monotonic()
        while time.monotonic() - started < 3:  # a normal client, the whole time the slow ones trickle
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(NORMAL, 0))
            connection.request("GET", "/healthz")
            answers.append(connection.getresponse().status)
            connection.close()
            time.sleep(0.05)
        assert answers and set(answers) == {200}, answers
        for client in slow:
            client.join(timeout=10)
        # the server's own count: 6 admitted and cut off at the deadline, 6 turned away
        assert GuardedH11Protocol.closed_slow - closed_before == 6, outcomes
        assert GuardedH11Protocol.turned_away - turned_away_before == 6, outcomes
        # and what the clients saw: 6 closed at the 1 s deadline (late if loaded), 6 refused
        # (a 503 read, or a refusal whose 503 a reset discarded: closed before any deadline)
        assert len(outcomes) == 12 and all(o[0] in ("closed", "refused") for o in outcomes), outcomes
        cut = [o for o in outcomes if o[0] == "closed" and o[1] >= 1.0]
        refused = [o for o in outcomes if o not in cut]
        assert len(cut) == 6 and all(o[1] < 8 for o in cut), outcomes
        assert all(b"too_many_connections" in o[2] for o in refused if o[0] == "refused"), outcomes
        assert any(o[0] == "refused" for o in refused), outcomes  # at least one 503 reaches its client
    finally:
        stop.set()
        for client in slow:
            client.join(timeout=5)
        server.should_exit = True
        thread.join(timeout=10)
        service.close()
        GuardedH11Protocol.header_timeout_s, GuardedH11Protocol.max_per_client = saved
