"""Retrieval metrics over hierarchical labels, from ranked neighbour lists (numpy only).

`labels` is an ``(n, levels)`` code array (coarsest first); `neighbours` is an
``(n, K)`` index array of each query's ranked hits with the query itself excluded.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def same_at_level(labels: np.ndarray, neighbours: np.ndarray, level: int) -> np.ndarray:
    """``(n, K)`` booleans: hit j shares the query's category at `level`."""
    return labels[neighbours, level] == labels[:, None, level]


def recall_at_k(labels: np.ndarray, neighbours: np.ndarray, k: int, level: int = -1) -> float:
    """Share of queries with at least one same-category hit in the top `k`."""
    return float(same_at_level(labels, neighbours[:, :k], level).any(1).mean())


def consistency_at_k(labels: np.ndarray, neighbours: np.ndarray, k: int, level: int) -> float:
    """Mean share of the top `k` hits in the query's category at `level`."""
    return float(same_at_level(labels, neighbours[:, :k], level).mean())


def map_at_r(labels: np.ndarray, neighbours: np.ndarray, level: int = -1) -> float:
    """MAP@R (Musgrave et al., 2020): R = number of other items in the query's category.

    Needs ``neighbours.shape[1] >= max R``; queries alone in their category are skipped.
    """
    leaf = labels[:, level]
    _, inverse, counts = np.unique(leaf, return_inverse=True, return_counts=True)
    r = counts[inverse] - 1
    if r.max() > neighbours.shape[1]:
        raise ValueError(f"MAP@R needs {r.max()} neighbours per query, got {neighbours.shape[1]}")
    same = same_at_level(labels, neighbours[:, : r.max()], level)
    ranks = np.arange(1, same.shape[1] + 1)
    precision = np.cumsum(same, axis=1) / ranks
    within = ranks[None, :] <= r[:, None]
    ap = (precision * same * within).sum(1) / np.maximum(r, 1)
    return float(ap[r > 0].mean())


def hierarchical_distance(labels: np.ndarray, neighbours: np.ndarray, k: int) -> float:
    """Mean height of the lowest common ancestor of query and each top-`k` hit.

    0 = same leaf, L = different at the coarsest level. Codes are per-level paths, so the
    number of shared levels is the number of levels that agree.
    """
    depth = labels.shape[1]
    shared = sum(same_at_level(labels, neighbours[:, :k], level) for level in range(depth))
    return float((depth - shared).mean())


def retrieval_report(
    labels: np.ndarray,
    neighbours: np.ndarray,
    level_names: Sequence[str],
    *,
    ks: Sequence[int] = (1, 10),
    consistency_k: int = 10,
    with_map: bool = True,
) -> dict[str, float]:
    """The standard set: leaf R@k, MAP@R, consistency@K per level, hierarchical distance@K."""
    report = {f"recall@{k}": recall_at_k(labels, neighbours, k) for k in ks}
    if with_map:
        report["map@r"] = map_at_r(labels, neighbours)
    for level, name in enumerate(level_names):
        report[f"consistency@{consistency_k}/{name}"] = consistency_at_k(labels, neighbours, consistency_k, level)
    report[f"hier_distance@{consistency_k}"] = hierarchical_distance(labels, neighbours, consistency_k)
    return report
