"""plan_sync / apply_sync on every store target: the scope, the kept ids and uris, nothing else removed."""

from milvus_store import HierStore, Record
from milvus_store.sync import apply_sync, plan_sync

from .conftest import fresh_collection
from .helpers import SPEC, make_records


def test_a_sync_removes_exactly_the_unlisted_images_in_its_scope(target):
    spec = target.spec(SPEC)
    records = make_records(12, spec=spec)
    for i, record in enumerate(records):  # six under /shop, six under /other
        records[i] = Record(record.category, record.vector, record.level_vectors, id=record.id,
                            uri=f"/{'shop' if i < 6 else 'other'}/{record.id}.png", meta=record.meta)
    with HierStore(target.uri, fresh_collection(), spec=spec) as store:
        store.upsert(records)
        listed = ["r0", "r1", "r2"]  # r3 unreadable this time (its uri kept), r4 and r5 gone
        plan = plan_sync(store, listed, {"/shop/r3.png"}, under_uri="/shop")
        assert (plan.scope, plan.examined, sorted(plan.stale)) == ("/shop/", 6, ["r4", "r5"])
        assert sorted(plan.stale_uris) == ["/shop/r4.png", "/shop/r5.png"]
        assert store.count() == 12  # planning removes nothing
        assert apply_sync(store, plan) == 2
        assert store.count() == 10 and store.existing_ids([r.id for r in records]) == {
            f"r{i}" for i in range(12)} - {"r4", "r5"}
        assert plan_sync(store, listed, {"/shop/r3.png"}, under_uri="/sh").examined == 0  # a prefix is a folder
        whole = plan_sync(store, ["r0"], set())  # a manifest speaks for the collection
        assert whole.scope == "the collection" and len(whole.stale) == 9
