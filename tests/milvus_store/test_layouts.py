"""Layouts for servers (issue: Milvus servers): the vector-field limit, image-vector-only collections.

A stock Milvus 2.5 takes 4 vector fields per collection (`proxy.maxVectorFieldNum`, up to
10), Milvus 2.3 one; Milvus Lite any number. hiervec checks before creating and turns a
server's refusal into an error that names the setting and the layouts that fit.
"""

import numpy as np
import pytest
from pymilvus import MilvusClient, MilvusException

import milvus_store.store
from hiervec_core.vectors import levels_from_concat
from milvus_store import (
    CollectionNotFoundError, CollectionSpec, Features, HierStore, LevelVectorMissingError, VectorFieldLimitError, under,
)

from .conftest import fresh_collection
from .helpers import LEVELS, SPEC, assert_same_neighbours, levels_of, make_records

FIVE_LEVELS = ("a", "b", "c", "d", "e")


class RefusingServer:
    """A Milvus 2.5 client whose server refuses more than `limit` vector fields, as a stock one does."""

    limit = 4
    created: list = []
    create_schema = MilvusClient.create_schema
    prepare_index_params = MilvusClient.prepare_index_params

    def __init__(self, **kwargs):
        pass

    def get_server_version(self, timeout=None):
        return "v2.5.14"

    def has_collection(self, name, timeout=None):
        return False

    def create_collection(self, name, schema, **kwargs):
        vectors = [f for f in schema.fields if f.dtype.name == "FLOAT_VECTOR"]
        if len(vectors) > self.limit:
            raise MilvusException(code=65535, message=f"maximum vector field's number should be limited to {self.limit}")
        self.created.append(name)

    def create_index(self, *args, **kwargs):
        pass

    def load_collection(self, *args, **kwargs):
        pass

    def close(self):
        pass


@pytest.mark.unit
def test_a_stock_server_refusal_names_the_setting_and_the_layouts_that_fit(monkeypatch):
    monkeypatch.setattr(milvus_store.store, "MilvusClient", RefusingServer)
    RefusingServer.created = []
    spec = CollectionSpec(FIVE_LEVELS, 40, (8,) * 5)
    with pytest.raises(VectorFieldLimitError) as info:
        HierStore("http://milvus:19530", "catalogue", spec=spec)
    message = str(info.value)
    for part in ("needs 6 vector fields", "Milvus 2.5.14 at 'http://milvus:19530' takes 4 per collection",
                 "raise the server's proxy.maxVectorFieldNum to 6 or more (at most 10", "docker-compose.yml",
                 "vector_levels=()", "at most 3 levels, e.g. vector_levels=('c', 'd', 'e')", "Nothing was created"):
        assert part in message, message
    assert RefusingServer.created == []
    # Eleven vector fields fit no server: refused before asking.
    with pytest.raises(VectorFieldLimitError, match="no server takes more than 10"):
        HierStore("http://milvus:19530", "wide", spec=CollectionSpec(tuple("abcdefghij"), 40, (4,) * 10))
    # The layouts the message offers are created.
    with HierStore("http://milvus:19530", "lean", spec=CollectionSpec(FIVE_LEVELS, 40, (8,) * 5, vector_levels=())):
        pass
    with HierStore("http://milvus:19530", "three", spec=CollectionSpec(FIVE_LEVELS, 40, (8,) * 5,
                                                                      vector_levels=("c", "d", "e"))):
        pass
    assert RefusingServer.created == ["lean", "three"]


@pytest.mark.unit
def test_features_by_version():
    lite = Features.of("milvus_lite 3.2.2", local=False)
    assert lite.lite and lite.max_vector_fields is None and not lite.templates and lite.partition_key
    old = Features.of("v2.3.5-lite", local=False)
    assert (old.max_vector_fields, old.hybrid_search, old.server_group_by, old.scalar_index, old.partition_key) == (
        1, False, False, "Trie", False)
    assert Features.of("v2.3.12", local=False).partition_key
    modern = Features.of("v2.4.9", local=False)
    assert modern.max_vector_fields == 4 and modern.hybrid_search and not modern.templates


class TestLayoutsOnEveryTarget:
    def test_the_field_count_is_checked_before_creating(self, target):
        spec = CollectionSpec(FIVE_LEVELS, 40, (8,) * 5, index="FLAT")  # 6 vector fields
        name = fresh_collection()
        if target.level_vectors:
            if not target.lite_engine:
                pytest.skip(f"{target.name}'s limit depends on its proxy.maxVectorFieldNum")
            with HierStore(target.uri, name, spec=spec) as store:  # Milvus Lite takes any number
                assert store.spec.vector_field_count == 6
            return
        with pytest.raises(VectorFieldLimitError, match=r"needs 6 vector fields.*takes 1 per collection; use a Milvus "
                                                        r"2.4 or newer server, or keep fewer level vectors: "
                                                        r"vector_levels=\(\)"):
            HierStore(target.uri, name, spec=spec)
        with pytest.raises(CollectionNotFoundError):
            HierStore(target.uri, name)

    def test_an_image_vector_only_collection_searches_and_reads_back_every_level(self, target):
        records = make_records(120, seed=7)
        lean = CollectionSpec(LEVELS, 16, (4, 4, 8), index="FLAT", vector_levels=(), partition_key="")
        with HierStore(target.uri, fresh_collection(), spec=lean) as store:
            assert store.spec.fields.level_vectors == {} and store.spec.vector_field_count == 1
            store.upsert(records)
            query = np.asarray(records[9].vector)
            [hits] = store.search(query, k=7, where=under("d2"))
            assert_same_neighbours(hits, records, query, 7, keep=lambda r: levels_of(r)["department"] == "d2")
            with pytest.raises(LevelVectorMissingError, match="keeps no vector field for level 'item'.*vector_levels including 'item'"):
                store.search(np.zeros(8), k=3, level="item")
            stored = store.embeddings([records[1].id, records[2].id])
            expected = levels_from_concat(np.stack([records[1].vector, records[2].vector]),
                                          dict(zip(LEVELS, SPEC.level_dims)))
            for level in LEVELS:
                np.testing.assert_allclose(stored.levels[level], expected[level], atol=1e-6)
                np.testing.assert_allclose(np.linalg.norm(stored.levels[level], axis=1), 1.0, atol=1e-5)
