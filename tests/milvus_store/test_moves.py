"""Moving a category in place: every level field below (and above, for a new parent) rewritten, vectors
and ids kept, refusals that change nothing, an interrupted move completed by running it again."""

from collections import Counter

import numpy as np
import pytest

from milvus_store import FilterError, HierStore, StoreError, move_category, under

from .conftest import fresh_collection
from .helpers import SPEC, levels_of, make_records


@pytest.fixture
def filled(target):
    spec = target.spec(SPEC)
    records = make_records(60, spec=spec)
    store = HierStore(target.uri, fresh_collection(), spec=spec)
    store.upsert(records)
    yield store, records
    store.close()


def _stored(store) -> dict[str, dict[str, str]]:
    return {hit.id: hit.categories for hit in store.iterate(None, output=list(store.spec.level_names))}


def test_a_rename_and_a_move_to_another_parent_rewrite_every_level_and_keep_vectors(filled):
    store, records = filled
    before = _stored(store)
    under_old = {i for i, c in before.items() if c["category"] == "d0/c00"}
    report = move_category(store, "d0/c00", "d0/tops")
    assert (report.level, report.moved, report.already_there, report.resumed) == ("category", len(under_old), 0, False)
    assert report.count == store.count() == len(records)
    after = _stored(store)
    for rid, categories in before.items():
        if rid in under_old:
            assert categories["item"].startswith("d0/c00/")
            assert after[rid] == {"department": "d0", "category": "d0/tops",
                                  "item": "d0/tops/" + categories["item"].split("/")[-1]}
        else:
            assert after[rid] == categories
    assert store.count(under("d0/c00")) == 0 and store.count(under("d0/tops")) == len(under_old)
    # vectors and ids as they were: each moved record is still its own nearest neighbour at distance 0
    moved = next(r for r in records if r.id in under_old)
    [hit] = store.search([np.asarray(moved.vector)], k=1)[0]
    assert hit.id == moved.id and hit.distance < 1e-6 and hit.categories["category"] == "d0/tops"

    # to another department: the level above follows the new parent
    report = move_category(store, "d0/tops", "d2/tops")
    assert report.moved == len(under_old)
    counts = store.category_counts("department")
    expected = Counter(levels_of(r)["department"] for r in records)
    expected["d0"] -= len(under_old)
    expected["d2"] += len(under_old)
    assert counts == +expected
    assert {c["department"] for rid, c in _stored(store).items() if rid in under_old} == {"d2"}


def test_refusals_change_nothing_and_merge_is_asked_for(filled):
    store, records = filled
    before = _stored(store)
    with pytest.raises(FilterError, match="keeps the number of levels"):
        move_category(store, "d0/c00", "d0")
    with pytest.raises(FilterError, match="nothing is stored under 'd9/c99'"):
        move_category(store, "d9/c99", "d9/c98")
    with pytest.raises(FilterError, match="has 4 levels; the collection has 3"):
        move_category(store, "d0/c00/i000/x", "d0/c00/i000/y")
    with pytest.raises(FilterError, match="empty, padded or separator-bearing"):
        move_category(store, "d0/c00", "d0/ c")
    with pytest.raises(StoreError, match=r"'d0/c01' already holds \d+ images: pass merge"):
        move_category(store, "d0/c00", "d0/c01")
    assert _stored(store) == before

    there = sum(1 for c in before.values() if c["category"] == "d0/c01")
    moving = sum(1 for c in before.values() if c["category"] == "d0/c00")
    report = move_category(store, "d0/c00", "d0/c01", merge=True)
    assert (report.moved, report.already_there) == (moving, there)
    assert store.count(under("d0/c01")) == moving + there and store.count() == len(records)


def test_an_interrupted_move_is_completed_by_running_it_again(filled):
    store, records = filled
    total = sum(1 for r in records if levels_of(r)["department"] == "d1")
    batches = []

    def stop_after_one_batch(n):
        batches.append(n)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        move_category(store, "d1", "shoes", batch_size=3, progress=stop_after_one_batch)
    assert batches == [3] and store.count(under("shoes")) == 3 and store.count(under("d1")) == total - 3
    with pytest.raises(StoreError, match="another move \\('d1' -> 'shoes'\\) was interrupted"):
        move_category(store, "d0", "hats")
    report = move_category(store, "d1", "shoes", batch_size=3)  # 'shoes' holds the first batch: not a collision
    assert report.resumed and report.moved == total - 3
    assert store.count(under("d1")) == 0 and store.count(under("shoes")) == total
    assert store.count() == len(records)
    assert {c["category"].split("/")[0] for c in _stored(store).values()} == {"d0", "shoes", "d2"}
    move_category(store, "d0", "hats")  # no move pending any more
