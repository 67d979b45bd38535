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

from .errors import ConfigError


def exact_neighbours(vectors: np.ndarray, k: int, *, chunk: int = 2048) -> np.ndarray:
    """Leave-one-out top-`k` by Euclidean distance, brute force in chunks: ``(n, k)`` indices."""
    vectors = np.asarray(vectors, dtype=np.float32)
    n = len(vectors)
    if not 0 < k < n:
        raise ConfigError(f"k must be in [1, {n - 1}] for {n} vectors, got {k}")
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
    return float(ap_at_r(same, r, level).mean())


def ap_at_r(same: np.ndarray, r: np.ndarray, level: int = -1) -> np.ndarray:
    """AP@R of each query not alone in its category (the values `map_at_r` averages), in query order."""
    r = np.asarray(r)
    if r.max() > same.shape[1]:
        raise ConfigError(f"MAP@R needs {r.max()} hits per query, got {same.shape[1]}")
    hit = same[:, : r.max(), level]
    ranks = np.arange(1, hit.shape[1] + 1)
    precision = np.cumsum(hit, axis=1) / ranks
    within = ranks[None, :] <= r[:, None]
    ap = (precision * hit * within).sum(1) / np.maximum(r, 1)
    return ap[r > 0]


def hierarchical_distance(same: np.ndarray, k: int) -> float:
    """Mean height of the lowest common ancestor of query and each top-`k` hit.

    0 = same leaf, L = different at the coarsest level. Categories are paths, so the
    number of shared levels is the number of levels that agree.
    """
    return float((same.shape[2] - same[:, :k].sum(-1)).mean())


def shared_depth(query_labels: np.ndarray, hit_labels: np.ndarray) -> np.ndarray:
    """How many levels, from the coarsest down, a hit shares with its query (0..L).

    `query_labels` is ``(q, L)``, `hit_labels` ``(q, m, L)``; returns ``(q, m)``. A hit in
    the query's leaf shares L; its lowest common ancestor's height is L minus this.
    """
    same = hit_labels == query_labels[:, None, :]
    return np.cumprod(same, axis=-1).sum(-1)


RELEVANCES = ("map", "pop")


def hierarchical_ap(
    vectors: np.ndarray, labels: np.ndarray, *, weights=None, relevance: str = "map", alpha: float = 1.0,
    count_query: bool = True, chunk: int = 256,
) -> float:
    """Mean hierarchical average precision (H-AP) of leave-one-out queries, exact full ranking.

    H-AP (Ramzi et al., "Hierarchical Average Precision Training for Pertinent Image
    Retrieval", ECCV 2022) rewards a ranking for placing closer relatives first. Per
    query, with Omega+ the items sharing at least the coarsest level and rank(k) by
    Euclidean distance::

        H-AP = sum_{k in Omega+} H-rank(k) / rank(k)  /  sum_{k in Omega+} rel(k)
        H-rank(k) = rel(k) + sum_{j in Omega+, rank(j) < rank(k)} min(rel(k), rel(j))

    Relevance of an item sharing d levels with the query, as the paper's code (HAPPIER,
    ``compute_relevance_on_the_fly.py``) computes it:

    - ``"map"``: ``rel = sum_{p<=d} w_p / |Omega(p)|``, ``|Omega(p)|`` the items sharing at
      least p levels, every level weighing the same by default (`weights`, coarsest first);
    - ``"pop"``: ``rel = (d / (L - 1)) ** alpha / |{items sharing exactly d levels}|`` (L
      levels; what HAPPIER's dataset configs evaluate with).

    `count_query`: count the query itself in those sets, as HAPPIER does (the default; it
    ranks the query's neighbours without the query but computes the relevances over the
    whole dataset). With one level and ``"map"`` it is the usual average precision; a
    ranking ordered by shared depth scores 1. Queries with no relative are skipped.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    labels = np.asarray(labels)
    n, depth = labels.shape
    if relevance not in RELEVANCES:
        raise ConfigError(f"relevance must be one of {RELEVANCES}, got {relevance!r}")
    if relevance == "pop" and depth < 2:
        raise ConfigError("the 'pop' relevance needs at least 2 levels (its weights are d / (L - 1))")
    w = np.ones(depth) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (depth,) or (w <= 0).any():
        raise ConfigError(f"weights must be {depth} positive numbers, got {weights}")
    if len(vectors) != n or n < 2:
        raise ConfigError(f"need at least 2 vectors with one label row each, got {len(vectors)} and {n}")
    norms = (vectors * vectors).sum(1)
    ranks = np.arange(1, n, dtype=np.float64)
    itself = 1 if count_query else 0
    pop_weights = (np.arange(depth + 1) / max(depth - 1, 1)) ** alpha
    scores: list[np.ndarray] = []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        rows = np.arange(start, stop)
        dist = norms[rows, None] - 2 * vectors[rows] @ vectors.T + norms[None, :]
        dist[np.arange(len(rows)), rows] = np.inf
        order = np.argsort(dist, axis=1, kind="stable")[:, :-1]  # self (inf) last, dropped
        shared = shared_depth(labels[rows], labels[order])
        if relevance == "map":
            at_least = np.stack([(shared >= p).sum(1) for p in range(1, depth + 1)], 1) + itself
            step = np.where(at_least > 0, w / np.maximum(at_least, 1), 0.0)
            rel_of_depth = np.concatenate([np.zeros((len(rows), 1)), np.cumsum(step, 1)], 1)  # (b, L+1)
        else:
            exactly = np.stack([(shared == d).sum(1) for d in range(depth + 1)], 1)
            exactly[:, depth] += itself
            rel_of_depth = np.where(exactly > 0, pop_weights / np.maximum(exactly, 1), 0.0)
            rel_of_depth[:, 0] = 0.0
        rel = np.take_along_axis(rel_of_depth, shared, 1)
        h_rank = rel.copy()
        for m in range(1, depth + 1):
            at_m = shared == m
            before = np.cumsum(at_m, 1) - at_m
            h_rank += before * np.minimum(rel, rel_of_depth[:, m : m + 1])
        positive = shared > 0
        norm = (rel * positive).sum(1)
        keep = norm > 0
        scores.append(((h_rank / ranks) * positive).sum(1)[keep] / norm[keep])
    return float(np.concatenate(scores).mean())


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
    with_map: bool = True,
) -> dict[str, float]:
    """Leaf R@k, MAP@R, consistency@K per level, hierarchical distance@K, over one query set.

    With `r` (each query's number of other items in its leaf category), the queries alone in
    their category (r = 0) are left out of every figure, as pytorch-metric-learning's
    `AccuracyCalculator` leaves out its "lone" queries, and MAP@R is computed (`with_map`).
    """
    if r is not None:
        r = np.asarray(r)
        same, r = same[r > 0], r[r > 0]
        if not len(r):
            raise ConfigError("every query is alone in its category: nothing to retrieve")
    report = {f"recall@{k}": recall_at_k(same, k) for k in ks}
    if r is not None and with_map:
        report["map@r"] = map_at_r(same, r)
    for level, name in enumerate(level_names):
        report[f"consistency@{consistency_k}/{name}"] = consistency_at_k(same, consistency_k, level)
    report[f"hier_distance@{consistency_k}"] = hierarchical_distance(same, consistency_k)
    return report
