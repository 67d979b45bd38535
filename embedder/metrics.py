"""Retrieval metrics over hierarchical labels (numpy only).

Every metric reads an *agreement* array ``same`` of shape ``(queries, K, levels)``:
``same[q, j, l]`` says whether query q's j-th hit (self excluded, ranked) shares its
category at level l (coarsest first). `agreement` builds it from an ``(n, levels)``
label array and ranked neighbour indices; `agreement_from_paths` from category paths,
as Milvus hits return them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def exact_neighbours(vectors: np.ndarray, k: int, *, chunk: int = 2048) -> np.ndarray:
    """Leave-one-out top-`k` by Euclidean distance, brute force in chunks: ``(n, k)`` indices."""
    vectors = np.asarray(vectors, dtype=np.float32)
    n = len(vectors)
    if not 0 < k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} vectors, got {k}")
    norms = (vectors * vectors).sum(1)
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, chunk):
        block = vectors[start : start + chunk]
        dist = norms[start : start + chunk, None] - 2 * block @ vectors.T + norms[None, :]
        dist[np.arange(len(block)), np.arange(start, start + len(block))] = np.inf
        part = np.argpartition(dist, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(dist, part, 1).argsort(1, kind="stable")
        out[start : start + chunk] = np.take_along_axis(part, order, 1)
    return out


def agreement(labels: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """``(n, K, levels)`` booleans from labels ``(n, levels)`` and neighbours ``(n, K)`` of every item."""
    return labels[neighbours] == labels[:, None, :]


def agreement_from_paths(
    queries: Sequence[Mapping[str, str]], hits: Sequence[Sequence[Mapping[str, str]]], levels: Sequence[str]
) -> np.ndarray:
    """The same from per-level category paths: one dict per query, ranked dicts per query's hits."""
    width = min(len(h) for h in hits) if hits else 0
    same = np.zeros((len(queries), width, len(levels)), dtype=bool)
    for q, (query, ranked) in enumerate(zip(queries, hits)):
        for j, hit in enumerate(ranked[:width]):
            same[q, j] = [hit[level] == query[level] for level in levels]
    return same


def recall_at_k(same: np.ndarray, k: int, level: int = -1) -> float:
    """Share of queries with at least one same-category hit in the top `k`."""
    return float(same[:, :k, level].any(1).mean())


def consistency_at_k(same: np.ndarray, k: int, level: int) -> float:
    """Mean share of the top `k` hits in the query's category at `level`."""
    return float(same[:, :k, level].mean())


def map_at_r(same: np.ndarray, r: np.ndarray, level: int = -1) -> float:
    """MAP@R (Musgrave et al., 2020); `r[q]` = other items in query q's category.

    Needs ``same.shape[1] >= max(r)``; queries alone in their category are skipped.
    """
    r = np.asarray(r)
    if r.max() > same.shape[1]:
        raise ValueError(f"MAP@R needs {r.max()} hits per query, got {same.shape[1]}")
    hit = same[:, : r.max(), level]
    ranks = np.arange(1, hit.shape[1] + 1)
    precision = np.cumsum(hit, axis=1) / ranks
    within = ranks[None, :] <= r[:, None]
    ap = (precision * hit * within).sum(1) / np.maximum(r, 1)
    return float(ap[r > 0].mean())


def hierarchical_distance(same: np.ndarray, k: int) -> float:
    """Mean height of the lowest common ancestor of query and each top-`k` hit.

    0 = same leaf, L = different at the coarsest level. Categories are paths, so the
    number of shared levels is the number of levels that agree.
    """
    return float((same.shape[2] - same[:, :k].sum(-1)).mean())


def others_in_category(labels: np.ndarray, level: int = -1) -> np.ndarray:
    """R per item: how many other items share its category at `level`."""
    _, inverse, counts = np.unique(labels[:, level], return_inverse=True, return_counts=True)
    return counts[inverse] - 1


def retrieval_report(
    same: np.ndarray,
    level_names: Sequence[str],
    *,
    ks: Sequence[int] = (1, 10),
    consistency_k: int = 10,
    r: np.ndarray | None = None,
) -> dict[str, float]:
    """Leaf R@k, MAP@R (when `r` is given), consistency@K per level, hierarchical distance@K."""
    report = {f"recall@{k}": recall_at_k(same, k) for k in ks}
    if r is not None and r.max() > 0:
        report["map@r"] = map_at_r(same, r)
    for level, name in enumerate(level_names):
        report[f"consistency@{consistency_k}/{name}"] = consistency_at_k(same, consistency_k, level)
    report[f"hier_distance@{consistency_k}"] = hierarchical_distance(same, consistency_k)
    return report
