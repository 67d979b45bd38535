"""`hiervec serve` as users run it: a real uvicorn process on loopback, driven over HTTP."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import pytest

from ..commands import HIERVEC, run
from ..servers import free_port, terminate
from .conftest import LEAVES, PER_LEAF

pytestmark = pytest.mark.lite


STARTUP_S = 180  # a `hiervec serve` process answering /healthz, on a loaded 2-core machine


def wait_for(url: str, process: subprocess.Popen, seconds: float = STARTUP_S) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}: {process.stderr.read()}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {seconds}s")


STOP_S = 90  # a `hiervec serve` process stopping (its Lite process first) before SIGKILL


@pytest.fixture
def server(catalogue, tmp_path):
    db = tmp_path / "serve.db"
    run("ingest", catalogue.tree, "--model", catalogue.model, "--uri", db)
    port = free_port()
    env = dict(os.environ, HIERVEC_API_KEY="serve-k3y")
    process = subprocess.Popen(
        [*HIERVEC, "serve", "--model", str(catalogue.model),
         "--uri", str(db), "--port", str(port), "--image-root", str(catalogue.tree), "--media",
         str(tmp_path / "media"), "--batch-window-ms", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/healthz", process)
        yield base
    finally:
        terminate(process, STOP_S)


def test_serve_answers_searches_writes_and_batches_concurrent_queries(server, catalogue):
    health = httpx.get(f"{server}/healthz").json()
    assert health["status"] == "ok" and health["count"] == len(LEAVES) * PER_LEAF
    query = catalogue.files["footwear/boots/boot"][2]
    hits = httpx.post(f"{server}/search", files={"image": (query.name, query.read_bytes())},
                      data={"k": 3, "under": "footwear"}).json()["hits"]
    assert len(hits) == 3 and all(h["category"] == "footwear/boots/boot" for h in hits)
    assert httpx.get(hits[0]["image_url"]).content == query.read_bytes()

    assert httpx.post(f"{server}/images", files={"images": ("n.png", query.read_bytes())},
                      data={"category": "a/b/c"}).status_code == 401
    added = httpx.post(f"{server}/images", files={"images": ("n.png", query.read_bytes())},
                       data={"category": "footwear/boots/boot", "id": "new"}, headers={"X-API-Key": "serve-k3y"})
    assert added.json()["stored"] == 1

    images = [p.read_bytes() for paths in catalogue.files.values() for p in paths]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda data: httpx.post(f"{server}/search", files={"image": ("q.png", data)},
                                                          data={"k": 1}, timeout=60), images))
    assert all(r.status_code == 200 for r in responses)
    assert [r.json()["hits"][0]["distance"] < 1e-4 for r in responses] == [True] * len(images)
    stats = httpx.get(f"{server}/stats").json()
    assert stats["embedding"]["items"] == len(images) + 1 == stats["searching"]["items"]
    assert stats["embedding"]["batches"] < stats["embedding"]["items"]  # concurrent queries shared forward passes
    assert stats["searching"]["batches"] < stats["searching"]["items"]  # ... and Milvus search calls


def test_serve_refuses_several_workers_on_a_lite_file_opened_in_process(catalogue, tmp_path):
    result = run("serve", "--model", catalogue.model, "--uri", tmp_path / "x.db", "--workers", "2", "--lite-in-process",
                 ok=False)
    assert result.exit_code == 2
    assert "--workers above 1 with a Milvus Lite file needs --lite-process" in result.stderr
    assert not (tmp_path / "x.db").exists()


def test_serve_with_several_workers_shares_one_lite_file_through_its_own_process(catalogue, tmp_path):
    from milvus_store.store import _locked_by_another_process

    db = tmp_path / "shared.db"
    run("ingest", catalogue.tree, "--model", catalogue.model, "--uri", db)
    port = free_port()
    process = subprocess.Popen(
        [*HIERVEC, "serve", "--model", str(catalogue.model), "--uri", str(db), "--port", str(port),
         "--workers", "2", "--image-root", str(catalogue.tree), "--api-key", "k3y"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/healthz", process, seconds=2 * STARTUP_S)
        query = catalogue.files["clothing/tops/coat"][0]
        added = httpx.post(f"{base}/images", files={"images": ("n.png", query.read_bytes())},
                           data={"category": "clothing/tops/coat", "id": "added-by-one-worker"},
                           headers={"X-API-Key": "k3y"}, timeout=60)
        assert added.json()["stored"] == 1
        with ThreadPoolExecutor(4) as pool:  # whichever worker answers reads the one file, new image included
            answers = list(pool.map(lambda _: httpx.post(f"{base}/search", files={"image": ("q.png", query.read_bytes())},
                                                         data={"k": 3}, timeout=60), range(16)))
        assert all(a.status_code == 200 for a in answers)
        assert all("added-by-one-worker" in [h["id"] for h in a.json()["hits"]] for a in answers)
        assert httpx.get(f"{base}/healthz").json()["count"] == len(LEAVES) * PER_LEAF + 1
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert "Milvus Lite in a process of its own" in process.stderr.read()
    assert not _locked_by_another_process(str(db))  # the Lite process went with the server


def test_serve_reports_a_missing_model_as_one_line(tmp_path):
    result = run("serve", "--model", tmp_path / "none.pt", "--uri", tmp_path / "x.db", ok=False)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "none.pt" in result.stderr


@pytest.fixture
def fake_uvicorn(monkeypatch) -> list[dict]:
    """`uvicorn.run` recording its arguments (the app included) instead of serving."""
    import uvicorn

    monkeypatch.delenv("HIERVEC_API_KEY", raising=False)
    for name in ("HIERVEC_HEADER_TIMEOUT_S", "HIERVEC_MAX_CONNECTIONS_PER_CLIENT"):  # serve sets them for workers
        monkeypatch.delenv(name, raising=False)
    started = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: started.append(dict(k, app=a[0])))
    return started


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "search.example.com"])
def test_serve_refuses_open_writes_on_a_reachable_address(catalogue, tmp_path, host, fake_uvicorn):
    result = run("serve", "--model", str(catalogue.model), "--uri", str(tmp_path / "x.db"), "--host", host, ok=False)
    assert result.exit_code == 2 and f"--host {host} is reachable from other machines" in result.stderr
    assert not fake_uvicorn and not (tmp_path / "x.db").exists()  # refused before anything was opened


def test_serve_on_a_reachable_address_with_a_key_or_anonymous_writes_allowed(catalogue, tmp_path, fake_uvicorn):
    """What the refusal above asks for (each start builds the app: 3 s here, so one address)."""
    args = ["serve", "--model", str(catalogue.model), "--uri", str(tmp_path / "x.db"), "--host", "::"]
    result = run(*args, "--allow-anonymous-writes", ok=False)
    assert result.exit_code == 0, result.stderr
    assert fake_uvicorn[0]["host"] == "::" and "warning: no API key" in result.stderr
    result = run(*args, "--api-key", "k3y", "--max-requests", "7", "--header-timeout", "3", ok=False)
    assert result.exit_code == 0 and "warning" not in result.stderr
    last = fake_uvicorn[-1]
    assert last["http"] == "service.guard:GuardedH11Protocol" and "limit_concurrency" not in last
    assert last["app"].state.service.settings.max_requests == 7
    assert fake_uvicorn[0]["app"].state.service.settings.max_requests == 64
    assert os.environ["HIERVEC_HEADER_TIMEOUT_S"] == "3.0"


def test_serve_on_loopback_without_a_key_warns(catalogue, tmp_path, monkeypatch):
    import uvicorn

    monkeypatch.delenv("HIERVEC_API_KEY", raising=False)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    for host in ("127.0.0.1", "localhost", "::1"):
        result = run("serve", "--model", catalogue.model, "--uri", tmp_path / f"{host.strip(':') or 'v6'}.db",
                     "--host", host, ok=False)
        assert result.exit_code == 0 and "warning: no API key" in result.stderr


@pytest.mark.server
def test_serve_with_several_workers_against_a_milvus_server(catalogue, tmp_path):
    from ..servers import LiteServer

    with LiteServer(tmp_path / "milvus") as milvus:
        run("ingest", catalogue.tree, "--model", catalogue.model, "--uri", milvus.uri)
        port = free_port()
        env = dict(os.environ, HIERVEC_API_KEY="workers-k3y", HIERVEC_MILVUS_TOKEN="root:Milvus")
        process = subprocess.Popen(
            [*HIERVEC, "serve", "--model", str(catalogue.model), "--uri", milvus.uri, "--port", str(port),
             "--workers", "2", "--image-root", str(catalogue.tree)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_for(f"{base}/healthz", process, seconds=2 * STARTUP_S)
            query = catalogue.files["clothing/tops/coat"][0]
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(lambda _: httpx.post(f"{base}/search", files={"image": ("q.png", query.read_bytes())},
                                                             data={"k": 2}, timeout=60), range(8)))
            assert all(a.status_code == 200 and a.json()["hits"][0]["distance"] < 1e-4 for a in answers)
            assert httpx.post(f"{base}/images", files={"images": ("q.png", query.read_bytes())},
                              data={"category": "a/b/c"}).status_code == 401  # the key reached the workers
        finally:
            process.terminate()
            process.wait(timeout=60)
        assert "workers-k3y" not in process.stderr.read()


def peak_rss(pid: int) -> int:
    status = open(f"/proc/{pid}/status").read()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="reads and resets peak RSS through Linux's /proc")
def test_serve_keeps_its_memory_budget_under_a_burst_of_large_images(catalogue, tmp_path):
    """32 clients at once, each with a 3.9-megapixel query (25 kB as PNG, 23 MB decoded with its
    resized copy): peak memory grows by less than the budget the service reports, which counts
    two decoded images at a time on 2 CPUs, not 32."""
    import io

    import numpy as np
    from PIL import Image

    db = tmp_path / "budget.db"
    run("ingest", catalogue.tree, "--model", catalogue.model, "--uri", db)
    port = free_port()
    process = subprocess.Popen(
        [*HIERVEC, "serve", "--model", str(catalogue.model), "--uri", str(db), "--port", str(port),
         "--max-upload-mb", "1", "--max-megapixels", "4", "--max-requests", "48", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/healthz", process)
        rng = np.random.default_rng(0)
        images = []
        for i in range(32):
            pixels = np.zeros((1980, 1980, 3), np.uint8)
            pixels[::64, ::64] = rng.integers(0, 255, (31, 31, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            images.append(buffer.getvalue())
        assert max(map(len, images)) < 2**20
        warm = httpx.post(f"{base}/search", files={"image": ("w.png", images[0])}, data={"k": 1}, timeout=60)
        assert warm.status_code == 200, warm.text
        budget = httpx.get(f"{base}/stats").json()["memory_budget_bytes"]
        with open(f"/proc/{process.pid}/clear_refs", "w") as refs:
            refs.write("5")  # peak RSS := current RSS
        before = peak_rss(process.pid)
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda data: httpx.post(f"{base}/search", files={"image": ("q.png", data)},
                                                            data={"k": 1}, timeout=120), images))
        assert all(a.status_code == 200 for a in answers), {a.status_code for a in answers}
        grown = peak_rss(process.pid) - before
        decoded = 1980 * 1980 * 3 * 2
        assert grown < budget["total"], (grown, budget)
        assert grown < 8 * decoded, f"peak grew by {grown / 2**20:.0f} MiB: more than 8 decoded images at once"
    finally:
        terminate(process, STOP_S)


@pytest.mark.server
def test_serve_follows_an_alias_switch_under_load_without_a_failed_or_mixed_response(catalogue, tmp_path):
    """`hiervec serve --collection shop` (an alias) while `hiervec reindex --switch` moves the alias to a
    collection of another model: a client loop runs across the switch; every response is 200 and comes
    whole from the old model and collection or from the new ones (its query, stored in both, is its own
    nearest hit at distance 0, which a query of one model in the other's collection is not)."""
    import torch

    from embedder import EmbedderConfig, Hierarchy, PyramidEmbedder, save_checkpoint

    from ..conftest import LEVELS
    from ..servers import LiteServer

    hierarchy = Hierarchy.from_paths(list(LEAVES), LEVELS)
    torch.manual_seed(1)
    config = EmbedderConfig.for_hierarchy(hierarchy, dim=8, backbone="resnet18", image_size=32, fpn_channels=16,
                                          classifier_scale=1.0)
    new_model = tmp_path / "new.pt"
    save_checkpoint(new_model, PyramidEmbedder(config), hierarchy)
    with LiteServer(tmp_path / "milvus") as milvus:
        uri = ["--uri", milvus.uri]
        run("ingest", catalogue.tree, "--model", catalogue.model, *uri, "--collection", "shop_v1")
        run("alias", "set", "shop", "shop_v1", *uri)
        port = free_port()
        process = subprocess.Popen(
            [*HIERVEC, "serve", "--model", str(catalogue.model), *uri, "--collection", "shop", "--port", str(port),
             "--image-root", str(catalogue.tree)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
            env=dict(os.environ, HIERVEC_API_KEY="alias-k3y"))
        base = f"http://127.0.0.1:{port}"
        try:
            wait_for(f"{base}/healthz", process, seconds=2 * STARTUP_S)
            assert httpx.get(f"{base}/healthz").json()["collection"] == "shop_v1"
            queries = [path for paths in catalogue.files.values() for path in paths[:2]]
            seen, stop = [], time.monotonic() + 240

            def client(n: int):
                answers = []
                while time.monotonic() < stop and not (seen and seen[-1] == "shop_v2" and len(answers) > 5):
                    query = queries[(n + len(answers)) % len(queries)]
                    answer = httpx.post(f"{base}/search", files={"image": ("q.png", query.read_bytes())},
                                        data={"k": 1}, timeout=60)
                    answers.append((query, answer))
                    if answer.status_code == 200:
                        seen.append(answer.json()["collection"])
                return answers

            with ThreadPoolExecutor(3) as pool:
                loops = [pool.submit(client, n) for n in range(3)]
                time.sleep(1.0)  # requests in flight before, during and after the switch
                # in this process (the server is the subject, not the reindex): no second torch start-up
                run("reindex", "--model", new_model, *uri, "--collection", "shop", "--to", "shop_v2", "--switch")
                answers = [a for loop in loops for a in loop.result()]
            assert {a.status_code for _, a in answers} == {200}
            by_collection = {}
            for query, answer in answers:
                body = answer.json()
                hit = body["hits"][0]
                by_collection.setdefault(body["collection"], set()).add(body["model"])
                assert hit["distance"] < 1e-4 and hit["id"] == hashlib.sha256(query.read_bytes()).hexdigest(), body
            assert set(by_collection) == {"shop_v1", "shop_v2"}  # both sides of the switch were served
            assert len(by_collection["shop_v1"]) == len(by_collection["shop_v2"]) == 1
            assert by_collection["shop_v1"] != by_collection["shop_v2"]  # two models
            assert httpx.get(f"{base}/healthz").json()["collection"] == "shop_v2"
        finally:
            process.terminate()
            process.wait(timeout=60)
