"""`hiervec move`: a subtree renamed in place, searches and filters follow, refusals are one line."""

import pytest

from ..commands import run, run_json
from .conftest import LEAVES, PER_LEAF

pytestmark = pytest.mark.lite


def test_move_renames_a_subtree_and_filters_follow(workspace, tmp_path):
    _, tree, model = workspace
    db = tmp_path / "h.db"
    total = len(LEAVES) * PER_LEAF
    run_json("ingest", tree, "--model", model, "--uri", db)
    report = run_json("move", "--from", "clothing/tops", "--to", "clothing/upper-body", "--uri", db)
    assert report == {"source": "clothing/tops", "target": "clothing/upper-body", "level": "category",
                      "moved": 2 * PER_LEAF, "already_there": 0, "resumed": False, "count": total}
    info = run_json("info", "--uri", db)
    assert info["categories"]["category"] == {"clothing/bottoms": PER_LEAF, "clothing/upper-body": 2 * PER_LEAF,
                                              "footwear/boots": PER_LEAF}
    assert info["categories"]["item"]["clothing/upper-body/shirt"] == PER_LEAF
    query = tree / "clothing/tops/shirt/0.png"
    hits = run_json("search", query, "--model", model, "--uri", db, "-k", "50", "--under", "clothing/upper-body")
    assert len(hits["queries"][0]["hits"]) == 2 * PER_LEAF
    assert {h["category"] for h in hits["queries"][0]["hits"]} == {"clothing/upper-body/shirt",
                                                                   "clothing/upper-body/coat"}

    refused = run("move", "--from", "clothing/upper-body", "--to", "clothing/bottoms", "--uri", db, ok=False)
    assert refused.exit_code == 1 and "already holds 6 images: pass --merge to put" in refused.stderr
    refused = run("move", "--from", "clothing", "--to", "clothing/x", "--uri", db, ok=False)
    assert refused.exit_code == 1 and "keeps the number of levels" in refused.stderr
    merged = run("move", "--from", "clothing/upper-body", "--to", "clothing/bottoms", "--merge", "--uri", db).stdout
    assert merged.strip() == ("moved 12 images from 'clothing/upper-body' to 'clothing/bottoms' (level 'category'; "
                              "merged with 6 already there); 24 in the collection")
    assert run_json("info", "--uri", db)["categories"]["category"] == {"clothing/bottoms": 3 * PER_LEAF,
                                                                       "footwear/boots": PER_LEAF}
