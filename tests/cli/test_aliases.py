"""`hiervec alias`: every command takes an alias where it takes a collection, and follows it when it moves."""

import shutil

import pytest

from ..commands import run, run_json
from .conftest import LEAVES, PER_LEAF, sha256

pytestmark = pytest.mark.lite


def test_alias_set_show_list_and_every_command_through_the_alias(workspace, tmp_path):
    _, tree, model = workspace
    db = tmp_path / "h.db"
    total = len(LEAVES) * PER_LEAF
    run_json("ingest", tree, "--model", model, "--uri", db, "--collection", "shop_v1")
    footwear = tmp_path / "footwear-only"
    shutil.copytree(tree / "footwear", footwear / "footwear")
    run_json("ingest", footwear, "--model", model, "--uri", db, "--collection", "shop_v2")

    assert run_json("alias", "set", "shop", "shop_v1", "--uri", db) == {
        "alias": "shop", "collection": "shop_v1", "previous": None}
    assert run_json("alias", "list", "--uri", db) == {"shop": "shop_v1"}
    shown = run_json("alias", "show", "shop", "--uri", db)
    assert (shown["collection"], shown["count"], len(shown["fingerprint"])) == ("shop_v1", total, 16)
    info = run_json("info", "--uri", db, "--collection", "shop")
    assert (info["collection"], info["alias"], info["aliases"], info["count"]) == ("shop_v1", "shop", ["shop"], total)
    assert run_json("info", "--uri", db, "--collection", "shop_v2")["aliases"] == []

    query = tree / "clothing/tops/shirt/0.png"
    hits = run_json("search", query, "--model", model, "--uri", db, "--collection", "shop", "-k", "1")
    assert hits["queries"][0]["hits"][0]["id"] == sha256(query)

    moved = run("alias", "set", "shop", "shop_v2", "--uri", db).stdout
    assert "alias 'shop' -> 'shop_v2' (was 'shop_v1'; kept)" in moved
    hits = run_json("search", query, "--model", model, "--uri", db, "--collection", "shop", "-k", "50")
    assert {h["category"] for h in hits["queries"][0]["hits"]} == {"footwear/boots/boot"}  # the new collection's
    coats = tmp_path / "coats"
    shutil.copytree(tree / "clothing/tops/coat", coats / "clothing/tops/coat")
    again = run_json("ingest", coats, "--model", model, "--uri", db, "--collection", "shop")
    assert again["stored"] == PER_LEAF and again["count"] == 2 * PER_LEAF
    assert run_json("delete", "--uri", db, "--collection", "shop", "--under", "clothing") == {
        "deleted": PER_LEAF, "count": PER_LEAF}
    assert run_json("info", "--uri", db, "--collection", "shop_v1")["count"] == total  # kept as it was

    assert run_json("alias", "set", "shop", "shop_v1", "--uri", db)["previous"] == "shop_v2"  # rollback
    assert run_json("info", "--uri", db, "--collection", "shop")["collection"] == "shop_v1"
    assert run_json("alias", "remove", "shop", "--uri", db) == {"alias": "shop", "collection": "shop_v1"}
    assert run_json("alias", "list", "--uri", db) == {}


def test_alias_refusals_are_one_line_errors(workspace, tmp_path):
    _, tree, model = workspace
    db = tmp_path / "h.db"
    run_json("ingest", tree / "footwear", "--model", model, "--uri", db, "--collection", "shop_v1")
    refused = run("alias", "set", "shop_v1", "shop_v1", "--uri", db, ok=False)
    assert refused.exit_code == 1 and "'shop_v1' is a collection" in refused.stderr
    refused = run("alias", "set", "shop", "nothing_here", "--uri", db, ok=False)
    assert refused.exit_code == 1 and "collection 'nothing_here' does not exist" in refused.stderr
    refused = run("alias", "show", "shop", "--uri", db, ok=False)
    assert refused.exit_code == 1 and "no alias 'shop'" in refused.stderr
    assert run_json("alias", "list", "--uri", db) == {}
