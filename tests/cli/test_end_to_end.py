"""The CLI end to end on Milvus Lite and a tiny generated folder tree."""

import json

import numpy as np
import pytest
from PIL import Image

from embedder import load_checkpoint

from ..commands import run, run_json
from .conftest import LEAVES, PER_LEAF, sha256

pytestmark = pytest.mark.lite

def all_images(tree):
    return sorted(tree.rglob("*.png"))


def test_ingest_search_eval_info_delete(workspace, tmp_path):
    _, tree, model = workspace
    db = tmp_path / "h.db"
    first = run_json("ingest", tree, "--model", model, "--uri", db)
    total = len(LEAVES) * PER_LEAF
    assert (first["seen"], first["stored"], first["skipped_present"], first["failed"]) == (total, total, 0, 0)
    again = run_json("ingest", tree, "--model", model, "--uri", db)
    assert (again["stored"], again["skipped_present"], again["count"]) == (0, total, total)

    query = tree / "clothing/tops/shirt/0.png"
    result = run_json("search", query, "--model", model, "--uri", db, "-k", "5")
    hits = result["queries"][0]["hits"]
    assert hits[0]["id"] == sha256(query) and hits[0]["distance"] < 1e-5 and hits[0]["uri"] == str(query.resolve())
    assert len(hits) == 5 and all(set(h) == {"id", "distance", "uri", "category", "categories", "meta", "predicted", "confidence"}
                               for h in hits)

    hits = run_json("search", query, "--model", model, "--uri", db, "-k", "10", "--where", "department=footwear")
    assert {h["category"] for h in hits["queries"][0]["hits"]} == {"footwear/boots/boot"}
    hits = run_json("search", query, "--model", model, "--uri", db, "-k", "20", "--under", "clothing/tops",
                    "--where", "item=coat")["queries"][0]["hits"]
    assert len(hits) == PER_LEAF and {h["category"] for h in hits} == {"clothing/tops/coat"}
    hits = run_json("search", query, "--model", model, "--uri", db, "-k", "3", "--group-by", "item",
                    "--group-size", "2")["queries"][0]["hits"]
    per_item = {}
    for h in hits:
        per_item[h["category"]] = per_item.get(h["category"], 0) + 1
    assert len(per_item) == 3 and max(per_item.values()) <= 2

    level_hits = run_json("search", query, "--model", model, "--uri", db, "-k", "3", "--level", "department")
    assert level_hits["queries"][0]["hits"][0]["categories"]["department"] == "clothing"

    table = run("search", query, "--model", model, "--uri", db, "-k", "2").stdout
    assert table.startswith(f"query: {query}\n") and "clothing/tops/shirt" in table

    sheet = tmp_path / "sheet.png"
    run("search", query, tree / "footwear/boots/boot/1.png", "--model", model, "--uri", db, "-k", "4", "--sheet", sheet)
    with Image.open(sheet) as image:
        assert image.size == (8 + 5 * (112 + 8), 8 + 2 * (112 + 30 + 8))

    metrics = run_json("eval", tree, "--model", model, "-k", "5")
    assert metrics["queries"] == total and metrics["left_out"] == 0 and [r["k"] for r in metrics["recall@k"]] == [1, 5]
    assert all(0 <= r["recall"] <= 1 for r in metrics["recall@k"]) and 0 <= metrics["map@r"] <= 1
    assert set(metrics["consistency@k"]) == {"department", "category", "item"} and metrics["hier_distance@k"] >= 0

    info = run_json("info", "--uri", db)
    assert info["count"] == total and info["levels"] == ["department", "category", "item"]
    assert info["categories"]["department"] == {"clothing": 18, "footwear": 6}
    assert len(info["fingerprint"]) == 16 and info["index"] == "HNSW" and info["level_dims"] == [8, 8, 8]

    deleted = run_json("delete", "--uri", db, "--where", "category=bottoms")
    assert deleted == {"deleted": PER_LEAF, "count": total - PER_LEAF}
    deleted = run_json("delete", sha256(query), "--uri", db)
    assert deleted == {"deleted": 1, "count": total - PER_LEAF - 1}


def test_errors_are_one_line_and_write_nothing(workspace, tmp_path):
    root, tree, model = workspace
    db = tmp_path / "h.db"
    run("ingest", tree, "--model", model, "--uri", db)
    query = tree / "clothing/tops/shirt/0.png"
    result = run("search", query, "--model", model, "--uri", db, "--where", "item=hat", ok=False)
    assert result.exit_code == 1 and result.stderr.startswith("Error: unknown category 'hat' at level 'item'")
    result = run("search", query, "--model", model, "--uri", db, "--collection", "other", ok=False)
    assert result.exit_code == 1 and "does not exist" in result.stderr and "run `hiervec ingest` first" in result.stderr
    not_image = tmp_path / "fake.png"
    not_image.write_text("hello")
    result = run("search", not_image, "--model", model, "--uri", db, ok=False)
    assert result.exit_code == 1 and result.stderr == f"Error: {not_image}: not a recognised image format\n"

    other = root / "other.pt"
    run("train", tree, "--out", other, "--levels", "department,category,item", "--backbone", "resnet18",
        "--weights", "none", "--epochs", "1", "--steps-per-epoch", "1", "--image-size", "32", "--dim", "8",
        "--seed", "7", "--leaf-softmax", "0.5", "--json")
    assert load_checkpoint(other).train_state["loss_weights"]["softmax"] == {
        "department": 0.05, "category": 0.05, "item": 0.5}
    result = run("ingest", tree, "--model", other, "--uri", db, ok=False)
    assert result.exit_code == 1 and "model fingerprint" in result.stderr
    assert run_json("info", "--uri", db)["count"] == len(LEAVES) * PER_LEAF


def test_broken_files_are_reported_and_strict_fails(workspace, tmp_path):
    _, tree, model = workspace
    source = tmp_path / "source"
    (source / "clothing/tops/shirt").mkdir(parents=True)
    good = source / "clothing/tops/shirt/good.png"
    good.write_bytes((tree / "clothing/tops/shirt/1.png").read_bytes())
    (source / "clothing/tops/shirt/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (source / "clothing/tops/shirt/notes.txt").write_text("not an image")
    report = tmp_path / "report.json"
    db = tmp_path / "h.db"
    result = run("ingest", source, "--model", model, "--uri", db, "--report", report, "--json")
    data = json.loads(result.stdout)
    assert (data["stored"], data["failed"], data["seen"]) == (1, 2, 3)
    reasons = {r["source"].rsplit("/", 1)[-1]: r["reason"] for r in json.loads(report.read_text())["failures"]}
    assert set(reasons) == {"broken.png", "notes.txt"}
    assert "not an image file extension" in reasons["notes.txt"]
    strict = run("ingest", source, "--model", model, "--uri", db, "--strict", ok=False)
    assert strict.exit_code == 1
    assert "skipped 1 (already present), failed 2" in strict.stdout


def test_interrupted_ingest_resumes_with_every_image_once(workspace, tmp_path):
    from embedder import Embedder
    from hiervec_app import ImageIndex, IngestItem

    _, tree, model = workspace
    db = tmp_path / "h.db"
    paths = all_images(tree)
    items = [IngestItem(p, "/".join(p.relative_to(tree).parts[:-1]), uri=str(p.resolve())) for p in paths]

    def interrupt(done):
        raise KeyboardInterrupt  # the user presses Ctrl-C after the first batch landed

    with ImageIndex.open(Embedder.from_checkpoint(model), str(db), "images") as index:
        with pytest.raises(KeyboardInterrupt):
            index.ingest(items, batch_size=5, progress=interrupt)
        assert index.store.count() == 5
    resumed = run_json("ingest", tree, "--model", model, "--uri", db, "--batch-size", "5")
    assert (resumed["stored"], resumed["skipped_present"], resumed["count"]) == (len(paths) - 5, 5, len(paths))
    info = run_json("info", "--uri", db)
    assert info["count"] == len(paths)
    from milvus_store import HierStore

    with HierStore(str(db), "images") as store:
        assert {h.id for h in store.iterate()} == {sha256(p) for p in paths}


def test_ingest_with_one_decode_worker_completes(workspace, tmp_path):
    from embedder import Embedder
    from hiervec_app import ImageIndex, IngestItem

    _, tree, model = workspace
    paths = all_images(tree)
    items = [IngestItem(p, "/".join(p.relative_to(tree).parts[:-1])) for p in paths]
    with ImageIndex.open(Embedder.from_checkpoint(model), str(tmp_path / "h.db"), "images") as index:
        for workers in (1, 2):
            report = index.ingest(items, batch_size=3, workers=workers, skip_existing=False)
            assert (report.stored, report.failed) == (len(paths), [])
            assert report.ids == [sha256(p) for p in paths]
        again = index.ingest(items, batch_size=4)
        assert (again.stored, again.skipped_present, again.ids) == (0, len(paths), report.ids)
        assert index.store.count() == len(paths)


def test_optimized_ingest_stores_the_vectors_of_the_eager_model(workspace, tmp_path):
    from embedder import Embedder
    from milvus_store import HierStore

    _, tree, model = workspace
    db = tmp_path / "fast.db"
    summary = run_json("ingest", tree, "--model", model, "--uri", db, "--optimize")
    assert summary["stored"] == len(LEAVES) * PER_LEAF
    paths = all_images(tree)
    expected = Embedder.from_checkpoint(model).embed(paths).concat
    with HierStore(str(db), "images") as store:
        stored = store.embeddings([sha256(p) for p in paths])
    assert np.allclose(stored.concat, expected, atol=1e-4)


def test_device_and_mixed_precision_through_ingest_search_and_eval(workspace, tmp_path):
    from embedder import Embedder
    from milvus_store import HierStore

    _, tree, model = workspace
    db = tmp_path / "amp.db"
    summary = run_json("ingest", tree, "--model", model, "--uri", db, "--device", "cpu", "--amp")
    assert summary["stored"] == len(LEAVES) * PER_LEAF
    paths = all_images(tree)
    exact = Embedder.from_checkpoint(model, device="cpu").embed(paths).concat
    with HierStore(str(db), "images") as store:
        stored = store.embeddings([sha256(p) for p in paths]).concat
    assert stored.dtype == np.float32 and np.allclose(np.linalg.norm(stored, axis=1), 1, atol=1e-5)
    assert np.abs(stored - exact).max() < 0.05  # bfloat16 inside, float32 stored
    found = run_json("search", paths[0], "--model", model, "--uri", db, "-k", "3", "--device", "cpu")
    assert found["queries"][0]["hits"][0]["id"] == sha256(paths[0])
    metrics = run_json("eval", tree, "--model", model, "--device", "cpu", "--amp")
    assert metrics["recall@k"][0]["recall"] > 0


def test_search_filters_know_categories_the_collection_holds_and_the_model_does_not(workspace, tmp_path):
    _, tree, model = workspace
    db = tmp_path / "new.db"
    image = all_images(tree)[0]
    manifest = tmp_path / "new.csv"
    manifest.write_text(f"path,category\n{image},clothing/tops/hoodie\n")
    assert run_json("ingest", manifest, "--model", model, "--uri", db)["stored"] == 1
    run_json("ingest", tree, "--model", model, "--uri", db)
    for value in ("item=clothing/tops/hoodie", "item=hoodie"):
        hits = run_json("search", image, "--model", model, "--uri", db, "--where", value)["queries"][0]["hits"]
        assert [h["category"] for h in hits] == ["clothing/tops/hoodie"]
    result = run("search", image, "--model", model, "--uri", db, "--where", "item=cardigan", ok=False)
    assert result.exit_code == 1 and result.stderr.startswith("Error: unknown category 'cardigan' at level 'item'")


def test_a_grouped_search_beyond_milvus_limit_is_refused_not_attempted(workspace, tmp_path):
    _, tree, model = workspace
    db = tmp_path / "g.db"
    run_json("ingest", tree, "--model", model, "--uri", db)
    result = run("search", all_images(tree)[0], "--model", model, "--uri", db, "-k", "16384", "--group-by", "item",
                 "--group-size", "16384", ok=False)
    assert result.exit_code == 1
    assert result.stderr == "Error: k x group_size must be at most 16384 hits, got 16384 x 16384 = 268435456\n"
