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

    Leaf R@1 and R@k, MAP@R (when every query's R fits Milvus's top-k limit),
    consistency@k at every level, mean lowest-common-ancestor height of the top k.
    `progress(n)` is called with the number of queries answered by each batch.
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
    r = np.array([counts[stored[q].category] - 1 for q in query_ids])
    with_map = r.max() + 1 <= MAX_TOPK
    depth = min(total, max(k, int(r.max()) if with_map else 0) + 1)

    ranked: list[list[dict]] = []
    for start in range(0, len(query_ids), batch):
        ids = list(query_ids[start : start + batch])
        vectors = store.vectors(ids)
        results = store.search(np.stack([vectors[i] for i in ids]), k=depth, output=list(levels))
        for qid, hits in zip(ids, results):
            ranked.append([h.categories for h in hits if h.id != qid][: depth - 1])
        if progress is not None:
            progress(len(ids))
    same = agreement_from_paths([stored[q].categories for q in query_ids], ranked, levels)
    report = {"queries": len(query_ids), "collection": total}
    report.update(retrieval_report(same, levels, ks=(1, k), consistency_k=k, r=r if with_map else None))
    return report
