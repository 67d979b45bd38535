"""The search features every face has (issue: one search path): fused levels, search by stored id,
the model the collection records, and library bugs that stay bugs. Through the CLI on Milvus Lite."""

import math
import shutil

import pytest
from click.testing import CliRunner

from cli.main import cli

from ..commands import run, run_json
from .conftest import sha256

pytestmark = pytest.mark.lite
LEVELS = ("department", "category", "item")


def hits_of(result, query=0):
    return result["queries"][query]["hits"]


@pytest.fixture(scope="module")
def ingested(workspace, tmp_path_factory):
    _, tree, model = workspace
    db = tmp_path_factory.mktemp("faces") / "h.db"
    run_json("ingest", tree, "--model", model, "--uri", db, "--index", "FLAT")
    return tree, model, db


def test_search_by_stored_id_leaves_the_query_out_and_uses_its_stored_vectors(ingested):
    tree, model, db = ingested
    query = tree / "clothing/tops/shirt/0.png"
    by_file = hits_of(run_json("search", query, "--model", model, "--uri", db, "-k", "6"))
    result = run_json("search", "--id", sha256(query), "--model", model, "--uri", db, "-k", "5")
    assert result["queries"][0]["id"] == sha256(query)
    assert [h["id"] for h in hits_of(result)] == [h["id"] for h in by_file if h["id"] != sha256(query)][:5]
    both = run_json("search", query, "--id", sha256(query), "--model", model, "--uri", db, "-k", "5")
    assert [q.get("image") or q["id"] for q in both["queries"]] == [str(query), sha256(query)]
    sheet = db.parent / "by-id.png"
    run("search", "--id", sha256(query), "--model", model, "--uri", db, "-k", "3", "--sheet", sheet)
    from PIL import Image

    with Image.open(sheet) as picture:  # one row: the stored query's own file, then 3 hits
        assert picture.size == (8 + 4 * (112 + 8), 8 + 112 + 30 + 8)
    missing = run("search", "--id", "no-such-id", "--model", model, "--uri", db, ok=False)
    assert missing.exit_code == 1 and "no image with id 'no-such-id'" in missing.stderr


def test_fused_searches_rank_as_the_per_level_searches_say(ingested):
    """RRF: each hit's score is the sum over levels of 1/(60 + its rank there) among each level's top
    2k; weighted: the sum of weight x (1 - 2/pi atan(L2 distance)). Checked against the CLI's own
    per-level searches, tie-tolerant (scores, not ids, are compared)."""
    tree, model, db = ingested
    query, k = tree / "footwear/boots/boot/2.png", 4
    per_level = {level: hits_of(run_json("search", query, "--model", model, "--uri", db, "--level", level,
                                         "-k", 2 * k)) for level in LEVELS}
    rrf, weighted = {}, {}
    weights = {"category": 1.0, "item": 3.0}
    for level, hits in per_level.items():
        for rank, hit in enumerate(hits, start=1):
            rrf[hit["id"]] = rrf.get(hit["id"], 0) + 1 / (60 + rank)
            if level in weights:
                weighted[hit["id"]] = weighted.get(hit["id"], 0) + weights[level] * (
                    1 - 2 / math.pi * math.atan(hit["distance"]))
    for args, expected in ((["--fuse", "rrf"], rrf), (["--level-weights", "category=1,item=3"], weighted),
                           (["--fuse", "weighted", "--level-weights", "category=1,item=3"], weighted)):
        result = run_json("search", query, "--model", model, "--uri", db, "-k", k, *args)
        hits = hits_of(result)
        assert len(hits) == k and result["request"]["fusion"] == ("rrf" if expected is rrf else "weighted")
        assert [h["distance"] for h in hits] == pytest.approx([expected[h["id"]] for h in hits], rel=1e-4)
        assert [h["distance"] for h in hits] == pytest.approx(sorted(expected.values(), reverse=True)[:k], rel=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--fuse", "rrf", "--level", "item"], "fusion searches every level's vector at once"),
    (["--fuse", "rrf", "--level-weights", "item=1"], "level_weights are for weighted fusion, not 'rrf'"),
    (["--level-weights", "colour=1"], "unknown level 'colour' for level_weights"),
    (["--level-weights", "item=-1"], "the weight of level 'item' must be a positive number"),
    (["--group-by", "size"], "unknown level 'size' for group_by"),
])
def test_bad_search_requests_are_one_line_errors(ingested, args, message):
    tree, model, db = ingested
    result = run("search", tree / "clothing/tops/shirt/0.png", "--model", model, "--uri", db, *args, ok=False)
    assert result.exit_code == 1 and result.stderr.startswith("Error: ") and message in result.stderr, result.stderr


def test_search_loads_the_model_the_collection_records(ingested, tmp_path):
    tree, model, db = ingested
    query = tree / "clothing/bottoms/trouser/1.png"
    told = run_json("search", query, "--model", model, "--uri", db, "-k", "3")
    recorded = run_json("search", query, "--uri", db, "-k", "3")
    assert recorded["queries"] == told["queries"]

    copy = tmp_path / "copy"  # a collection whose recorded model file is gone
    shutil.copytree(db, copy / "h.db")
    moved = tmp_path / "model.pt"
    run_json("ingest", tree, "--model", shutil.copy(model, moved), "--uri", copy / "h.db")
    moved.unlink()
    gone = run("search", query, "--uri", copy / "h.db", ok=False)
    assert gone.exit_code == 1 and f"was filled by the model at '{moved}', which is not on this machine;" \
        in gone.stderr and "$HIERVEC_MODEL_ROOT" in gone.stderr
    again = run_json("search", query, "--uri", copy / "h.db", "--model", model, "-k", "3")  # a copy of it works
    assert again["queries"] == told["queries"]


def test_a_model_under_the_model_root_is_found_under_another_machines_root(ingested, tmp_path, monkeypatch):
    from milvus_store import HierStore

    tree, model, db = ingested
    query = tree / "clothing/bottoms/trouser/1.png"
    told = run_json("search", query, "--model", model, "--uri", db, "-k", "3")
    here, there = tmp_path / "models-here", tmp_path / "models-there"
    (here / "fashion").mkdir(parents=True)
    copy = tmp_path / "h.db"
    shutil.copytree(db, copy)
    monkeypatch.setenv("HIERVEC_MODEL_ROOT", str(here))
    run_json("ingest", tree, "--model", shutil.copy(model, here / "fashion" / "v1.pt"), "--uri", copy)
    with HierStore(str(copy), create=False) as store:
        assert store.model_location == str(here / "fashion" / "v1.pt") and store.model_relative == "fashion/v1.pt"
    here.rename(there)  # the models now live under another folder (another machine's root)
    gone = run("search", query, "--uri", copy, ok=False)
    assert gone.exit_code == 1 and "nor at 'fashion/v1.pt' under $HIERVEC_MODEL_ROOT" in gone.stderr
    monkeypatch.setenv("HIERVEC_MODEL_ROOT", str(there))
    assert run_json("search", query, "--uri", copy, "-k", "3")["queries"] == told["queries"]


def test_a_collection_without_a_recorded_model_asks_for_one(workspace, tmp_path):
    from embedder import Embedder
    from hiervec_app import ImageIndex, IngestItem

    _, tree, model = workspace
    db = tmp_path / "lib.db"
    with ImageIndex.open(Embedder.from_checkpoint(model, device="cpu"), db) as index:  # told to record nothing
        report = index.ingest([IngestItem(tree / "clothing/tops/shirt/0.png", "clothing/tops/shirt")],
                              record_model=False)
        assert report.model_recorded is None and index.store.model_location is None
    result = run("search", tree / "clothing/tops/shirt/0.png", "--uri", db, ok=False)
    assert result.exit_code == 2 and "does not record the model that filled it" in result.stderr and "--model" in \
        result.stderr

    # an app's ingest records where the model lives, as every face's does: then searches find it
    with ImageIndex.open(Embedder.from_checkpoint(model, device="cpu"), db) as index:
        report = index.ingest([IngestItem(tree / "clothing/tops/coat/0.png", "clothing/tops/coat")])
        assert report.model_recorded == str(model.resolve()) == index.store.model_location
    found = hits_of(run_json("search", tree / "clothing/tops/shirt/0.png", "--uri", db, "-k", "2"))
    assert {hit["id"] for hit in found} == {sha256(tree / "clothing/tops/shirt/0.png"), *report.ids}


def test_a_bug_is_a_traceback_not_an_error_message(ingested, monkeypatch):
    """Only the library's own errors are the user's; a ValueError from deep inside is a bug."""
    from milvus_store import HierStore

    tree, model, db = ingested

    def broken(self, *args, **kwargs):
        raise ValueError("operands could not be broadcast together")  # what a numpy bug says

    monkeypatch.setattr(HierStore, "search", broken)
    result = CliRunner().invoke(cli, ["search", str(tree / "clothing/tops/shirt/0.png"), "--model", str(model),
                                      "--uri", str(db)])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)
    assert not result.stderr.startswith("Error:")


def test_long_phases_report_progress(ingested):
    """eval's searches (minutes on a real catalogue) advance a progress bar, as ingest does."""
    from hiervec_app.evaluation import evaluate_collection
    from milvus_store import HierStore

    _, _, db = ingested
    steps = []
    with HierStore(db, create=False) as store:
        ids = [hit.id for hit in store.iterate()]
        metrics = evaluate_collection(store, ids, k=3, batch=5, progress=steps.append)
    assert sum(steps) == len(ids) == metrics["queries"] and steps[:2] == [5, 5]


@pytest.mark.unit
def test_progress_bars_show_on_a_terminal_and_stay_silent_with_json(monkeypatch):
    import io
    import sys

    from cli.main import progress_bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for as_json in (False, True):
        err = Terminal()
        monkeypatch.setattr(sys, "stderr", err)
        with progress_bar(10, "search", as_json, rate="queries/s") as advance:
            advance(4)
            advance(6)
        assert ("search" in err.getvalue() and "10/10" in err.getvalue()) is not as_json, err.getvalue()


def test_every_runtime_finds_the_same_hits_in_one_collection(ingested):
    """The collection was filled by the default runtime (the fastest installed); searching it with
    each runtime gives the same neighbours at the same distances (vectors within 1e-4)."""
    from embedder import runtimes

    tree, model, db = ingested
    query = tree / "clothing/tops/coat/3.png"
    found = {}
    for runtime in runtimes.PREFERENCE:
        if runtimes.installed(runtime):
            found[runtime] = hits_of(run_json("search", query, "--model", model, "--uri", db, "-k", "6",
                                              "--runtime", runtime))
    reference = found.pop("torch")
    for runtime, hits in found.items():
        assert [h["id"] for h in hits] == [h["id"] for h in reference], runtime
        assert [h["distance"] for h in hits] == pytest.approx([h["distance"] for h in reference], abs=1e-4)


def test_a_server_that_cannot_record_the_model_still_gets_the_images(workspace, tmp_path, monkeypatch):
    from milvus_store import HierStore, StoreConnectionError

    _, tree, model = workspace

    def refuse(self, location, **kwargs):
        raise StoreConnectionError("alter_collection_properties: not supported by this server")

    monkeypatch.setattr(HierStore, "record_model", refuse)
    result = run("ingest", tree, "--model", model, "--uri", tmp_path / "h.db")
    assert "warning: the collection does not record its model" in result.stderr and "searches need --model" in \
        result.stderr
    with HierStore(tmp_path / "h.db", create=False) as store:
        assert store.count() == len(list(tree.rglob("*.png"))) and store.model_location is None
