"""Odd rows and odd values: each bad row is reported with its line and reason while every good row lands.

Reliability II, item 6: a non-string path, a NUL byte in a path, a lone surrogate in an id
or in meta, meta nested thousands of levels deep. Before, each aborted the ingest, lost
the good rows of its batch, or answered 500 over HTTP.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli.main import cli
from milvus_store import CollectionSpec, HierStore, Record
from milvus_store.records import json_depth, validate_records
from milvus_store.spec import META_MAX_DEPTH

pytestmark = pytest.mark.lite


def nested(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def test_a_manifest_of_odd_rows_stores_every_good_row_and_names_each_bad_one(tmp_path, tiny_model):
    rng = np.random.default_rng(0)
    good = []
    for i in range(5):
        path = tmp_path / f"good-{i}.png"
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
        good.append(path)
    lines = [json.dumps({"path": good[0].name, "category": "clothing/tops/shirt"}),
             json.dumps({"path": 123, "category": "clothing/tops/shirt"}),
             json.dumps({"path": "bad\u0000name.png"}),
             json.dumps({"path": good[1].name, "id": "\ud800", "category": "clothing/tops/coat"}),
             json.dumps({"path": good[1].name, "meta": {"note": "\udfff"}, "category": "clothing/tops/coat"}),
             "[" * 5000 + "]" * 5000,
             '{"path": "%s", "meta": %s}' % (good[2].name, '{"a": ' * 5000 + "1" + "}" * 5000),
             json.dumps({"path": good[2].name, "meta": nested(META_MAX_DEPTH + 8)}),
             json.dumps({"path": good[3].name, "category": "footwear/boots/boot", "meta": nested(3)}),
             json.dumps({"path": good[1].name, "id": ["a", "list"]}),
             json.dumps({"path": good[4].name, "category": "footwear/boots/boot", "meta": {"n": 2**64}})]
    manifest = tmp_path / "odd.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = CliRunner().invoke(cli, ["ingest", str(manifest), "--model", str(tiny_model), "--uri",
                                      str(tmp_path / "h.db"), "--json", "--batch-size", "64"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    failed = {f["source"].rsplit(":", 1)[-1] if f["source"].startswith(str(manifest)) else f["source"]: f["reason"]
              for f in report["failures"]}
    expected_lines = {"2": "path must be a string, got int", "3": "holds a NUL byte", "6": "nested too deeply",
                      "7": "nested too deeply", "10": "id must be a string, got list"}
    for line, reason in expected_lines.items():
        assert reason in failed.get(line, ""), (line, failed)
    reasons = " | ".join(failed.values())
    assert "not valid UTF-8" in reasons or "not valid Unicode" in reasons  # the surrogate id
    assert "lone surrogate" in reasons  # the surrogate in meta
    assert f"nested more than {META_MAX_DEPTH} levels deep" in reasons
    assert "meta holds an integer 18446744073709551616 at meta[\"n\"]" in reasons  # failed alone, not its batch
    with HierStore(str(tmp_path / "h.db"), "images") as store:
        stored = {h.id for h in store.iterate()}
    assert stored == {hashlib.sha256(p.read_bytes()).hexdigest() for p in (good[0], good[3])}
    assert report["stored"] == 2 and report["count"] == 2


def test_the_store_refuses_odd_meta_per_record_and_keeps_the_rest():
    spec = CollectionSpec(("a", "b"), dim=4)
    vector = np.full(4, 0.5, np.float32)
    records = [Record("x/y", vector, id="ok", meta={"k": [1, {"v": "w"}]}),
               Record("x/y", vector, id="deep", meta=nested(META_MAX_DEPTH + 1)),
               Record("x/y", vector, id="surrogate", meta={"k": "\ud800"}),
               Record("x/y", vector, id="big", meta={"k": "x" * 70_000}),
               Record("x/y", vector, id="edge", meta=nested(META_MAX_DEPTH)),
               Record("x/y", vector, id="huge", meta={"sku": {"n": [1, 2**64]}}),
               Record("x/y", vector, id="enormous", meta={"n": 10**5000}),  # beyond Python's int-to-str limit
               Record("x/y", vector, id="int64", meta={"n": [2**63 - 1, -(2**63)], "b": True})]
    rows, problems = validate_records(records, spec)
    assert [r["id"] for r in rows] == ["ok", "edge", "int64"]
    assert [p for p, _ in problems] == [1, 2, 3, 5, 6]
    assert "nested more than 32 levels deep" in problems[0][1]
    assert "lone surrogate" in problems[1][1] and "at most 65536 are stored" in problems[2][1]
    assert problems[3][1] == ("record 'huge': meta holds an integer 18446744073709551616 at meta[\"sku\"][\"n\"][1], "
                              "beyond the 64-bit integers Milvus's JSON stores (store it as a string)")
    assert "meta holds an integer of 16610 bits at meta[\"n\"]" in problems[4][1]
    assert json_depth(nested(10_000)) == META_MAX_DEPTH + 1  # stops counting, never recurses


@pytest.mark.parametrize("batch_size", ["1", "64"])
def test_the_same_bytes_at_two_paths_store_the_first_and_report_the_second(tmp_path, tiny_model, batch_size):
    rng = np.random.default_rng(1)
    tree = tmp_path / "tree"
    image = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
    for leaf in ("clothing/tops/coat", "footwear/boots/boot"):  # listed in this order
        (tree / leaf).mkdir(parents=True)
        Image.fromarray(image).save(tree / leaf / "same.png")
    (tree / "clothing/tops/shirt").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(tree / "clothing/tops/shirt/other.png")
    db = tmp_path / f"h{batch_size}.db"
    result = CliRunner().invoke(cli, ["ingest", str(tree), "--model", str(tiny_model), "--uri", str(db), "--json",
                                      "--batch-size", batch_size])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["stored"], report["duplicates"], report["failed"], report["count"]) == (2, 1, 0, 2)
    [duplicate] = report["duplicate_items"]
    assert duplicate["source"].endswith("footwear/boots/boot/same.png")
    assert duplicate["same_as"].endswith("clothing/tops/coat/same.png")
    digest = hashlib.sha256((tree / "clothing/tops/coat/same.png").read_bytes()).hexdigest()
    with HierStore(str(db), "images") as store:
        [record] = store.get([digest])
    assert record.category == "clothing/tops/coat"
    text = CliRunner().invoke(cli, ["ingest", str(tree), "--model", str(tiny_model), "--uri", str(db)])
    assert "skipped 2 (already present), 1 duplicate(s) of an earlier file" in text.stdout
