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


def trickle(port: int, stop: threading.Event, outcome: list) -> None:
    """Open a connection from SLOW and send header lines forever, one every 0.2 s; record how it ended."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(SLOW, 0))
    started = time.monotonic()
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                sock.sendall(b"X-Slow: 1\r\n")
                answer = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                outcome.append(("closed", time.monotonic() - started))
                return
            if not answer:
                outcome.append(("closed", time.monotonic() - started))
                return
            if b" 503 " in answer.split(b"\r\n", 1)[0]:
                outcome.append(("refused", time.monotonic() - started, answer))
                return
        outcome.append(("still open", time.monotonic() - started))
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
    closed_before = GuardedH11Protocol.closed_slow
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
        slow = [threading.Thread(target=trickle, args=(port, stop, outcomes), daemon=True) for _ in range(12)]
        for client in slow:  # twice the per-client bound, three times the request slots
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
        kinds = sorted(outcome[0] for outcome in outcomes)
        assert kinds == ["closed"] * 6 + ["refused"] * 6, outcomes  # 6 admitted and cut off, 6 turned away
        assert all(0.9 < o[1] < 8 for o in outcomes if o[0] == "closed"), outcomes  # 1 s deadline, late if loaded
        assert all(b"too_many_connections" in o[2] for o in outcomes if o[0] == "refused")
        assert GuardedH11Protocol.closed_slow - closed_before == 6
    finally:
        stop.set()
        for client in slow:
            client.join(timeout=5)
        server.should_exit = True
        thread.join(timeout=10)
        service.close()
        GuardedH11Protocol.header_timeout_s, GuardedH11Protocol.max_per_client = saved
