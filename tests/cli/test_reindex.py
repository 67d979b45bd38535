"""`hiervec reindex`: every image embedded again by a new model into a new collection, ids, given categories
and meta kept; resumable; `--switch` moves the alias only when the new collection is complete."""

import json
import shutil

import numpy as np
import pytest

from milvus_store import HierStore

from ..commands import run, run_json
from .conftest import LEAVES, PER_LEAF

pytestmark = pytest.mark.lite


def _rows(db, collection):
    with HierStore(str(db), collection, create=False) as store:
        hits = {h.id: h for h in store.iterate(None, output=["uri", "meta", *store.spec.level_names])}
        vectors = store.embeddings(sorted(hits)).concat
    return hits, dict(zip(sorted(hits), vectors))


def test_reindex_into_a_new_collection_then_switch_the_alias(workspace, tmp_path, tiny_model):
    _, tree, model = workspace
    db = tmp_path / "h.db"
    shop = tmp_path / "shop"
    shutil.copytree(tree, shop)
    total = len(LEAVES) * PER_LEAF
    run_json("ingest", shop, "--model", model, "--uri", db, "--collection", "shop_v1")
    run_json("ingest", shop, "--model", tiny_model, "--uri", db, "--collection", "reference")  # the new model, directly
    run_json("alias", "set", "shop", "shop_v1", "--uri", db)

    # a first pass with a third of the files away: incomplete, so the alias stays
    away = tmp_path / "away"
    shutil.move(shop / "clothing/tops", away)
    partial = run("reindex", "--model", tiny_model, "--collection", "shop", "--to", "shop_v2", "--uri", db,
                  "--switch", "--json", ok=False)
    assert partial.exit_code == 1
    first = json.loads(partial.stdout)
    assert (first["stored"], first["failed"], first["complete"], first["switched"]) == (
        total - 2 * PER_LEAF, 2 * PER_LEAF, False, None)
    assert {f["stage"] for f in first["failures"]} == {"read"}
    assert run_json("alias", "show", "shop", "--uri", db)["collection"] == "shop_v1"

    shutil.move(away, shop / "clothing/tops")
    done = run_json("reindex", "--model", tiny_model, "--collection", "shop", "--to", "shop_v2", "--uri", db,
                    "--switch")
    assert (done["stored"], done["skipped_present"], done["failed"]) == (2 * PER_LEAF, total - 2 * PER_LEAF, 0)
    assert (done["from"], done["to"], done["count"], done["source_count"], done["complete"]) == (
        "shop_v1", "shop_v2", total, total, True)
    assert done["switched"] == {"alias": "shop", "collection": "shop_v2", "previous": "shop_v1"}
    shown = run_json("alias", "show", "shop", "--uri", db)
    assert shown["collection"] == "shop_v2" and shown["model"] == str(tiny_model.resolve())

    old, _ = _rows(db, "shop_v1")
    new, new_vectors = _rows(db, "shop_v2")
    reference, reference_vectors = _rows(db, "reference")
    assert new.keys() == old.keys() == reference.keys()  # ids kept
    for rid, hit in new.items():
        assert (hit.uri, hit.categories, hit.meta) == (old[rid].uri, old[rid].categories, old[rid].meta)
        np.testing.assert_allclose(new_vectors[rid], reference_vectors[rid], atol=1e-5)  # the new model's vectors
    assert run_json("info", "--uri", db, "--collection", "shop_v1")["count"] == total  # kept for a rollback


def test_reindex_reads_moved_files_from_source_and_refuses_what_cannot_work(workspace, tmp_path, tiny_model):
    _, tree, model = workspace
    db = tmp_path / "h.db"
    old_place, new_place = tmp_path / "old", tmp_path / "new"
    shutil.copytree(tree, old_place)
    run_json("ingest", old_place, "--model", model, "--uri", db)
    shutil.move(old_place, new_place)
    done = run_json("reindex", "--model", tiny_model, "--to", "v2", "--uri", db, "--source", new_place)
    assert done["stored"] == len(LEAVES) * PER_LEAF and done["complete"]
    hits, _ = _rows(db, "v2")
    assert all(h.uri.startswith(str(new_place.resolve()) + "/") for h in hits.values())  # where they are now

    same = run("reindex", "--model", tiny_model, "--to", "images", "--uri", db, ok=False)
    assert same.exit_code == 2 and "is the collection being reindexed" in same.stderr
    no_alias = run("reindex", "--model", tiny_model, "--to", "v3", "--uri", db, "--switch", ok=False)
    assert no_alias.exit_code == 2 and "--switch moves an alias" in no_alias.stderr
