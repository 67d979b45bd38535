"""`hiervec eval` leaves the user's data alone: a temporary Lite file by default, a collection of its
own (dropped afterwards unless --keep) in a store it is given, an existing collection only read;
its JSON keys are the same whatever -k, and MAP@R says why when it cannot be computed."""

import shutil

import pytest
from pymilvus import MilvusClient

from ..commands import run, run_json
from .conftest import LEAVES, PER_LEAF

pytestmark = pytest.mark.lite
KEYS = {"queries", "left_out", "collection", "k", "recall@k", "map@r", "map@r_reason", "consistency@k",
        "hier_distance@k", "seconds"}


def collections(db) -> list[str]:
    client = MilvusClient(str(db))
    try:
        return sorted(client.list_collections())
    finally:
        client.close()


@pytest.fixture(scope="module")
def catalogue_db(workspace, tmp_path_factory):
    """A user's Lite file with the tree ingested as "images"."""
    _, tree, model = workspace
    db = tmp_path_factory.mktemp("eval") / "catalogue.db"
    run_json("ingest", tree, "--model", model, "--uri", db)
    return db


def test_eval_in_a_users_file_leaves_its_collections_as_they_were(workspace, catalogue_db, tmp_path, monkeypatch):
    _, tree, model = workspace
    db = tmp_path / "mine.db"
    shutil.copytree(catalogue_db, db)
    before = collections(db)
    for k in ("1", "5"):
        metrics = run_json("eval", tree, "--model", model, "--uri", db, "-k", k)
        assert set(metrics) == KEYS and metrics["queries"] == len(LEAVES) * PER_LEAF
        assert [entry["k"] for entry in metrics["recall@k"]] == sorted({1, int(k)})
    assert collections(db) == before == ["images"]
    monkeypatch.setenv("HIERVEC_MILVUS_URI", str(db))  # the same variable as every other command
    assert set(run_json("eval", tree, "--model", model)) == KEYS
    assert collections(db) == before

    kept = run_json("eval", tree, "--model", model, "--collection", "evaluated", "--keep")
    assert kept["kept"] == "evaluated" and collections(db) == ["evaluated", "images"]
    # an existing collection is read, not written: the same figures, nothing added
    again = run_json("eval", tree, "--model", model, "--collection", "images")
    assert again["recall@k"] == kept["recall@k"] and again["consistency@k"] == kept["consistency@k"]
    assert collections(db) == ["evaluated", "images"]
    info = run_json("info", "--collection", "images")
    assert info["count"] == len(LEAVES) * PER_LEAF and info["model"]["path"] == str(model.resolve())
    assert info["model"]["found"] == str(model.resolve())


def test_eval_refuses_to_add_to_an_existing_collection_and_keep_needs_a_store(workspace, tmp_path):
    root, tree, model = workspace
    db = tmp_path / "part.db"
    part = tmp_path / "part"
    shutil.copytree(tree / "clothing", part / "clothing")
    run_json("ingest", part, "--model", model, "--uri", db)
    result = run("eval", tree, "--model", model, "--uri", db, "--collection", "images", ok=False)
    assert result.exit_code == 1 and f"lacks {PER_LEAF} of SOURCE's {len(LEAVES) * PER_LEAF} images" in result.stderr
    assert run_json("info", "--uri", db)["count"] == 3 * PER_LEAF
    keep = run("eval", tree, "--model", model, "--keep", ok=False)
    assert keep.exit_code == 2 and "--keep keeps the collection in the Milvus of --uri" in keep.stderr


def test_map_at_r_is_null_with_a_reason_and_singletons_are_left_out(workspace, tmp_path, monkeypatch):
    import hiervec_app.evaluation

    _, tree, model = workspace
    lonely = tmp_path / "tree"
    shutil.copytree(tree, lonely)
    (lonely / "footwear/sandals/sandal").mkdir(parents=True)
    shutil.copy(tree / "footwear/boots/boot/0.png", lonely / "footwear/sandals/sandal/0.png")
    (lonely / "footwear/sandals/sandal/0.png").write_bytes(  # other bytes: another id
        (tree / "footwear/boots/boot/0.png").read_bytes() + b"\0")
    monkeypatch.setattr(hiervec_app.evaluation, "MAX_TOPK", PER_LEAF - 1)  # a category's R+1 = 6 hits no longer fits
    metrics = run_json("eval", lonely, "--model", model, "-k", "3")
    assert metrics["left_out"] == 1 and metrics["queries"] == len(LEAVES) * PER_LEAF
    assert metrics["collection"] == len(LEAVES) * PER_LEAF + 1
    assert metrics["map@r"] is None and metrics["map@r_reason"] == (
        f"a category has {PER_LEAF} images: MAP@R needs the top R+1 = {PER_LEAF} hits, Milvus returns at most "
        f"{PER_LEAF - 1}")
    text = run("eval", lonely, "--model", model, "-k", "3").stdout
    assert "map@r                            - (a category has" in text and "left out" in text
