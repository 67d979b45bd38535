"""hiervec's retrieval metrics against their references, on seeded sets with singletons and ties.

- R@1, R@K, MAP@R and consistency@K against pytorch-metric-learning's `AccuracyCalculator`
  (its kNN, its "lone query" rule, its MAP@R; R@K and consistency@K as metrics added to it the
  way its documentation adds metrics, reading the kNN labels it computed).
- H-AP against a port of HAPPIER's code (Ramzi et al., ECCV 2022; github.com/elias-ramzi/HAPPIER,
  `happier/engine/metrics.py::hap`, `compute_relevance_on_the_fly.py`, `lib/create_label_matrix.py`),
  kept here line for line in torch, with both of its relevance functions.
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import pytest
import torch

from embedder.metrics import agreement, exact_neighbours, hierarchical_ap, others_in_category, retrieval_report

pytestmark = pytest.mark.unit


def seeded_set(seed: int, singletons: int = 3, duplicates: int = 4):
    """Vectors and (department, category, leaf) labels: leaves of 2-9 items, `singletons` leaves of
    one item, `duplicates` exact copies of items (ties at distance 0, in the item's own leaf)."""
    rng = np.random.default_rng(seed)
    rows, leaf = [], 0
    for department in range(3):
        for category in range(2):
            for _ in range(int(rng.integers(1, 4))):
                rows += [(department, 2 * department + category, leaf)] * int(rng.integers(2, 10))
                leaf += 1
    grouped = len(rows)  # the rows before the singletons
    for _ in range(singletons):
        department = int(rng.integers(3))
        rows.append((department, 2 * department, leaf))
        leaf += 1
    labels = np.array(rows)
    centres = rng.normal(size=(leaf, 12)) * 1.5
    vectors = (centres[labels[:, 2]] + rng.normal(size=(len(labels), 12))).astype(np.float32)
    copies = rng.choice(grouped, size=duplicates, replace=False)  # the singletons stay alone
    return np.concatenate([vectors, vectors[copies]]), np.concatenate([labels, labels[copies]])


@contextlib.contextmanager
def without_faiss():
    """pytorch-metric-learning imports `faiss.contrib.torch_utils` when faiss is installed (Milvus Lite
    brings it), which replaces every faiss index's `search` in the process with a wrapper that takes
    no `params`: Milvus Lite's in-process searches then fail for the rest of the test session (a full
    `make test` failed so). The reference needs no faiss (`CustomKNN`), so it is imported without."""
    hidden = {name: sys.modules.get(name) for name in ("faiss", "faiss.contrib.torch_utils")}
    if "faiss.contrib.torch_utils" in sys.modules and sys.modules["faiss.contrib.torch_utils"] is not None:
        yield  # already patched by someone else: nothing to protect
        return
    for name in hidden:
        sys.modules[name] = None  # `import faiss` raises ImportError
    try:
        yield
    finally:
        for name, module in hidden.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def pml_figures(vectors: np.ndarray, labels: np.ndarray, k: int) -> dict[str, float]:
    with without_faiss():
        from pytorch_metric_learning.distances import LpDistance
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator, precision_at_k
        from pytorch_metric_learning.utils.inference import CustomKNN
    assert "faiss.contrib.torch_utils" not in sys.modules, "Milvus Lite's faiss searches would break"

    def same_leaf(a, b):  # labels are (department, category, leaf) rows; a query's class is its leaf
        return (a[..., 2] == b[..., 2]) if a.dim() == b.dim() else (a[:, None, 2] == b[..., 2])

    class Calculator(AccuracyCalculator):
        def requires_knn(self):
            return super().requires_knn() + [f"recall_at_{k}", *(f"consistency_{level}" for level in range(3))]

        def calculate_recall_at_k(self, knn_labels, query_labels, not_lone_query_mask, **kwargs):
            knn, query = knn_labels[not_lone_query_mask], query_labels[not_lone_query_mask]
            return (knn[:, :k, 2] == query[:, None, 2]).any(1).double().mean().item()

        def consistency(self, level, knn_labels, query_labels, not_lone_query_mask, **kwargs):
            knn, query = knn_labels[not_lone_query_mask], query_labels[not_lone_query_mask]
            return precision_at_k(knn[..., level], query[:, level, None], k, False, False, torch.eq)

    for level in range(3):
        setattr(Calculator, f"calculate_consistency_{level}",
                lambda self, *a, level=level, **kw: self.consistency(level, *a, **kw))
    setattr(Calculator, f"calculate_recall_at_{k}", Calculator.calculate_recall_at_k)
    calculator = Calculator(include=("precision_at_1", "mean_average_precision_at_r", f"recall_at_{k}",
                                     "consistency_0", "consistency_1", "consistency_2"),
                            k=len(vectors) - 1, label_comparison_fn=same_leaf, device=torch.device("cpu"),
                            knn_func=CustomKNN(LpDistance(normalize_embeddings=False, p=2, power=1)))
    return calculator.get_accuracy(torch.from_numpy(vectors), torch.from_numpy(labels))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_map_at_r_and_consistency_match_pytorch_metric_learning(seed):
    pytest.importorskip("pytorch_metric_learning", reason="a dev dependency (make venv installs it)")
    vectors, labels = seeded_set(seed)
    k = 5
    r = others_in_category(labels)
    assert (r == 0).sum() == 3 and len(vectors) > 30  # singletons are in the set, and left out
    same = agreement(labels, exact_neighbours(vectors, len(vectors) - 1))
    ours = retrieval_report(same, ["department", "category", "leaf"], ks=(1, k), consistency_k=k, r=r)
    theirs = pml_figures(vectors, labels, k)
    assert ours["recall@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-9)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-9)
    assert ours[f"recall@{k}"] == pytest.approx(theirs[f"recall_at_{k}"], abs=1e-9)
    for level, name in enumerate(["department", "category", "leaf"]):
        assert ours[f"consistency@{k}/{name}"] == pytest.approx(theirs[f"consistency_{level}"], abs=1e-9), name
    # the singletons counted as misses would have lowered R@1: the one query set matters
    assert retrieval_report(same, ["department", "category", "leaf"], ks=(1,))["recall@1"] < ours["recall@1"]


# -- HAPPIER, ported (torch, as in its repository) ----------------------------------------
def happier_create_label_matrix(labels, other_labels):
    return (labels.unsqueeze(1) == other_labels.unsqueeze(0)).sum(-1).squeeze()


def happier_get_relevances_map(target, weights):
    target = target.long()
    weights = torch.tensor(list(weights), device=target.device)
    level = weights.size(-1)
    counts = torch.zeros(target.size(0), level + 1, device=target.device, dtype=torch.float64)
    for i, line in enumerate(target):
        o, c = torch.unique(line, sorted=True, return_counts=True)
        counts[i, o] = c.double()
    counts[:, 0] = 0
    counts = counts + torch.sum(counts, dim=1, keepdims=True) - torch.cumsum(counts, dim=1)
    counts[:, 0] = 0
    counts[:, 1:] = weights / counts[:, 1:]
    return torch.cumsum(counts, dim=1)


def happier_get_relevances_pop(target, levels, alpha=1.0):
    target = target.long()
    weights = [(x / (levels - 1)) ** alpha for x in range(levels + 1)]
    weights = torch.tensor(weights, device=target.device, dtype=torch.float64)
    counts = torch.zeros(target.size(0), levels + 1, device=target.device, dtype=torch.float64)
    for i, line in enumerate(target):
        o, c = torch.unique(line, sorted=True, return_counts=True)
        counts[i, o] = (weights[o] / c).double()
    return counts


def happier_hap(sorted_rel, relevances):
    relevances = relevances[:, 1:]
    eq = sorted_rel.unsqueeze(1) == relevances.unsqueeze(1).permute(0, 2, 1)
    cum = eq.cumsum(-1)
    weights = torch.minimum(sorted_rel.unsqueeze(1), relevances.unsqueeze(1).permute(0, 2, 1))
    ranks = torch.arange(1, sorted_rel.size(1) + 1).view(1, -1)
    hranks = (weights * cum).sum(1)
    return (hranks / ranks).sum(-1) / sorted_rel.sum(-1)


def happier(vectors: np.ndarray, labels: np.ndarray, relevance: str, alpha: float = 1.0) -> tuple[float, bool]:
    """HAPPIER's H-AP of leave-one-out queries (its dataset relevances: over every item, the query
    included), and whether two depths of one query share a relevance value (its `hap` then counts
    items of both depths at each: a case its code does not separate, left out of the comparison)."""
    features, torch_labels = torch.from_numpy(vectors).double(), torch.from_numpy(labels)
    levels = labels.shape[1]
    target = happier_create_label_matrix(torch_labels, torch_labels)
    if relevance == "map":
        relevances = happier_get_relevances_map(target, [1.0] * levels)
    else:
        relevances = happier_get_relevances_pop(target, levels, alpha)
    distances = torch.cdist(features, features)
    distances.fill_diagonal_(float("inf"))
    indices = distances.argsort(dim=1, stable=True)[:, :-1]  # get_knn with embeddings from one source
    sorted_target = (torch_labels.unsqueeze(1) == torch_labels[indices]).sum(-1)
    sorted_rel = torch.gather(relevances, 1, sorted_target)
    values = relevances[:, 1:]
    collide = bool(((values.unsqueeze(2) == values.unsqueeze(1)) & (values.unsqueeze(2) > 0)).sum((1, 2)).gt(
        levels).any())
    return float(happier_hap(sorted_rel, relevances).mean()), collide


@pytest.mark.parametrize("relevance,alpha", [("map", 1.0), ("pop", 1.0), ("pop", 0.5)])
@pytest.mark.parametrize("seed", [3, 7])
def test_h_ap_matches_happiers_code_with_either_relevance(seed, relevance, alpha):
    vectors, labels = seeded_set(seed, singletons=0)  # HAPPIER's mean is nan when a query has no relative
    theirs, collide = happier(vectors, labels, relevance, alpha)
    # sets chosen where no query has two depths of one relevance value (HAPPIER's hap then counts the
    # items of both depths at each; hiervec's reads the depth, not the value)
    assert not collide
    ours = hierarchical_ap(vectors, labels, relevance=relevance, alpha=alpha)
    assert ours == pytest.approx(theirs, abs=1e-9)
    # the query counted in the relevance sets (HAPPIER's choice) or not: a real difference
    assert abs(hierarchical_ap(vectors, labels, relevance=relevance, alpha=alpha, count_query=False) - ours) > 1e-4
