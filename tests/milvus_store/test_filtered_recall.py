"""Filtered HNSW search keeps its recall when few rows pass the filter.

A graph search drops the rows that fail the filter after visiting them, so at the
unfiltered breadth (ef=64) it misses filtered neighbours; the store widens ef by the
share of rows passing. Milvus Lite searches brute force until its background indexing
has finished (idle 2-core machine: 7 s after flush at 10k vectors, 20-30 s at 30k, 74 s at 100k) and its `describe_index`
says `Finished` at once, so the test waits on what it can observe: the fixed-breadth
search losing recall, which only a graph index does.
"""

import sys
import time
from pathlib import Path

import numpy as np
import pytest

from milvus_store import CollectionSpec, Eq, HierStore, Record

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.search_latency import make_data  # noqa: E402

pytestmark = [pytest.mark.lite, pytest.mark.slow]

INDEX_DEADLINE_S = 900  # Lite's background index build, on a loaded 2-core machine
POLL_S = 5


def recall(store, vectors, queries, pool, **kwargs) -> float:
    found = []
    for query in queries:
        [hits] = store.search(query, k=10, where=Eq("c", "a/b/rare"), output=[], **kwargs)
        truth = set(pool[np.argsort(((vectors[pool] - query) ** 2).sum(1))[:10]].astype(str))
        found.append(len(truth & {h.id for h in hits}) / 10)
    return float(np.mean(found))


def wait_for_graph_index(store, vectors, queries, pool) -> float:
    """The ef=64 recall once it has fallen below 0.9 (the HNSW graph is searched), polling up to the deadline."""
    started, seen = time.monotonic(), []
    while time.monotonic() - started < INDEX_DEADLINE_S:
        fixed = recall(store, vectors, queries, pool, search_params={"ef": 64})
        if fixed < 0.9:
            return fixed
        seen.append(round(fixed, 2))
        time.sleep(POLL_S)
    pytest.fail(f"Milvus Lite's HNSW index never answered the filtered search within {INDEX_DEADLINE_S} s: "
                f"ef=64 kept finding {seen[-5:]} of the filtered top 10 (a brute-force search); the widening "
                f"cannot be checked without the index")


def test_two_percent_filter_on_10k_vectors(tmp_path):
    """10k vectors, not 100k: the fixed-breadth search finds about half the filtered top 10 at any of these
    sizes (0.59 at 10k, 0.55 at 30k, 0.56 at 100k), and the test takes 15 s instead of 51 s at 30k and
    131 s at 100k (idle 2-core machine): the widening is checked as well on the smaller graph."""
    vectors, queries, _, _ = make_data(10_000, 20)
    spec = CollectionSpec(("a", "b", "c"), dim=192, index="HNSW")
    pool = np.arange(0, len(vectors), 50)  # 2% of rows
    with HierStore(str(tmp_path / "h.db"), "x", spec=spec) as store:
        store.upsert([Record("a/b/rare" if i % 50 == 0 else "a/b/common", v, id=str(i))
                      for i, v in enumerate(vectors)], batch_size=5000)
        store.flush()
        fixed = wait_for_graph_index(store, vectors, queries, pool)
        adaptive = recall(store, vectors, queries, pool)
    assert adaptive >= 0.99, f"the widened search found {adaptive:.2f} of the filtered top 10 (ef=64: {fixed:.2f})"
