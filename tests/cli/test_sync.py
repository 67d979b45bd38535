"""`hiervec ingest --sync`: what the source no longer lists goes, nothing else; `--dry-run` writes nothing;
a listing with errors removes nothing."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from ..commands import run, run_json
from .conftest import LEAVES, PER_LEAF, sha256

pytestmark = pytest.mark.lite


def test_sync_removes_what_left_the_folder_and_nothing_else(workspace, tmp_path):
    _, tree, model = workspace
    db, shop, other = tmp_path / "h.db", tmp_path / "shop", tmp_path / "other"
    shutil.copytree(tree, shop)
    (other / "footwear/boots/boot").mkdir(parents=True)
    for i in range(PER_LEAF):  # images of their own (the same bytes would be the same ids)
        Image.fromarray(np.full((40, 40, 3), 100 + i, np.uint8)).save(other / f"footwear/boots/boot/{i}.png")
    run_json("ingest", shop, "--model", model, "--uri", db)
    run_json("ingest", other, "--model", model, "--uri", db)
    total = len(LEAVES) * PER_LEAF + PER_LEAF

    gone = shop / "clothing/tops/shirt/0.png"
    changed = shop / "clothing/tops/coat/0.png"
    unreadable = shop / "footwear/boots/boot/1.png"
    old_coat, gone_id, unreadable_id = sha256(changed), sha256(gone), sha256(unreadable)
    gone.unlink()
    Image.fromarray(np.full((40, 40, 3), 7, np.uint8)).save(changed)  # new bytes, same file
    unreadable.unlink()
    unreadable.symlink_to(tmp_path / "nowhere.png")  # listed as a failure: what is stored of it stays

    dry = run_json("ingest", shop, "--model", model, "--uri", db, "--sync", "--dry-run")["sync"]
    assert dry["dry_run"] and dry["removed"] == 0 and dry["stale"] == 2
    assert dry["examined"] == len(LEAVES) * PER_LEAF and dry["scope"] == str(shop.resolve()) + "/"
    assert sorted(dry["stale_uris"]) == sorted([str(changed.resolve()), str(gone.resolve())])
    assert run_json("info", "--uri", db)["count"] == total  # the dry run wrote nothing

    text = run("ingest", shop, "--model", model, "--uri", db, "--sync").stderr
    assert "sync: removed 2 of 25 images in" in text and "that the source no longer lists" in text
    report = run_json("info", "--uri", db)
    assert report["count"] == total - 2 + 1  # the changed coat is stored anew
    run_json("search", "--id", unreadable_id, "--uri", db, "--model", model, "-k", "1")  # kept: not listable now
    for removed in (gone_id, old_coat):
        refused = run("search", "--id", removed, "--uri", db, "--model", model, "-k", "1", ok=False)
        assert refused.exit_code == 1 and f"no image with id {removed!r}" in refused.stderr
    assert run_json("info", "--uri", db)["categories"]["department"]["footwear"] == 2 * PER_LEAF  # other/ untouched

    again = run_json("ingest", shop, "--model", model, "--uri", db, "--sync")
    assert again["sync"]["removed"] == 0 and again["stored"] == 0


def test_a_listing_with_errors_removes_nothing(workspace, tmp_path):
    _, tree, model = workspace
    db = tmp_path / "h.db"
    run_json("ingest", tree, "--model", model, "--uri", db)
    manifest = tmp_path / "m.jsonl"
    first = tree / "clothing/tops/shirt/0.png"
    manifest.write_text(json.dumps({"path": str(first), "category": "clothing/tops/shirt"}) + "\n"
                        + json.dumps({"category": "clothing/tops/shirt"}) + "\n")
    result = run_json("ingest", manifest, "--model", model, "--uri", db, "--sync")
    assert result["sync"]["removed"] == 0 and "had 1 error(s)" in result["sync"]["refused"]
    assert result["count"] == len(LEAVES) * PER_LEAF
    dry = run("ingest", manifest, "--model", model, "--uri", db, "--sync", "--dry-run").stdout
    assert dry.startswith("sync: the listing of") and "nothing was removed" in dry
    usage = run("ingest", manifest, "--model", model, "--uri", db, "--dry-run", ok=False)
    assert usage.exit_code == 2 and "--dry-run goes with --sync" in usage.stderr

    whole = tmp_path / "whole.jsonl"  # a manifest speaks for the whole collection
    whole.write_text(json.dumps({"path": str(first), "category": "clothing/tops/shirt"}) + "\n")
    synced = run_json("ingest", whole, "--model", model, "--uri", db, "--sync")
    assert synced["sync"]["scope"] == "the collection" and synced["sync"]["removed"] == len(LEAVES) * PER_LEAF - 1
    assert synced["count"] == 1
