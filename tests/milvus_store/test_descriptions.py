"""A hiervec collection explains itself to whoever opens it with plain pymilvus (or Attu): a
description on the collection and on every field, also recorded as a property, since Milvus
Lite drops descriptions; and a hand-written filter on a level field works as described."""

import json

from pymilvus import MilvusClient

from milvus_store import HierStore
from milvus_store.spec import PROPERTY_ABOUT
from milvus_store.store import collection_description, field_descriptions

from .conftest import fresh_collection
from .helpers import SPEC, levels_of, make_records


def test_every_field_is_described_and_a_hand_written_filter_on_a_level_field_works(target):
    name, spec = fresh_collection(), target.spec(SPEC)
    records = make_records(6, seed=1, spec=spec)
    with HierStore(target.uri, name, spec=spec, fingerprint="model-x") as store:
        store.upsert(records)
    client = MilvusClient(target.uri)
    try:
        described = client.describe_collection(name)
        fields = [field["name"] for field in described["fields"]]
        about = json.loads(described["properties"][PROPERTY_ABOUT])
        assert set(about["fields"]) == set(fields) == set(field_descriptions(spec))
        assert about["collection"] == collection_description(spec)
        assert all(len(text) > 20 for text in about["fields"].values())
        if not target.lite_engine:  # Milvus Lite keeps neither kind of description
            assert described["description"] == about["collection"]
            assert {f["name"]: f["description"] for f in described["fields"]} == about["fields"]
        first, second = spec.level_names[:2]
        assert f"e.g. '<{first}>/<{second}>'" in about["fields"][second]
        assert "1/sqrt(3)" in about["fields"]["vec"]

        # what the descriptions say: level fields hold full paths, so a bare name finds nothing
        path = levels_of(records[0])[second]
        bare = path.rsplit("/", 1)[-1]
        client.load_collection(name)  # a reopened Lite collection starts unloaded for a plain client
        found = client.query(name, filter=f'{second} == "{path}"', output_fields=["id"], consistency_level="Strong")
        assert {row["id"] for row in found} == {r.id for r in records if levels_of(r)[second] == path}
        assert client.query(name, filter=f'{second} == "{bare}"', output_fields=["id"]) == []
        under = client.query(name, filter=f'{spec.level_names[2]} like "{path}/%"', output_fields=["id"])
        assert {row["id"] for row in under} == {r.id for r in records if levels_of(r)[second] == path}
    finally:
        client.close()
