"""The partition key: created on the chosen level, filters carry the ancestor it implies, results unchanged.

Milvus prunes partitions only for ``==``/``in`` on the key field, so a condition on a deeper
level also states its ancestor on the key's level. That must never change which rows
match: checked against a Python oracle over random filter trees, on every target.
"""

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from milvus_store import (
    And, CollectionNotFoundError, CollectionSpec, Eq, HierStore, In, Not, Or, StoreError, Under, field_names, render,
)

from .conftest import fresh_collection
from .helpers import LEAVES, LEVELS, brute_force, levels_of, make_records

KEYED = field_names(LEVELS, partition_key="department")


@pytest.mark.unit
def test_a_deeper_condition_states_the_ancestor_on_the_key_level():
    cases = [
        (Eq("department", "d1"), 'department == "d1"'),
        (Eq("category", "d1/c10"), '(department == "d1" and category == "d1/c10")'),
        (Under("d1/c10/i101"), '(department == "d1" and item == "d1/c10/i101")'),
        (In("category", ("d2/c20", "d0/c01", "d2/c21")),
         '(department in ["d0", "d2"] and category in ["d2/c20", "d0/c01", "d2/c21"])'),
        (~Eq("category", "d1/c10"), 'not ((department == "d1" and category == "d1/c10"))'),
    ]
    for where, expected in cases:
        assert render(where, KEYED, templates=False)[0] == expected
    expr, params = render(Eq("item", "d0/c00/i000"), KEYED, templates=True)
    assert expr == "(department == {p1} and item == {p0})" and params == {"p0": "d0/c00/i000", "p1": "d0"}
    # A key on a deeper level: conditions on coarser levels imply nothing about it.
    by_category = field_names(LEVELS, partition_key="category")
    assert render(Eq("department", "d1"), by_category, templates=False)[0] == 'department == "d1"'
    assert render(Eq("item", "d1/c10/i100"), by_category, templates=False)[0] == (
        '(category == "d1/c10" and item == "d1/c10/i100")')
    assert render(Eq("item", "d1/c10/i100"), field_names(LEVELS), templates=False)[0] == 'item == "d1/c10/i100"'


def matches(where, record) -> bool:
    """The Python oracle of a filter tree over a record's category path."""
    levels = levels_of(record)
    if isinstance(where, Eq):
        return levels[where.level] == where.value
    if isinstance(where, In):
        return levels[where.level] in where.values
    if isinstance(where, Under):
        return levels[LEVELS[where.path.count("/")]] == where.path
    if isinstance(where, Not):
        return not matches(where.part, record)
    if isinstance(where, And):
        return all(matches(p, record) for p in where.parts)
    if isinstance(where, Or):
        return any(matches(p, record) for p in where.parts)
    raise TypeError(where)


PATHS = {level: sorted({"/".join(leaf.split("/")[: i + 1]) for leaf in LEAVES}) + [f"x/{level}"]
         for i, level in enumerate(LEVELS)}
conditions = st.one_of(
    st.sampled_from(LEVELS).flatmap(lambda level: st.sampled_from(PATHS[level]).map(lambda v: Eq(level, v))),
    st.sampled_from(LEVELS).flatmap(
        lambda level: st.lists(st.sampled_from(PATHS[level]), min_size=1, max_size=3, unique=True).map(
            lambda vs: In(level, tuple(vs)))),
    st.sampled_from(sorted({p for paths in PATHS.values() for p in paths if not p.startswith("x/")})).map(Under),
)
trees = st.recursive(conditions, lambda inner: st.one_of(
    inner.map(Not), st.lists(inner, min_size=2, max_size=3).map(lambda ps: And(tuple(ps))),
    st.lists(inner, min_size=2, max_size=3).map(lambda ps: Or(tuple(ps)))), max_leaves=5)


@pytest.fixture(scope="module")
def keyed_lite(tmp_path_factory):
    records = make_records(240, seed=3)
    with HierStore(str(tmp_path_factory.mktemp("keyed") / "k.db"), "keyed",
                   spec=CollectionSpec(LEVELS, 16, (4, 4, 8), index="FLAT", partition_key="department",
                                       num_partitions=4)) as store:
        store.upsert(records)
        yield store, records


@pytest.mark.lite
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=trees)
def test_filters_with_implied_ancestors_match_the_oracle(keyed_lite, where):
    store, records = keyed_lite
    expected = {r.id for r in records if matches(where, r)}
    assert store.count(where) == len(expected)
    query = np.asarray(records[0].vector)
    [hits] = store.search(query, k=10, where=where)
    ids = brute_force(records, query, 10, keep=lambda r: matches(where, r))[0] if expected else []
    assert [h.id for h in hits] == ids


FLAT = CollectionSpec(LEVELS, 16, (4, 4, 8), index="FLAT")


class TestPartitionKeyOnEveryTarget:
    def test_the_default_key_is_the_coarsest_level_on_servers_and_none_on_lite(self, target):
        with HierStore(target.uri, fresh_collection(), spec=target.spec(FLAT)) as store:
            assert store.spec.partition_key == ("department" if target.partition_key and not target.lite_engine else "")
            assert store.spec.num_partitions == (16 if store.spec.partition_key else None)

    def test_a_server_that_misfiles_keyed_upserts_refuses_a_key_and_creates_nothing(self, target):
        if target.partition_key:
            pytest.skip(f"{target.name} files keyed upserts correctly")
        name = fresh_collection()
        with pytest.raises(StoreError, match=r"wrong partition.*milvus-io/milvus#30607.*partition_key='' \(none\).*"
                                             r"Nothing was created"):
            HierStore(target.uri, name, spec=target.spec(replace(FLAT, partition_key="department")))
        with pytest.raises(CollectionNotFoundError):
            HierStore(target.uri, name)

    def test_a_keyed_collection_answers_like_an_unkeyed_one(self, target):
        if not target.partition_key:
            pytest.skip(f"{target.name} upserts partition-key rows into the wrong partition (milvus-io/milvus#30607)")
        records = make_records(200, seed=4)
        keyed_spec = target.spec(replace(FLAT, partition_key="department", num_partitions=8))
        with HierStore(target.uri, fresh_collection(), spec=keyed_spec) as keyed, \
                HierStore(target.uri, fresh_collection(), spec=target.spec(replace(FLAT, partition_key=""))) as plain:
            described = keyed._client.describe_collection(keyed.collection)
            [key_field] = [f for f in described["fields"] if f.get("is_partition_key")]
            # Milvus Lite makes 16 partitions (and a default one) whatever it is asked, and records that.
            assert key_field["name"] == "department"
            assert described.get("num_partitions") == (17 if target.lite_engine else 8)
            assert keyed.spec.num_partitions == (16 if target.lite_engine else 8)
            assert not any(f.get("is_partition_key") for f in plain._client.describe_collection(plain.collection)["fields"])
            keyed.upsert(records)
            plain.upsert(records)
            query = np.asarray(records[5].vector)
            for where in (Under("d1"), Under("d2/c21"), In("item", ("d0/c00/i001", "d2/c20/i200")),
                          ~Eq("category", "d1/c10") & Under("d1"), None):
                assert keyed.count(where) == plain.count(where) == sum(matches(where, r) for r in records) \
                    if where is not None else len(records)
                assert [h.id for h in keyed.search(query, k=15, where=where)[0]] == \
                    [h.id for h in plain.search(query, k=15, where=where)[0]]
