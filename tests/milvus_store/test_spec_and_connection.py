import pytest

from milvus_store import (
    CollectionSpec, ConnectionSettings, HierStore, StoreConnectionError, StoreError, UnsupportedIndexError, field_names,
)
from milvus_store.spec import check_index, index_build_params

pytestmark = pytest.mark.unit


def test_field_names_come_from_one_function():
    fields = field_names(("department", "category"))
    assert (fields.id, fields.uri, fields.meta, fields.vector) == ("id", "uri", "meta", "vec")
    assert fields.levels == {"department": "department", "category": "category"}
    assert fields.level_vectors == {"department": "vec_department", "category": "vec_category"}
    spec = CollectionSpec(("department", "category"), dim=8, level_dims=(4, 4))
    assert spec.fields == fields
    assert spec.vector_dims() == {"vec": 8, "vec_department": 4, "vec_category": 4}
    flat = CollectionSpec(("department", "category"), dim=8)
    assert flat.fields.level_vectors == {} and flat.vector_dims() == {"vec": 8}


def test_spec_json_round_trip():
    spec = CollectionSpec(("a", "b", "c"), dim=12, level_dims=(4, 4, 4), metric="IP", index="HNSW")
    assert CollectionSpec.from_json(spec.to_json()) == spec
    chosen = spec.resolved(index="FLAT", partition_key="a")
    assert (chosen.index, chosen.vector_levels, chosen.partition_key, chosen.num_partitions) == (
        "HNSW", ("a", "b", "c"), "a", 16)
    assert CollectionSpec.from_json(chosen.to_json()) == chosen
    image_only = CollectionSpec(("a", "b", "c"), 12, (4, 4, 4), vector_levels=(), partition_key="").resolved(
        index="FLAT", partition_key="a")
    assert (image_only.vector_levels, image_only.partition_key, image_only.num_partitions) == ((), "", None)
    assert CollectionSpec.from_json(image_only.to_json()) == image_only
    assert image_only.fields.level_vectors == {} and image_only.vector_field_count == 1


def test_a_spec_recorded_before_layouts_keeps_every_level_vector_and_no_partition_key():
    recorded = '{"dim": 12, "index": "HNSW", "layout": 2, "level_dims": [4, 4, 4], "level_names": ["a", "b", "c"], "metric": "L2"}'
    spec = CollectionSpec.from_json(recorded)
    assert spec.kept_vector_levels == ("a", "b", "c") and spec.partition_key == "" and spec.vector_field_count == 4


def test_layout_choices_are_checked_and_named_in_level_order():
    spec = CollectionSpec(("a", "b", "c"), 12, (4, 4, 4), vector_levels=("c", "a"))
    assert spec.vector_levels == ("a", "c") and list(spec.vector_dims()) == ["vec", "vec_a", "vec_c"]
    assert spec.fields.level_vectors == {"a": "vec_a", "c": "vec_c"}
    for kwargs, message in ((dict(vector_levels=("x",)), "vector_levels must be distinct levels"),
                            (dict(vector_levels=("a", "a")), "vector_levels must be distinct levels"),
                            (dict(partition_key="x"), "partition_key must be one of the levels"),
                            (dict(partition_key="a", num_partitions=0), r"num_partitions must be an integer in \[1, 1024\]"),
                            (dict(num_partitions=5000), "num_partitions"),
                            (dict(level_dims=(), vector_levels=("a",)), "a flat model has no level vectors")):
        with pytest.raises(StoreError, match=message):
            CollectionSpec(**(dict(level_names=("a", "b", "c"), dim=12, level_dims=(4, 4, 4)) | kwargs))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(level_names=("id", "b")), "level name 'id' is reserved: hiervec's own fields are id, uri"),
        (dict(level_names=("vec_a", "b")), "the fields starting with vec_ or conf_"),
        (dict(level_names=("a", "Or")), "level name 'Or' is a word of Milvus's filter language"),
        (dict(level_names=("a", "b-c")), "must be an identifier"),
        (dict(level_names=("a", "a")), "distinct"),
        (dict(dim=0), "dim must be a positive integer"),
        (dict(level_dims=(4,)), "one positive size per level"),
        (dict(metric="HAMMING"), "metric must be one of"),
        (dict(index="SCANN"), "index must be one of"),
    ],
)
def test_spec_validation(kwargs, message):
    base = dict(level_names=("a", "b"), dim=8, level_dims=(4, 4))
    with pytest.raises(StoreError, match=message):
        CollectionSpec(**(base | kwargs))


def test_lite_refuses_indexes_it_cannot_load():
    check_index("HNSW", lite=True)
    check_index("DISKANN", lite=False)
    with pytest.raises(UnsupportedIndexError, match="Lite accepts it but fails when loading it"):
        check_index("IVF_PQ", lite=True)
    assert index_build_params("IVF_PQ", 192)["m"] == 48
    assert index_build_params("IVF_PQ", 10)["m"] == 2


def test_uri_and_token_from_environment(monkeypatch):
    monkeypatch.delenv("HIERVEC_MILVUS_URI", raising=False)
    monkeypatch.delenv("HIERVEC_MILVUS_TOKEN", raising=False)
    assert ConnectionSettings.resolve().uri == "./hiervec.db"
    monkeypatch.setenv("HIERVEC_MILVUS_URI", "http://milvus:19530")
    monkeypatch.setenv("HIERVEC_MILVUS_TOKEN", "root:Milvus")
    settings = ConnectionSettings.resolve()
    assert (settings.uri, settings.token, settings.is_local) == ("http://milvus:19530", "root:Milvus", False)
    assert ConnectionSettings.resolve("x.db", token="t").token == "t"
    with pytest.raises(StoreConnectionError, match="neither a Milvus Lite file path ending in .db"):
        ConnectionSettings.resolve("./catalogue")
    with pytest.raises(StoreConnectionError, match="give both user and password"):
        ConnectionSettings.resolve("x.db", user="me")


def test_secrets_never_show():
    settings = ConnectionSettings.resolve("https://bob:hunter2@milvus.example:443", token="tok-123")
    shown = repr(settings) + settings.display_uri + settings.redact("failed with tok-123 and hunter2")
    assert "tok-123" not in shown and "hunter2" not in shown
    assert settings.redact("failed with tok-123") == "failed with ***"
    assert repr(settings) == "ConnectionSettings(uri='https://***@milvus.example:443', auth=token)"


def test_unreachable_server_names_the_uri_but_not_the_token():
    with pytest.raises(StoreConnectionError) as info:
        HierStore("http://127.0.0.1:9", "images", token="s3cret-token", timeout=2)
    message = str(info.value)
    assert "http://127.0.0.1:9" in message and "s3cret-token" not in message


def test_search_breadth_grows_as_the_filter_narrows():
    from milvus_store.spec import index_search_params

    assert index_search_params("HNSW", 10) == {"ef": 64}
    assert index_search_params("HNSW", 100) == {"ef": 100}
    assert index_search_params("HNSW", 10, share=0.02) == {"ef": 3200}
    assert index_search_params("HNSW", 10, share=1e-9) == {"ef": 32768}
    assert index_search_params("IVF_FLAT", 10) == {"nprobe": 32}
    assert index_search_params("IVF_SQ8", 10, share=0.02) == {"nprobe": 160}
    assert index_search_params("IVF_FLAT", 10, share=0.0001) == {"nprobe": 1024}
    assert index_search_params("FLAT", 10, share=0.02) == {}


@pytest.mark.lite
def test_the_reserved_words_are_ones_milvus_cannot_filter_on_and_an_allowed_name_filters(tmp_path):
    """Why the level-name rule refuses the filter language's words: a field so named cannot be filtered
    on (Milvus Lite's parser here, in any case; the rule also holds the function names of newer
    servers' grammar, which Lite still reads as names); the rule passes a name beside them."""
    from pymilvus import DataType, MilvusClient

    from hiervec_core.names import FILTER_KEYWORDS, level_name_problem

    client = MilvusClient(str(tmp_path / "words.db"))
    try:
        for word in ("or", "Or", "in", "like", "not", "exists", "true", "is", "null", "colour"):
            schema = MilvusClient.create_schema(auto_id=False)
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=8)
            schema.add_field(word, DataType.VARCHAR, max_length=8)
            schema.add_field("vec", DataType.FLOAT_VECTOR, dim=2)
            index = client.prepare_index_params()
            index.add_index("vec", index_type="FLAT", metric_type="L2")
            client.create_collection(f"c_{word}_{len(word)}{word.islower()}", schema=schema, index_params=index)
            client.insert(f"c_{word}_{len(word)}{word.islower()}", [{"id": "1", word: "x", "vec": [0.0, 0.0]}])
            if word == "colour":  # not a word of the language: filters work, the rule lets it pass
                assert level_name_problem(word) is None
                assert client.query(f"c_{word}_{len(word)}{word.islower()}", filter=f'{word} == "x"',
                                    output_fields=["id"]) == [{"id": "1"}]
                continue
            assert word.lower() in FILTER_KEYWORDS and level_name_problem(word.upper())
            with pytest.raises(Exception):
                client.query(f"c_{word}_{len(word)}{word.islower()}", filter=f'{word} == "x"', output_fields=["id"])
    finally:
        client.close()


@pytest.mark.unit
@pytest.mark.parametrize("timeout, loads, expected", [
    (None, True, "it is loaded again: retry"),
    (None, False, "loading it again failed within 30 s (wait for loading collection timeout): retry later"),
    (5.0, False, "loading it again failed within 5 s (wait for loading collection timeout): retry later"),
])
def test_a_released_collection_is_loaded_again_within_a_deadline_and_the_call_is_a_server_fault(timeout, loads,
                                                                                                 expected):
    """A restarted server holds the collection released; loading it again once had no deadline and
    hung a service request forever (its load never ended): the load now has one, and either way
    the failed call is `StoreUnavailableError` (503), never a caller's error."""
    from pymilvus import MilvusException

    from milvus_store import HierStore, StoreUnavailableError
    from milvus_store.connection import ConnectionSettings

    deadlines = []

    class Client:
        def load_collection(self, name, timeout):
            deadlines.append((name, timeout))
            if not loads:
                raise MilvusException(message="wait for loading collection timeout")

    store = object.__new__(HierStore)  # only what a failed call reads: no server
    store.settings, store.collection, store.timeout, store._client = ConnectionSettings("http://m:19530"), "shop", \
        timeout, Client()
    with pytest.raises(StoreUnavailableError) as raised:
        with store._calls("search"):
            raise MilvusException(message="collection not loaded")
    assert str(raised.value) == ("search on 'shop': the collection was not loaded at 'http://m:19530' "
                                 f"(the server restarted?); {expected}")
    assert deadlines == [("shop", 30.0 if timeout is None else timeout)]
