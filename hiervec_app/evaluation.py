"""Leave-one-out retrieval evaluation through Milvus: the same path users' searches take."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from embedder.metrics import agreement_from_paths, retrieval_report
from milvus_store import HierStore, QueryError
from hiervec_core.names import MAX_TOPK


def evaluate_collection(store: HierStore, query_ids: Sequence[str], k: int = 10, batch: int = 64,
                        progress: Callable[[int], None] | None = None) -> dict:
    """Each query id searches the collection with its stored image vector, itself left out.

    Over one query set, the queries with at least one other image of their leaf category (the
    others are left out of every figure and counted in ``left_out``, as pytorch-metric-learning
    does): leaf recall@1 and @k, MAP@R (null, with ``map@r_reason``, when a category's R does
    not fit Milvus's top-k limit), consistency@k at every level, mean lowest-common-ancestor
    height of the top k. The keys are the same whatever `k`. `progress(n)` is called with the
    number of queries answered by each batch.
    """
    levels = store.spec.level_names
    counts = store.category_counts(levels[-1])
    total = sum(counts.values())
    if total <= k:
        raise QueryError(f"the collection holds {total} images; leave-one-out top-{k} needs more than {k}")
    stored = {hit.id: hit for hit in store.get(list(query_ids))}
    missing = [q for q in query_ids if q not in stored]
    if missing:
        raise QueryError(f"{len(missing)} query ids are not in the collection, e.g. {missing[0]!r}")
    r_all = np.array([counts[stored[q].category] - 1 for q in query_ids])
    kept = [q for q, r in zip(query_ids, r_all) if r > 0]
    if not kept:
        raise QueryError("no query has another image of its category in the collection: nothing to retrieve")
    r = r_all[r_all > 0]
    with_map = r.max() + 1 <= MAX_TOPK
    depth = min(total, max(k, int(r.max()) if with_map else 0) + 1)

    ranked: list[list[dict]] = []
    for start in range(0, len(kept), batch):
        ids = list(kept[start : start + batch])
        vectors = store.vectors(ids)
        results = store.search(np.stack([vectors[i] for i in ids]), k=depth, output=list(levels))
        for qid, hits in zip(ids, results):
            ranked.append([h.categories for h in hits if h.id != qid][: depth - 1])
        if progress is not None:
            progress(len(ids))
    if progress is not None and len(kept) < len(query_ids):
        progress(len(query_ids) - len(kept))
    same = agreement_from_paths([stored[q].categories for q in kept], ranked, levels)
    figures = retrieval_report(same, levels, ks=(1, k), consistency_k=k, r=r if with_map else None)
    return {
        "queries": len(kept), "left_out": len(query_ids) - len(kept), "collection": total, "k": k,
        "recall@k": [{"k": n, "recall": figures[f"recall@{n}"]} for n in sorted({1, k})],
        "map@r": figures.get("map@r"),
        "map@r_reason": None if with_map else (f"a category has {int(r.max()) + 1} images: MAP@R needs the top "
                                               f"R+1 = {int(r.max()) + 1} hits, Milvus returns at most {MAX_TOPK}"),
        "consistency@k": {name: figures[f"consistency@{k}/{name}"] for name in levels},
        "hier_distance@k": figures[f"hier_distance@{k}"],
    }
