"""Faults: ingest killed at random points, searches during writes, the server gone mid-ingest.

Every check is against the source: the collection must end holding each valid image
exactly once (content-hash ids), whatever happened on the way.
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from milvus_store import HierStore

from ..commands import HIERVEC, run
from ..conftest import LEAVES
from ..servers import LiteServer
from .corpus import encoded

pytestmark = pytest.mark.lite


def here(command: list[str]) -> str:
    """A `hiervec` command list (from `ingest` or a reindex) run in this process instead, for the runs a
    test only needs done, not killed; its stdout."""
    assert command[:len(HIERVEC)] == HIERVEC
    return run(*command[len(HIERVEC):]).stdout


def make_tree(root: Path, per_leaf: int, seed: int = 0) -> set[str]:
    """`per_leaf` distinct noise images in each leaf plus one broken file; returns the valid images' ids."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ids = set()
    for leaf in LEAVES:
        (root / leaf).mkdir(parents=True)
        for i in range(per_leaf):
            data = encoded(Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)), "PNG")
            (root / leaf / f"{i:04}.png").write_bytes(data)
            ids.add(hashlib.sha256(data).hexdigest())
        (root / leaf / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return ids


def ingest(tree: Path, model: Path, uri: str, *extra: str) -> list[str]:
    return [*HIERVEC, "ingest", str(tree), "--model", str(model), "--uri", uri, "--batch-size", "8", "--json", *extra]


LIST_IDS = """
import json, sys
from milvus_store import CollectionNotFoundError, HierStore
try:
    with HierStore(sys.argv[1], "images", create=False) as store:
        ids = [hit.id for hit in store.iterate()]
        print(json.dumps({"ids": ids, "count": store.count()}))
except CollectionNotFoundError:
    print(json.dumps({"ids": [], "count": 0}))
"""


def stored_ids(uri: str) -> list[str]:
    """Every id in the collection, read in a child process (a Lite file stays locked by its opener)."""
    listed = subprocess.run([sys.executable, "-c", LIST_IDS, uri], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    result = json.loads(listed.stdout)
    assert result["count"] == len(result["ids"])
    return result["ids"]


def logged_bytes(db: Path) -> int:
    """Bytes in the write-ahead log of a Milvus Lite store (the folder `db`): it grows with every
    batch written and is readable while the writer holds the store (its rows are not)."""
    return sum(path.stat().st_size for path in db.glob("collections/*/wal/*") if path.is_file())


def run_until(command: list[str], until, deadline_s: float = 240) -> subprocess.Popen:
    """Start `command`, poll `until()` every 20 ms; SIGKILL the process the moment it holds (or at the
    deadline); return the process once it ended (killed, or finished before `until` held)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + deadline_s
    while process.poll() is None and time.monotonic() < deadline and not until():
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    return process


def test_sigkill_at_random_points_then_rerun_stores_each_image_once(tmp_path, tiny_model):
    """Four SIGKILLs at random points of four runs on one Milvus Lite file, then a run to the end.

    Two kills come at a random time of a run (start-up, embedding, writing or flushing: wherever
    the dice fall); two come once the write-ahead log has grown by a random share of a whole
    run's, so that kills land mid-write however loaded the machine is (timing alone did not:
    every kill can land before the first write or after the last)."""
    expected = make_tree(tmp_path / "tree", per_leaf=120)
    reference, peak = tmp_path / "timing.db", 0
    started = time.monotonic()
    full = subprocess.Popen(ingest(tmp_path / "tree", tiny_model, str(reference)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while full.poll() is None:
        peak = max(peak, logged_bytes(reference))
        time.sleep(0.02)
    duration = time.monotonic() - started
    _, stderr = full.communicate()
    assert full.returncode == 0, stderr
    assert peak > 0, f"no write-ahead log seen under {reference}/collections/*/wal: where does Milvus Lite log now?"

    rng = random.Random(7)
    db = tmp_path / "killed.db"
    seen_counts = []
    for kill in ("log", "time", "log", "time"):
        if kill == "time":
            at = time.monotonic() + rng.uniform(0.45, 1.0) * duration
            run_until(ingest(tmp_path / "tree", tiny_model, str(db)), lambda: time.monotonic() >= at)
        else:  # a share of what a whole run logs, added to what the earlier runs left in the log
            target = logged_bytes(db) + rng.uniform(0.15, 0.6) * peak
            run_until(ingest(tmp_path / "tree", tiny_model, str(db)), lambda: logged_bytes(db) >= target)
        ids = stored_ids(str(db))
        assert len(ids) == len(set(ids)) and set(ids) <= expected  # nothing torn, nothing foreign
        seen_counts.append(len(ids))

    report = json.loads(here(ingest(tmp_path / "tree", tiny_model, str(db))))  # the run to the end
    assert report["stored"] + report["skipped_present"] == len(expected)
    assert report["failed"] == len(LEAVES)  # the broken files, reported again, never stored
    ids = stored_ids(str(db))
    assert sorted(ids) == sorted(expected)
    print("counts after each kill:", seen_counts, "of", len(expected))
    assert seen_counts == sorted(seen_counts)  # killed runs only ever added
    assert 0 < seen_counts[0] < len(expected)  # the first kill, once the log grew, landed mid-write


def test_searches_during_an_ingest_see_counts_grow_and_hits_resolve(tmp_path, tiny_model):
    expected = make_tree(tmp_path / "tree", per_leaf=100)
    with LiteServer(tmp_path / "server-data") as server:
        writer = subprocess.Popen(ingest(tmp_path / "tree", tiny_model, server.uri), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        counts, searches, errors = [], 0, []
        deadline = time.monotonic() + 300
        store = None
        rng = np.random.default_rng(0)
        while writer.poll() is None and time.monotonic() < deadline:
            try:
                if store is None:
                    store = HierStore(server.uri, "images", create=False)
                counts.append(store.count())
                hits = store.search(rng.normal(size=(2, store.spec.dim)).astype(np.float32), 10)
                ids = {hit.id for hit_list in hits for hit in hit_list}
                found = {hit.id for hit in store.get(sorted(ids))}
                if found != ids:
                    errors.append(f"hits that do not resolve: {sorted(ids - found)}")
                searches += 1
            except Exception as exc:  # noqa: BLE001 - the collection may not exist yet
                if store is not None or "does not exist" not in str(exc):
                    errors.append(repr(exc))
            time.sleep(0.05)
        out, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, err
        assert errors == [] and searches >= 5
        print("counts seen while writing:", counts[:3], "...", counts[-3:], len(counts))
        assert counts == sorted(counts) and counts[-1] <= len(expected)
        assert sorted(stored_ids(server.uri)) == sorted(expected)
        store.close()


def test_server_gone_mid_ingest_is_a_clear_error_and_a_rerun_completes(tmp_path, tiny_model):
    expected = make_tree(tmp_path / "tree", per_leaf=150)
    server = LiteServer(tmp_path / "server-data").start()
    try:
        writer = subprocess.Popen(ingest(tmp_path / "tree", tiny_model, server.uri), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until writing has begun
            try:
                with HierStore(server.uri, "images", create=False) as store:
                    if store.count() > 0:
                        break
            except Exception:  # noqa: BLE001 - not created yet
                pass
            time.sleep(0.1)
        server.stop(kill=True)
        out, err = writer.communicate(timeout=120)
        assert writer.returncode == 1 and out == ""
        assert err.startswith("Error: ") and err.count("\n") == 1, err
        assert server.uri in err

        server.start()
        rerun = json.loads(here(ingest(tmp_path / "tree", tiny_model, server.uri)))
        assert rerun["skipped_present"] > 0  # what was written before the crash survived
        assert sorted(stored_ids(server.uri)) == sorted(expected)
    finally:
        server.stop()



def test_reindex_killed_and_rerun_ends_as_an_uninterrupted_reindex(tmp_path, tiny_model):
    """`hiervec reindex` SIGKILLed while it writes (on a milvus-lite server, so the test can watch the
    count grow), then run again: the same ids and vectors as a reindex that was never interrupted."""
    import torch

    from embedder import EmbedderConfig, Hierarchy, PyramidEmbedder, save_checkpoint
    from milvus_store import CollectionNotFoundError

    from ..conftest import LEVELS

    expected = make_tree(tmp_path / "tree", per_leaf=60)
    torch.manual_seed(1)  # the new model: another start than tiny_model's
    config = EmbedderConfig.for_hierarchy(Hierarchy.from_paths(list(LEAVES), LEVELS), dim=8, backbone="resnet18",
                                          image_size=32, fpn_channels=16, classifier_scale=1.0)
    new_model = tmp_path / "new.pt"
    save_checkpoint(new_model, PyramidEmbedder(config), Hierarchy.from_paths(list(LEAVES), LEVELS))

    def reindex(uri: str, to: str) -> list[str]:
        return [*HIERVEC, "reindex", "--model", str(new_model), "--uri", uri, "--to", to, "--batch-size", "4", "--json"]

    def count(uri: str, name: str) -> int:
        try:
            with HierStore(uri, name, create=False) as store:
                return store.count()
        except CollectionNotFoundError:
            return 0

    with LiteServer(tmp_path / "server") as server:
        here(ingest(tmp_path / "tree", tiny_model, server.uri))
        assert json.loads(here(reindex(server.uri, "whole")))["count"] == len(expected)

        for attempt in range(4):  # the kill must land while rows are being written
            name = f"killed{attempt}"
            run_until(reindex(server.uri, name), lambda: count(server.uri, name) >= 8)
            at_kill = count(server.uri, name)
            if 0 < at_kill < len(expected):
                break
        else:
            pytest.fail("no kill landed mid-reindex in 4 attempts")
        report = json.loads(here(reindex(server.uri, name)))
        assert report["skipped_present"] == at_kill and report["stored"] == len(expected) - at_kill
        assert report["complete"] and report["count"] == len(expected)
        with HierStore(server.uri, "whole", create=False) as a, HierStore(server.uri, name, create=False) as b:
            ids = sorted(expected)
            assert {h.id for h in b.iterate()} == set(ids)
            np.testing.assert_allclose(a.embeddings(ids).concat, b.embeddings(ids).concat, atol=1e-5)
