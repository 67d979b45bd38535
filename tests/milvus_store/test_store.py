"""The store's contract, run against every target (Lite, milvus-lite server, Milvus 2.3, Docker's Milvus)."""

import numpy as np
import pytest

from milvus_store import (
    CollectionNotFoundError, CollectionSpec, Eq, FilterError, HierStore, In, Meta, Record, RecordError, SchemaMismatchError,
    UnsupportedIndexError, content_id, under,
)
from milvus_store.spec import LITE_INDEXES, SERVER_INDEXES

from hiervec_core.vectors import levels_from_concat

from .conftest import fresh_collection
from .helpers import LEAVES, LEVELS, SPEC, assert_same_neighbours, brute_force, levels_of, make_records


@pytest.fixture
def make_store(target):
    opened = []

    def make(spec=SPEC, collection=None, **kwargs):
        spec = target.spec(spec) if spec is not None else None
        store = HierStore(target.uri, collection or fresh_collection(), spec=spec, **kwargs)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def fill(store: HierStore) -> tuple[HierStore, list[Record]]:
    records = make_records(300)
    assert store.upsert(records, batch_size=128) == 300
    return store, records


@pytest.fixture(scope="module")
def read_only_collections():
    """{server uri: (store, records)}: one filled collection per server for the tests that only read it
    (each new collection costs a server about 3 s to create, index and load: Milvus 2.3, 20 tests)."""
    shared = {}
    yield shared
    for store, _ in shared.values():
        store.close()


@pytest.fixture
def filled(target, make_store, read_only_collections):
    """300 records, only read by the test: shared by a server's tests (Lite's file is each test's own)."""
    if target.name == "lite":
        return fill(make_store())
    if target.uri not in read_only_collections:
        read_only_collections[target.uri] = fill(HierStore(target.uri, fresh_collection(), spec=target.spec(SPEC)))
    store, records = read_only_collections[target.uri]
    assert store.count() == len(records), "a test wrote to the shared read-only collection: give it its own"
    return store, records


@pytest.fixture
def filled_to_change(make_store):
    """300 records in a collection of the test's own, to write to."""
    return fill(make_store())


class TestStoreContract:
    def test_flat_search_equals_brute_force(self, filled):
        store, records = filled
        queries = np.random.default_rng(1).normal(size=(5, SPEC.dim)).astype(np.float32)
        results = store.search(queries, k=10)
        assert len(results) == 5
        for query, hits in zip(queries, results):
            assert_same_neighbours(hits, records, query, 10)
            assert all(set(h.categories) == set(LEVELS) and h.uri.startswith("file:///") for h in hits)

    def test_embeddings_read_back_every_vector_of_the_found_ids(self, filled):
        store, records = filled
        wanted = [records[7].id, "absent", records[3].id, records[7].id]
        stored = store.embeddings(wanted)
        assert stored.ids == (records[7].id, records[3].id)
        assert np.allclose(stored.concat, [records[7].vector, records[3].vector], atol=1e-6)
        assert list(stored.levels) == list(LEVELS)
        # Levels without a field of their own come back from the image vector's slices, at unit length.
        derived = levels_from_concat(np.stack([records[7].vector, records[3].vector]), dict(zip(LEVELS, SPEC.level_dims)))
        for level in LEVELS:
            kept = level in store.spec.fields.level_vectors
            expected = ([records[7].level_vectors[level], records[3].level_vectors[level]] if kept
                        else derived[level])
            assert np.allclose(stored.levels[level], expected, atol=1e-6)
        assert store.embeddings(["absent"]).concat.shape == (0, SPEC.dim)

    def test_search_on_one_level_vector(self, target, filled):
        target.needs_level_vectors()
        store, records = filled
        query = np.random.default_rng(2).normal(size=4).astype(np.float32)
        [hits] = store.search(query, k=7, level="category")
        assert_same_neighbours(hits, records, query, 7, level="category")

    @pytest.mark.parametrize(
        "where, keep",
        [
            (Eq("department", "d1"), lambda lv, m: lv["department"] == "d1"),
            (In("item", ("d0/c00/i000", "d2/c21/i211")), lambda lv, m: lv["item"] in ("d0/c00/i000", "d2/c21/i211")),
            (under("d2/c20"), lambda lv, m: lv["category"] == "d2/c20"),
            (~under("d0"), lambda lv, m: lv["department"] != "d0"),
            (Meta("price", "<", 30), lambda lv, m: m["price"] < 30),
            (Meta("colour", "in", ["red", "green"]), lambda lv, m: m["colour"] in ("red", "green")),
            (under("d1") & Meta("colour", "==", "blue"), lambda lv, m: lv["department"] == "d1" and m["colour"] == "blue"),
            (under("d0/c01") | ~Meta("price", ">=", 10), lambda lv, m: lv["category"] == "d0/c01" or m["price"] < 10),
            ({"department": "d2", "category": ["d2/c21", "d0/c00"]}, lambda lv, m: lv["category"] == "d2/c21"),
        ],
        ids=["eq", "in", "under", "not", "meta-lt", "meta-in", "and", "or", "mapping"],
    )
    def test_filters_match_a_python_oracle(self, filled, where, keep):
        store, records = filled
        expected = {r.id for r in records if keep(levels_of(r), r.meta)}
        assert 0 < len(expected) < len(records)
        assert store.count(where) == len(expected)
        assert {h.id for h in store.iterate(where)} == expected
        query = np.random.default_rng(3).normal(size=SPEC.dim).astype(np.float32)
        [hits] = store.search(query, k=10, where=where)
        assert_same_neighbours(hits, records, query, min(10, len(expected)),
                               keep=lambda r: r.id in expected)

    def test_group_by_caps_hits_per_category(self, filled):
        store, records = filled
        query = np.random.default_rng(4).normal(size=SPEC.dim).astype(np.float32)
        [hits] = store.search(query, k=4, group_by="category", group_size=2)
        per_category = {}
        for hit in hits:
            per_category.setdefault(hit.categories["category"], []).append(hit)
        assert len(per_category) == 4 and all(len(v) <= 2 for v in per_category.values())
        # The first group is the nearest record's category and holds its 2 nearest members.
        nearest_id, _ = brute_force(records, query, 1)
        first = next(r for r in records if r.id == nearest_id[0])
        group = levels_of(first)["category"]
        ids, _ = brute_force(records, query, 2, keep=lambda r: levels_of(r)["category"] == group)
        assert [h.id for h in per_category[group]] == ids

    def test_group_by_keeps_small_categories_like_a_brute_force_oracle(self, make_store):
        """Milvus Lite 3.2.2 drops every category with fewer than group_size matches; the store must not.
        Group sizes 1 to 50 on one collection (a collection each took 4 s on Milvus 2.3)."""
        from dataclasses import replace

        sizes = {leaf: n for leaf, n in zip(LEAVES, [1, 2, 3, 5, 8, 1, 2, 4, 6, 1, 3, 7])}
        base = make_records(sum(sizes.values()), seed=9)
        records, start = [], 0
        for leaf, n in sizes.items():
            records += [replace(r, category=leaf) for r in base[start:start + n]]
            start += n
        store = make_store()
        store.upsert(records)
        store.flush()
        by_id = {r.id: r for r in records}
        for group_size in (1, 2, 3, 6, 50):
            self.check_group_by(store, records, by_id, group_size)

    @staticmethod
    def check_group_by(store, records, by_id, group_size: int) -> None:
        rng = np.random.default_rng(group_size)
        for query, k, where in ((rng.normal(size=SPEC.dim).astype(np.float32), 5, None),
                                (rng.normal(size=SPEC.dim).astype(np.float32), 12, None),
                                (rng.normal(size=SPEC.dim).astype(np.float32), 3, under("d1"))):
            keep = None if where is None else (lambda r: r.category.startswith("d1/"))
            ranked, _ = brute_force(records, query, len(records), keep=keep)
            oracle: dict[str, list[str]] = {}
            for rid in ranked:
                oracle.setdefault(by_id[rid].category, []).append(rid)
            expected = {leaf: ids[:group_size] for leaf, ids in list(oracle.items())[:k]}
            [hits] = store.search(query, k=k, group_by="item", group_size=group_size, where=where)
            found: dict[str, list[str]] = {}
            for hit in hits:
                found.setdefault(hit.categories["item"], []).append(hit.id)
            assert found == expected, (k, group_size, where)
            assert list(found) == list(expected)  # categories in order of their nearest image

    def test_range_search_returns_exactly_the_records_inside_the_radius(self, filled):
        store, records = filled
        query = np.asarray(records[0].vector)
        _, dist = brute_force(records, query, len(records))
        radius = float(dist[20]) + 1e-3
        inner = float(dist[5]) + 1e-3
        [hits] = store.search(query, k=100, radius=radius, range_filter=inner)
        expected = {i for i, d in zip(*brute_force(records, query, len(records))) if inner <= d < radius}
        assert {h.id for h in hits} == expected
        assert all(inner <= h.distance < radius for h in hits)

    def test_hybrid_rrf_fuses_the_level_rankings(self, target, filled):
        target.needs_level_vectors()
        store, records = filled
        rng = np.random.default_rng(5)
        queries = {"department": rng.normal(size=4), "item": rng.normal(size=8)}
        [hits] = store.hybrid_search(queries, k=5, candidates=10)
        scores = {}
        for level, query in queries.items():
            ids, _ = brute_force(records, query, 10, level=level)
            for rank, rid in enumerate(ids):
                scores[rid] = scores.get(rid, 0.0) + 1.0 / (60 + rank + 1)
        expected = sorted(scores.values(), reverse=True)[:5]
        np.testing.assert_allclose([h.distance for h in hits], expected, rtol=1e-5)
        assert all(abs(scores[h.id] - h.distance) < 1e-6 for h in hits)

    def test_hybrid_weighted_with_one_weight_follows_that_level(self, target, filled):
        target.needs_level_vectors()
        store, records = filled
        rng = np.random.default_rng(6)
        queries = {"department": rng.normal(size=4), "category": rng.normal(size=4)}
        [hits] = store.hybrid_search(queries, k=5, weights={"department": 1.0, "category": 0.0},
                                     where=under("d1"))
        ids, _ = brute_force(records, queries["department"], 5, level="department",
                             keep=lambda r: levels_of(r)["department"] == "d1")
        assert [h.id for h in hits] == ids

    def test_iterator_goes_past_one_page(self, filled):
        store, records = filled
        query = np.asarray(records[7].vector)
        hits = list(store.search_iter(query, limit=120, batch_size=50))
        assert len({h.id for h in hits}) == 120
        ids, dist = brute_force(records, query, 120)
        np.testing.assert_allclose(sorted(h.distance for h in hits), dist, rtol=1e-4, atol=1e-4)

    def test_upsert_is_idempotent_and_content_ids_are_stable(self, make_store):
        store = make_store()
        records = make_records(20)
        for record in records[:5]:
            record.id, record.content = None, record.uri.encode()
        store.upsert(records)
        store.upsert(records)
        assert store.count() == 20
        assert content_id(records[0].content) in store.existing_ids([content_id(records[0].content), "nope"])
        changed = make_records(1, seed=9)[0]
        changed.id = records[10].id
        store.upsert([changed])
        assert store.count() == 20
        [stored] = store.get([records[10].id])
        assert stored.category == changed.category and stored.meta == changed.meta

    def test_delete_by_ids_and_by_filter(self, filled_to_change):
        store, records = filled_to_change
        assert store.delete(["r0", "r1", "missing"]) == 2
        d0 = sum(1 for r in records[2:] if levels_of(r)["department"] == "d0")
        assert store.delete(where=under("d0")) == d0
        assert store.count() == 298 - d0
        assert store.count(under("d0")) == 0

    def test_invalid_records_name_the_culprit_and_nothing_is_written(self, target, make_store):
        store = make_store()
        good = make_records(3)
        kept_level_vector = [(lambda r: r.level_vectors.pop("item"), r"record 'r1': missing level vectors for \['item'\]")]
        bad_cases = (kept_level_vector if target.level_vectors else []) + [
            (lambda r: setattr(r, "vector", np.zeros(3)), r"record 'r1': vector has shape \(3,\), expected \(16,\)"),
            (lambda r: r.vector.__setitem__(0, np.nan), "record 'r1': vector holds NaN"),
            (lambda r: r.level_vectors.__setitem__("colour", [1]), r"unknown levels \['colour'\]"),
            (lambda r: setattr(r, "category", "d0/c00"), "record 'r1': category path 'd0/c00' has 2 levels, expected 3"),
            (lambda r: setattr(r, "category", "d0/ /x"), "empty, padded or separator-bearing name"),
            (lambda r: setattr(r, "meta", {"x": float("nan")}), "meta is not JSON-serialisable"),
            (lambda r: setattr(r, "id", None), "record #1: has neither an id nor content"),
            (lambda r: setattr(r, "id", "r0"), "record 'r0': id repeats record #0 of the same batch"),
        ]
        for spoil, message in bad_cases:
            records = make_records(3)
            spoil(records[1])
            with pytest.raises(RecordError, match=message):
                store.upsert(records)
            assert store.count() == 0
        store.upsert(good)
        assert store.count() == 3

    def test_mismatched_spec_or_fingerprint_is_refused_before_writing(self, make_store):
        name = fresh_collection()
        store = make_store(collection=name, fingerprint="model-a")
        store.upsert(make_records(4))
        other_dims = CollectionSpec(LEVELS, dim=16, level_dims=(4, 4, 4))
        with pytest.raises(SchemaMismatchError, match=r"level_dims is \(4, 4, 8\) in the collection but \(4, 4, 4\)"):
            make_store(other_dims, collection=name)
        with pytest.raises(SchemaMismatchError, match="level_names"):
            make_store(CollectionSpec(("a", "b", "c"), dim=16, level_dims=(4, 4, 8)), collection=name)
        with pytest.raises(SchemaMismatchError, match="metric is 'L2' in the collection but 'IP'"):
            make_store(CollectionSpec(LEVELS, dim=16, level_dims=(4, 4, 8), metric="IP"), collection=name)
        with pytest.raises(SchemaMismatchError) as info:
            make_store(collection=name, fingerprint="model-b")
        assert (info.value.field, info.value.expected, info.value.actual) == ("model fingerprint", "model-b", "model-a")
        reopened = make_store(spec=None, collection=name)
        assert reopened.spec == store.spec and reopened.fingerprint == "model-a" and reopened.count() == 4
        assert (store.spec.level_names, store.spec.level_dims, store.spec.index) == (LEVELS, SPEC.level_dims, "FLAT")

    def test_reopening_keeps_every_record(self, target, make_store):
        name = fresh_collection()
        records = make_records(50)
        store = make_store(collection=name)
        store.upsert(records)
        store.flush()
        store.close()
        again = make_store(spec=None, collection=name)
        assert again.count() == 50
        assert {h.id for h in again.iterate()} == {r.id for r in records}
        query = np.asarray(records[3].vector)
        assert again.search(query, k=1)[0][0].id == "r3"

    def test_missing_collection_without_spec(self, make_store):
        with pytest.raises(CollectionNotFoundError, match="does not exist"):
            make_store(spec=None)

    def test_offered_indexes_serve_searches(self, target, make_store):
        offered = LITE_INDEXES if target.lite_engine else SERVER_INDEXES
        records = make_records(200)
        for index in offered:
            store = make_store(CollectionSpec(LEVELS, dim=16, level_dims=(4, 4, 8), index=index))
            store.upsert(records)
            [hits] = store.search(np.asarray(records[11].vector), k=3)
            assert hits[0].id == "r11", index

    def test_indexes_the_target_cannot_serve_are_refused_before_creation(self, target, make_store):
        if not target.lite_engine:
            pytest.skip("a full Milvus server serves every index hiervec offers")
        name = fresh_collection()
        for index in ("IVF_PQ", "DISKANN"):
            with pytest.raises(UnsupportedIndexError, match=f"index '{index}' is not offered on Milvus Lite"):
                make_store(CollectionSpec(LEVELS, dim=16, level_dims=(4, 4, 8), index=index), collection=name)
        with pytest.raises(CollectionNotFoundError):
            make_store(spec=None, collection=name)

    def test_a_filter_nothing_passes_returns_no_hits(self, target, filled):
        store, _ = filled
        query = np.zeros(SPEC.dim, dtype=np.float32)
        assert store.search([query, query], k=5, where=under("d9")) == [[], []]
        if target.level_vectors:
            assert store.hybrid_search({"department": np.zeros(4)}, k=5, where=under("d9")) == [[]]

    def test_output_names_the_fields_hits_carry_and_none_is_the_id_alone(self, filled):
        store, records = filled
        query = np.asarray(records[5].vector)
        ids, _ = brute_force(records, query, 4)
        for hits in (store.search(query, k=4, output=[])[0], list(store.search_iter(query, limit=4, output=[]))):
            assert [h.id for h in hits] == ids
            assert all(h.uri == "" and h.categories == {} and h.meta == {} and h.confidence == {} for h in hits)
        [hits] = store.search(query, k=4, output=["uri", "department"])
        assert [h.id for h in hits] == ids and all(h.uri.startswith("file:///") and h.meta == {} for h in hits)
        assert all(list(h.categories) == ["department"] for h in hits)
        assert {h.id for h in store.iterate(under("d1"), output=[])} == {
            r.id for r in records if levels_of(r)["department"] == "d1"}

    def test_category_counts(self, filled):
        store, records = filled
        from collections import Counter

        expected = {level: Counter(levels_of(r)[level] for r in records) for level in store.spec.level_names}
        assert store.category_counts("department") == expected["department"]
        assert store.category_counts() == expected
        with pytest.raises(FilterError, match="unknown level 'colour'"):
            store.category_counts("colour")


@pytest.mark.lite
def test_iterator_beyond_milvus_topk_limit(tmp_path):
    # 64 dimensions, as image vectors have at least: pymilvus's search iterator widens its range
    # search by a guess that low dimensions defeat (17k vectors: 56 s at 2 dimensions, 44 s at 16,
    # 5 s at 32, 64 or 128, Milvus Lite on an idle 2-core machine)
    spec = CollectionSpec(("a", "b"), dim=64)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(17_000, 64)).astype(np.float32)
    with HierStore(str(tmp_path / "big.db"), "big", spec=spec.with_index("FLAT")) as store:
        store.upsert([Record("x/y", v, id=str(i)) for i, v in enumerate(vectors)], batch_size=5000)
        store.flush()  # searched from sealed segments: Lite reads rows still in its memtable one by one
        with pytest.raises(ValueError, match="use search_iter"):
            store.search(vectors[0], k=16_385)
        hits = list(store.search_iter(vectors[0], limit=16_500, batch_size=4000, output=[]))
    assert len({h.id for h in hits}) == 16_500
    dist = ((vectors - vectors[0]) ** 2).sum(1)
    np.testing.assert_allclose(sorted(h.distance for h in hits), np.sort(dist)[:16_500], rtol=1e-4, atol=1e-5)


@pytest.mark.lite
def test_a_refused_open_releases_the_lite_file(tmp_path):
    uri = str(tmp_path / "h.db")
    with HierStore(uri, "images", spec=SPEC, fingerprint="a") as store:
        store.upsert(make_records(3))
    for _ in range(3):
        with pytest.raises(SchemaMismatchError):
            HierStore(uri, "images", spec=SPEC, fingerprint="b")
    with HierStore(uri, "images") as again:
        assert again.count() == 3


@pytest.mark.lite
def test_the_last_store_of_a_lite_file_to_close_stops_its_server(tmp_path):
    import subprocess
    import sys
    import threading

    from milvus_lite.server_manager import server_manager_instance

    from milvus_store.connection import LITE_SERVERS

    def lite_threads():
        return sum(t.name.startswith("milvus_lite-") for t in threading.enumerate())

    def locked_for_another_process(path) -> bool:
        code = f"from milvus_store.store import _locked_by_another_process as l; print(l({str(path)!r}))"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "True"

    db = tmp_path / "shared.db"
    before = lite_threads()
    first = HierStore(db, "c", spec=SPEC)
    first.upsert(make_records(5))
    second = HierStore(db, "c")
    assert LITE_SERVERS.users(str(db)) == 2 and lite_threads() > before
    first.close()
    first.close()  # twice lets go once
    assert LITE_SERVERS.users(str(db)) == 1 and second.count() == 5  # the other store still works
    assert str(db) in server_manager_instance._servers and locked_for_another_process(db)
    second.close()
    assert LITE_SERVERS.users(str(db)) == 0 and str(db) not in server_manager_instance._servers
    assert lite_threads() == before  # its background threads are gone,
    assert not locked_for_another_process(db)  # and another process can open the file
    with HierStore(db, "c") as reopened:  # as can this one, with what was stored
        assert reopened.count() == 5
    with pytest.raises(CollectionNotFoundError):
        HierStore(db, "missing", create=False)  # a refused open lets go too
    assert LITE_SERVERS.users(str(db)) == 0 and str(db) not in server_manager_instance._servers
