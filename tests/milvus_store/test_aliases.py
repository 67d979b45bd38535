"""Aliases as the address of a catalogue: set, move in one step, roll back; searches, writes and
deletes through an alias reach the collection it points at; nothing is dropped from under one."""

import numpy as np
import pytest

from milvus_store import Aliases, CollectionNotFoundError, HierStore, StoreError

from .conftest import fresh_collection
from .helpers import SPEC, make_records


def _fill(target, name: str, prefix: str, n: int = 6) -> list:
    records = make_records(n, seed=len(prefix), spec=target.spec(SPEC), prefix=prefix)
    with HierStore(target.uri, name, spec=target.spec(SPEC), fingerprint=f"model-{prefix}") as store:
        store.upsert(records)
    return records


def test_an_alias_moves_in_one_step_and_back_and_every_call_follows_it(target):
    old, new, alias = fresh_collection(), fresh_collection(), fresh_collection() + "_live"
    old_records, new_records = _fill(target, old, "old"), _fill(target, new, "new", n=4)
    with Aliases(target.uri) as aliases:
        first = aliases.set(alias, old)
        assert (first.alias, first.collection, first.previous) == (alias, old, None)
        assert aliases.get(alias) == old and aliases.all()[alias] == old

        with HierStore(target.uri, alias, create=False) as live:
            assert (live.collection, live.target, live.fingerprint) == (alias, old, "model-old")
            assert live.count() == 6
            query = np.asarray(old_records[0].vector)
            assert live.search([query], k=1)[0][0].id == "old0"

            switched = aliases.set(alias, new)  # the switch, while `live` is open
            assert (switched.collection, switched.previous) == (new, old)
            assert live.count() == 4  # the same open store now reads the new collection
            assert {h.id for h in live.search([np.asarray(new_records[0].vector)], k=4)[0]} == {f"new{i}" for i in range(4)}
            live.upsert(make_records(1, seed=9, spec=target.spec(SPEC), prefix="through"))
            live.delete(["new3"])
        with HierStore(target.uri, new, create=False) as store:
            assert store.count() == 4 and store.existing_ids(["through0", "new3"]) == {"through0"}
            assert store.aliases() == [alias]

        back = aliases.set(alias, old)  # rollback: the old collection was kept, untouched
        assert (back.collection, back.previous) == (old, new)
        with HierStore(target.uri, alias, create=False) as live:
            assert live.target == old and live.count() == 6 and live.fingerprint == "model-old"
        assert aliases.set(alias, old).previous == old  # setting it again changes nothing

        assert aliases.remove(alias) == old
        assert alias not in aliases.all()
        with HierStore(target.uri, old, create=False) as store:
            assert store.count() == 6  # removing an alias keeps its collection


def test_refusals_change_nothing(target):
    first, other, alias = fresh_collection(), fresh_collection(), fresh_collection() + "_live"
    _fill(target, first, "a"), _fill(target, other, "b")
    with Aliases(target.uri) as aliases:
        aliases.set(alias, first)
        with pytest.raises(StoreError, match=f"'{other}' is a collection .* not an alias"):
            aliases.set(other, first)
        with pytest.raises(StoreError, match=f"'{alias}' is an alias \\(of '{first}'\\)"):
            aliases.set(alias + "2", alias)
        with pytest.raises(CollectionNotFoundError, match="does not exist"):
            aliases.set(alias, "no_such_collection")
        with pytest.raises(CollectionNotFoundError, match="no alias"):
            aliases.remove("no_such_alias")
        assert aliases.get(alias) == first

        with HierStore(target.uri, first, create=False) as store:
            with pytest.raises(StoreError, match=f"is the one alias '{alias}' points at"):
                store.drop()
        with HierStore(target.uri, alias, create=False) as store:
            with pytest.raises(StoreError, match=f"'{alias}' is an alias of '{first}'"):
                store.drop()
        with HierStore(target.uri, first, create=False) as store:
            assert store.count() == 6
        assert aliases.get(alias) == first
        aliases.remove(alias)
        with HierStore(target.uri, first, create=False) as store:
            store.drop()  # no alias points at it any more
        assert first not in aliases.collections()
