"""A small synthetic catalogue and the numpy/Python oracles the store is checked against."""

from __future__ import annotations

import numpy as np

from milvus_store import CollectionSpec, Record

LEVELS = ("department", "category", "item")
LEAVES = [f"d{d}/c{d}{c}/i{d}{c}{i}" for d in range(3) for c in range(2) for i in range(2)]
SPEC = CollectionSpec(LEVELS, dim=16, level_dims=(4, 4, 8), index="FLAT")


def make_records(n: int, seed: int = 0, spec: CollectionSpec = SPEC, prefix: str = "r") -> list[Record]:
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        leaf = LEAVES[int(rng.integers(len(LEAVES)))]
        levels = {name: rng.normal(size=d).astype(np.float32) for name, d in zip(spec.level_names, spec.level_dims)}
        records.append(Record(
            category=leaf,
            vector=rng.normal(size=spec.dim).astype(np.float32),
            level_vectors=levels,
            id=f"{prefix}{i}",
            uri=f"file:///images/{prefix}{i}.png",
            meta={"price": int(rng.integers(0, 100)), "colour": ["red", "blue", "green"][i % 3]},
        ))
    return records


def levels_of(record: Record) -> dict[str, str]:
    names = record.category.split("/")
    return {level: "/".join(names[: i + 1]) for i, level in enumerate(LEVELS)}


def brute_force(records: list[Record], query: np.ndarray, k: int, level: str | None = None, keep=None):
    """(ids, squared L2 distances) of the k nearest records, optionally only those `keep` accepts."""
    pool = [r for r in records if keep is None or keep(r)]
    vectors = np.stack([np.asarray(r.vector if level is None else r.level_vectors[level]) for r in pool])
    dist = ((vectors - query) ** 2).sum(1)
    order = np.argsort(dist, kind="stable")[:k]
    return [pool[i].id for i in order], dist[order]


def assert_same_neighbours(hits, records, query, k, level=None, keep=None):
    """Tie-tolerant: the distances equal brute force's, and each hit's distance is its true one."""
    _, expected = brute_force(records, query, k, level, keep)
    by_id = {r.id: r for r in records}
    got = np.array([h.distance for h in hits])
    assert len(hits) == len(expected)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    for hit in hits:
        record = by_id[hit.id]
        vector = np.asarray(record.vector if level is None else record.level_vectors[level])
        assert abs(((vector - query) ** 2).sum() - hit.distance) < 1e-3
        assert keep is None or keep(record)
