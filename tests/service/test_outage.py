"""A store that goes away is the store's fault: every route answers 503 `store_unavailable` with
Retry-After (not 400), and the same service answers again once the store is back."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from milvus_store import StoreUnavailableError

from ..servers import LiteServer, free_port
from .conftest import ingest_catalogue, png_bytes

pytestmark = pytest.mark.server
KEY = {"X-API-Key": "k3y"}
RECOVERY_S = 120  # a restarted server, and the client's connection to it, back in service (a loaded machine)


def until_not_503(request, retried: list, name: str):
    """The first answer that is not 503, as a client that minds Retry-After gets it (noting each 503 in `retried`)."""
    deadline = time.monotonic() + RECOVERY_S
    while (response := request()).status_code == 503 and time.monotonic() < deadline:
        retried.append(name)
        time.sleep(0.5)
    return response


def empty_index_files(data_dir) -> list[str]:
    """The index files a killed Milvus Lite server left empty under its data folder (it writes them in
    place: SIGKILL in the middle leaves 0 bytes, and every later load of the collection fails reading them).
    Vector (.idx) and scalar (.sidx) indexes alike: both were seen torn."""
    return sorted(path.name for path in data_dir.glob("collections/*/partitions/*/indexes/*")
                  if path.is_file() and path.stat().st_size == 0)


def until_answered(call, torn=lambda: False):
    """What `call` returns once the store answers it: a restarted server's released collection is
    loaded again by the first call that finds it so, and that call is a StoreUnavailableError (retry).
    A load that failed while `torn()` says the data cannot load is raised at once: waiting cannot mend it."""
    deadline = time.monotonic() + RECOVERY_S
    while True:
        try:
            return call()
        except StoreUnavailableError as exc:
            if time.monotonic() > deadline or ("loading it again failed" in str(exc) and torn()):
                raise
            time.sleep(0.5)


def test_a_stopped_milvus_server_is_a_503_with_retry_after_and_the_service_recovers(catalogue, tmp_path):
    from service import Service, ServiceSettings, create_app

    port = free_port()
    server = LiteServer(tmp_path / "milvus", port=port).start()
    try:
        service = Service.open(ServiceSettings(model=str(catalogue.model), uri=server.uri, api_key="k3y",
                                               media_dir=str(tmp_path / "media"), image_roots=(str(catalogue.tree),)))
        ids = ingest_catalogue(service, catalogue)
        upload = png_bytes((220, 40, 40), seed=77)
        with TestClient(create_app(service)) as client:
            requests = {
                "search by id": lambda: client.post("/search", data={"id": ids[0], "k": "3"}),
                "search by image": lambda: client.post("/search", files={"image": ("q.png", upload, "image/png")}),
                "get": lambda: client.get(f"/images/{ids[1]}"),
                "categories": lambda: client.get("/categories"),
                "stats": lambda: client.get("/stats"),
                "upload": lambda: client.post("/images", headers=KEY, files={"images": ("u.png", upload, "image/png")},
                                              data={"category": "clothing/tops/shirt"}),
                "delete": lambda: client.delete(f"/images/{ids[2]}", headers=KEY),
            }
            assert client.post("/search", data={"id": ids[0], "k": "3"}).status_code == 200
            server.stop(kill=True)  # the store goes away mid-service
            for name, request in requests.items():
                response = request()
                assert response.status_code == 503, (name, response.text)
                assert response.json()["error"]["code"] == "store_unavailable", name
                assert response.headers["Retry-After"] == "5", name
            assert client.get("/healthz").status_code == 503
            # where the store lives is the operator's business: anonymous clients read "<store>"
            anonymous = requests["search by id"]().json()["error"]["message"]
            assert server.uri not in anonymous and "<store>" in anonymous, anonymous
            admin = client.post("/search", data={"id": ids[0]}, headers=KEY).json()["error"]["message"]
            assert server.uri in admin

            server = LiteServer(tmp_path / "milvus", port=port).start()  # back, on the same address and data
            # a restarted Milvus Lite server holds the collection released: the first call finds it so, loads it
            # and answers 503 (retry), as does a call the client's connection makes before it has reconnected
            # (a retry minding Retry-After, up to a deadline); once one route has answered, every route answers
            retried = []
            for name, request in requests.items():
                response = until_not_503(request, retried, name)
                assert response.status_code == 200, (name, response.text)
            assert set(retried) <= {"search by id"}, retried
            assert client.get("/healthz").json()["count"] == len(ids)  # the upload stored one, the delete removed one
            assert client.get("/stats").json()["uri"] == "<store>"
            assert client.get("/stats", headers=KEY).json()["uri"] == server.uri
    finally:
        server.stop()


def test_a_milvus_that_takes_connections_and_never_answers_is_a_503_after_the_store_deadline(catalogue, tmp_path,
                                                                                             capsys):
    """A stopped (SIGSTOP) server still takes connections and never answers: every store call has the
    service's deadline (`store_timeout_s`), so the request is a 503 with Retry-After, not held for ever."""
    import os
    import signal
    import threading

    from service import Service, ServiceSettings, create_app

    server = LiteServer(tmp_path / "milvus").start()
    service = None
    try:
        service = Service.open(ServiceSettings(model=str(catalogue.model), uri=server.uri, media_dir=None,
                                               image_roots=(str(catalogue.tree),), store_timeout_s=2.0))
        ids = ingest_catalogue(service, catalogue)
        with TestClient(create_app(service)) as client:
            def search():
                return client.post("/search", data={"id": ids[0], "k": "3"})

            assert search().status_code == 200
            answered = []
            os.kill(server.process.pid, signal.SIGSTOP)  # alive, listening, silent
            try:
                asking = threading.Thread(target=lambda: answered.append(search()), daemon=True)
                asking.start()
                started = time.monotonic()
                asking.join(timeout=30)  # a few calls of 2 s each; without a deadline, pymilvus waits 100 s and more
                waited = time.monotonic() - started
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            assert answered, f"a search against a silent store was still waiting after {waited:.0f} s"
            with capsys.disabled():
                print(f"\nsilent store: 503 after {waited:.1f} s (store_timeout_s=2)")
            [response] = answered
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "store_unavailable"
            assert response.headers["Retry-After"] == "5"
            assert until_not_503(search, [], "search").status_code == 200  # answered again once the server is
    finally:
        if service is not None:
            service.close()
        server.stop()


def test_the_services_own_lite_process_is_started_again_when_it_dies(catalogue, tmp_path):
    import os
    import signal

    from service import Service, ServiceSettings, create_app

    service = Service.open(ServiceSettings(model=str(catalogue.model), uri=str(tmp_path / "own.db"), lite_process=True,
                                           alias_check_s=0.2, image_roots=(str(catalogue.tree),), media_dir=None))
    try:
        ids = ingest_catalogue(service, catalogue)
        uri, first = service.lite.uri, service.lite.process.pid
        with TestClient(create_app(service)) as client:
            assert client.post("/search", data={"id": ids[0], "k": "3"}).status_code == 200
            os.kill(first, signal.SIGKILL)  # the child dies under the service
            answers, deadline = [], time.monotonic() + 120
            while time.monotonic() < deadline:
                answers.append(client.post("/search", data={"id": ids[0], "k": "3"}).status_code)
                if answers[-1] == 200:
                    break
                time.sleep(0.2)
            assert answers[-1] == 200 and set(answers) <= {200, 503}, answers  # 503 while it was down, never 400/500
            assert service.lite.uri == uri and service.lite.process.pid != first  # a new process, the same address
            assert client.get("/healthz").json()["count"] == len(ids)
    finally:
        service.close()
    assert not service.lite.running


def test_chaos_the_store_killed_and_restarted_under_a_client_loop_loses_no_acknowledged_write(catalogue, tmp_path,
                                                                                              capsys):
    """A bounded client loop (uploads of new images and searches) while the Milvus server under the
    service is killed and restarted twice: no 500, no 400 for the fault (only 200 and 503), and every
    upload the service acknowledged is in the store afterwards. The figures go to RELIABILITY.md."""
    import threading

    from service import Service, ServiceSettings, create_app

    port = free_port()
    server = LiteServer(tmp_path / "milvus", port=port).start()
    service = Service.open(ServiceSettings(model=str(catalogue.model), uri=server.uri, api_key="k3y",
                                           media_dir=str(tmp_path / "media"), image_roots=(str(catalogue.tree),)))
    ids = ingest_catalogue(service, catalogue)
    statuses, acknowledged, stop = [], set(), threading.Event()
    try:
        with TestClient(create_app(service)) as client:
            def loop():
                seed = 1000
                while not stop.is_set():
                    seed += 1
                    upload = client.post("/images", headers=KEY, data={"category": "clothing/tops/shirt"},
                                         files={"images": (f"{seed}.png", png_bytes((seed % 250, 40, 40), seed),
                                                           "image/png")})
                    statuses.append(upload.status_code)
                    if upload.status_code == 200:
                        acknowledged.update(r["id"] for r in upload.json()["results"] if r["status"] == "stored")
                    statuses.append(client.post("/search", data={"id": ids[seed % len(ids)], "k": "3"}).status_code)
                    if 503 in statuses[-2:]:
                        time.sleep(0.05)  # a client that minds Retry-After waits; this one only a little

            worker = threading.Thread(target=loop)
            worker.start()
            for _ in range(2):  # twice: up a while, killed, down a while, back on the same port and data
                time.sleep(2)
                server.stop(kill=True)
                time.sleep(1.5)
                server = LiteServer(tmp_path / "milvus", port=port).start()
            time.sleep(2)
            stop.set()
            worker.join(timeout=120)
            assert not worker.is_alive()
            try:
                stored = {r.id for r in until_answered(lambda: service.index(None).store.get(sorted(acknowledged)),
                                                       torn=lambda: empty_index_files(tmp_path / "milvus"))}
            except StoreUnavailableError:
                if not (torn := empty_index_files(tmp_path / "milvus")):
                    raise
                stored = None
    finally:
        stop.set()
        service.close()
        server.stop()
    figures = {"requests": len(statuses), "200": statuses.count(200), "503": statuses.count(503),
               "other": len(statuses) - statuses.count(200) - statuses.count(503),
               "acknowledged writes": len(acknowledged), "lost": None if stored is None else len(acknowledged - stored)}
    with capsys.disabled():
        print(f"\nchaos: {figures}")
    assert figures["other"] == 0, statuses  # no 500, no 400 for a fault
    assert figures["503"] > 0 and figures["200"] > 0 and acknowledged  # the faults were met, and work went on
    if stored is None:  # Milvus Lite's fault, not hiervec's: reported as such (RELIABILITY.md), not passed
        pytest.xfail(f"Milvus Lite, killed while it wrote an index, left {torn} empty and cannot load the "
                     f"collection again: the acknowledged writes could not be read back")
    assert figures["lost"] == 0
