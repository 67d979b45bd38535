import numpy as np
import pytest

from embedder.metrics import (
    agreement, agreement_from_paths, consistency_at_k, exact_neighbours, hierarchical_distance, map_at_r,
    others_in_category, recall_at_k, retrieval_report,
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
    # LCA heights in the top 1: 0->2: 1, 1->0: 0, 2->0: 1, 3->2: 2
    assert hierarchical_distance(same, 1) == 1.0
    report = retrieval_report(same, ("dept", "leaf"), ks=(1,), consistency_k=1, r=r)
    assert report == {"recall@1": 0.25, "map@r": 0.5, "consistency@1/dept": 0.75, "consistency@1/leaf": 0.25,
                      "hier_distance@1": 1.0}


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
