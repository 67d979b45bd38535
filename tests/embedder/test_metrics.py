import numpy as np
import pytest

from embedder.metrics import (
    agreement, agreement_from_paths, ap_at_r, consistency_at_k, exact_neighbours, hierarchical_ap, hierarchical_distance,
    map_at_r, others_in_category, recall_at_k, retrieval_report,
)

pytestmark = pytest.mark.unit

# 4 items, 2 levels: dept / leaf codes.
LABELS = np.array([[0, 0], [0, 0], [0, 1], [1, 2]])
# ranked neighbours of each item, self excluded
NEIGHBOURS = np.array([[2, 1, 3], [0, 2, 3], [0, 1, 3], [2, 0, 1]])


def test_hand_computed_metrics():
    same = agreement(LABELS, NEIGHBOURS)
    assert same.shape == (4, 3, 2)
    assert recall_at_k(same, 1) == 0.25  # only item 1's first hit shares its leaf
    assert recall_at_k(same, 2) == 0.5
    assert consistency_at_k(same, 2, level=0) == pytest.approx((1 + 1 + 1 + 0) / 4)
    # MAP@R: items 0 and 1 have R = 1 (items 2, 3 are alone: skipped). AP(0) = 0, AP(1) = 1.
    r = others_in_category(LABELS)
    assert r.tolist() == [1, 1, 0, 0]
    assert map_at_r(same, r) == 0.5
    assert ap_at_r(same, r).tolist() == [0.0, 1.0]  # per query, the alone ones left out
    # LCA heights in the top 1: 0->2: 1, 1->0: 0, 2->0: 1, 3->2: 2
    assert hierarchical_distance(same, 1) == 1.0
    # the report reads one query set: items 2 and 3 (alone in their leaf) are left out of every figure
    report = retrieval_report(same, ("dept", "leaf"), ks=(1,), consistency_k=1, r=r)
    assert report == {"recall@1": 0.5, "map@r": 0.5, "consistency@1/dept": 1.0, "consistency@1/leaf": 0.5,
                      "hier_distance@1": 0.5}
    assert retrieval_report(same, ("dept", "leaf"), ks=(1,), consistency_k=1) == {  # without r: every query
        "recall@1": 0.25, "consistency@1/dept": 0.75, "consistency@1/leaf": 0.25, "hier_distance@1": 1.0}
    with pytest.raises(ValueError, match="every query is alone in its category"):
        retrieval_report(same, ("dept", "leaf"), r=np.zeros(4, dtype=int))


def test_map_at_r_partial_precision():
    # One query with R = 3: hits at ranks 1 and 3 are relevant -> (1/1 + 2/3) / 3
    same = np.array([[[True], [False], [True], [True]]])
    assert map_at_r(same, np.array([3])) == pytest.approx((1 + 2 / 3) / 3)
    with pytest.raises(ValueError, match="needs 5 hits"):
        map_at_r(same, np.array([5]))


def test_agreement_from_paths_matches_labels():
    paths = [{"d": "a", "c": "a/x"}, {"d": "a", "c": "a/x"}, {"d": "a", "c": "a/y"}, {"d": "b", "c": "b/z"}]
    hits = [[paths[j] for j in row] for row in NEIGHBOURS]
    assert np.array_equal(agreement_from_paths(paths, hits, ("d", "c")), agreement(LABELS, NEIGHBOURS))


def test_exact_neighbours_match_a_full_sort(rng):
    vectors = rng.normal(size=(50, 4)).astype(np.float32)
    got = exact_neighbours(vectors, 5, chunk=7)
    dist = ((vectors[:, None] - vectors[None]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    expected_dist = np.sort(dist, 1)[:, :5]
    assert np.allclose(np.take_along_axis(dist, got, 1), expected_dist, atol=1e-4)
    assert not (got == np.arange(50)[:, None]).any()
    with pytest.raises(ValueError, match="k must be in"):
        exact_neighbours(vectors, 50)


def _h_ap_of_ranking(shared: list[int], depth: int, count_query: bool = False) -> float:
    """H-AP of one query's ranking of shared depths, by the paper's formula, loop by loop (the query
    itself counted in |Omega(p)| or not)."""
    at_least = [sum(s >= p for s in shared) + count_query for p in range(1, depth + 1)]
    rel = [sum(1 / at_least[p - 1] for p in range(1, s + 1)) for s in shared]
    total = 0.0
    for k, s in enumerate(shared):
        if s == 0:
            continue
        h_rank = rel[k] + sum(min(rel[k], rel[j]) for j in range(k) if shared[j] > 0)
        total += h_rank / (k + 1)
    return total / sum(rel)


def _h_ap_reference(vectors: np.ndarray, labels: np.ndarray, count_query: bool = False) -> float:
    scores = []
    for q in range(len(vectors)):
        dist = ((vectors - vectors[q]) ** 2).sum(1)
        dist[q] = np.inf
        order = np.argsort(dist, kind="stable")[:-1]
        shared = [int(np.cumprod(labels[j] == labels[q]).sum()) for j in order]
        if any(shared):
            scores.append(_h_ap_of_ranking(shared, labels.shape[1], count_query))
    return float(np.mean(scores))


def test_h_ap_of_a_hand_worked_ranking():
    # ranked: a cousin (shares 1 of 2 levels), a sibling in the leaf (2), a stranger (0).
    # |Omega(1)| = 2, |Omega(2)| = 1: rel = 0.5 and 1.5; H-rank = 0.5 and 1.5 + 0.5
    assert _h_ap_of_ranking([1, 2, 0], 2) == pytest.approx((0.5 / 1 + 2.0 / 2) / 2.0)
    assert _h_ap_of_ranking([2, 1, 0], 2) == pytest.approx(1.0)
    # the query counted (HAPPIER's convention): |Omega(1)| = 3, |Omega(2)| = 2: rel = 1/3 and 5/6;
    # H-rank = 1/3 and 5/6 + 1/3
    assert _h_ap_of_ranking([1, 2, 0], 2, count_query=True) == pytest.approx((1 / 3 + 7 / 6 / 2) / (1 / 3 + 5 / 6))
    labels = np.array([[0, 0], [0, 1], [0, 0], [1, 2]])  # query 0 ranks exactly that way: cousin, sibling, stranger
    vectors = np.array([[0.0], [0.1], [0.2], [5.0]], np.float32)
    assert hierarchical_ap(vectors[:, :], labels) == pytest.approx(np.mean([
        _h_ap_of_ranking([1, 2, 0], 2, True), _h_ap_of_ranking([1, 1, 0], 2, True),
        _h_ap_of_ranking([1, 2, 0], 2, True)]))


def test_h_ap_matches_the_formula_on_random_data(rng):
    vectors = rng.normal(size=(60, 5)).astype(np.float32)
    coarse = rng.integers(0, 3, 60)
    labels = np.stack([coarse, coarse * 10 + rng.integers(0, 3, 60), rng.integers(0, 100, 60) % 7], 1)
    for count_query in (True, False):
        assert hierarchical_ap(vectors, labels, chunk=7, count_query=count_query) == pytest.approx(
            _h_ap_reference(vectors, labels, count_query), rel=1e-9)


def test_h_ap_with_one_level_is_average_precision(rng):
    vectors = rng.normal(size=(40, 4)).astype(np.float32)
    labels = rng.integers(0, 4, (40, 1))
    r = others_in_category(labels)
    same = agreement(labels, exact_neighbours(vectors, 39))
    assert hierarchical_ap(vectors, labels) == pytest.approx(_ap(same, r))


def _ap(same: np.ndarray, r: np.ndarray) -> float:
    hit = same[:, :, -1]
    precision = np.cumsum(hit, 1) / np.arange(1, hit.shape[1] + 1)
    return float(((precision * hit).sum(1) / r)[r > 0].mean())


def test_h_ap_rewards_closer_relatives_first():
    labels = np.array([[0, 0], [0, 0], [0, 1], [1, 2]])
    near_family = np.array([[0.0], [0.1], [0.3], [5.0]], np.float32)  # leaf sibling, then cousin, then stranger
    cousin_first = np.array([[0.0], [0.3], [0.1], [5.0]], np.float32)
    assert hierarchical_ap(near_family, labels) > hierarchical_ap(cousin_first, labels)
    with pytest.raises(ValueError, match="weights"):
        hierarchical_ap(near_family, labels, weights=[1.0])
