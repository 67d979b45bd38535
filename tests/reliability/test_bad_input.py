"""Broken and unusual files: each is embedded correctly or skipped with its reason, and every valid file lands."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import pytest

from embedder import ImageDecodeError, decode_image
from milvus_store import HierStore, printable, uri_path

from ..commands import HIERVEC, run
from ..conftest import LEAVES
from .corpus import build_manifest, build_tree


def as_unprivileged_root() -> list[str]:
    """Root reads files whatever their mode; without these capabilities it obeys them like anyone."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("running as root without util-linux's setpriv: cannot make a file unreadable")
    return [setpriv, "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]


def name(source: str) -> str:
    return printable(source).rsplit("/", 1)[-1]


@pytest.mark.unit
def test_each_file_decodes_right_or_names_its_reason(tmp_path):
    for case in build_tree(tmp_path / "tree"):
        if case.stored:
            image = decode_image(case.path)
            assert image.mode == "RGB", case.what
            assert case.check is None or case.check(image), case.what
        elif case.what not in ("a file without read permission", "an image in a folder whose name is not UTF-8"):
            with pytest.raises(ImageDecodeError) as error:
                decode_image(case.path)
            assert error.value.source == str(case.path)


@pytest.mark.lite
def test_ingest_stores_every_valid_file_once_and_reports_the_rest(tmp_path, tiny_model):
    cases = build_tree(tmp_path / "tree")
    manifest, rows = build_manifest(tmp_path / "listed")
    db, report = tmp_path / "bad.db", tmp_path / "report.json"
    command = [*as_unprivileged_root(), *HIERVEC, "ingest", "--model", str(tiny_model), "--uri", str(db), "--json"]
    first = subprocess.run([*command[:-1], str(tmp_path / "tree"), "--report", str(report), "--json"],
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    written = json.loads(report.read_text())
    assert result == {key: value for key, value in written.items() if key != "items"}
    # the --report file also holds every listed item's outcome, in listing order
    statuses = [item["status"] for item in written["items"]]
    assert statuses.count("stored") == result["stored"] and len(statuses) == result["seen"] - sum(
        1 for f in result["failures"] if f["stage"] == "listing")
    assert {item["source"] for item in written["items"] if item["status"] == "failed"} <= {
        f["source"] for f in result["failures"]}
    stored = [c for c in cases if c.stored]
    skipped = [c for c in cases if not c.stored]
    assert (result["stored"], result["failed"], result["count"]) == (len(stored), len(skipped), len(stored))
    reasons = {name(f["source"]): f["reason"] for f in result["failures"]}
    assert set(reasons) == {printable(c.path.name) for c in skipped}
    for case in skipped:
        assert case.reason in reasons[printable(case.path.name)], (case.what, reasons[printable(case.path.name)])

    # in this process (no file of the manifest is unreadable: root's reading it changes nothing)
    listed = json.loads(run("ingest", "--model", tiny_model, "--uri", db, manifest, "--json").stdout)
    assert (listed["stored"], listed["predicted"], listed["failed"]) == (3, 1, 4)
    by_line = sorted((f["source"].split(" ")[0].rsplit(":", 1)[-1], f["reason"]) for f in listed["failures"])
    assert [line for line, _ in by_line] == ["3", "5", "6", "7"]
    for (_, reason), case in zip(by_line, [r for r in rows if not r.stored]):
        assert case.reason in reason, (case.what, reason)

    again = subprocess.run([*command[:-1], str(tmp_path / "tree"), "--json"], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    again = json.loads(again.stdout)
    assert (again["stored"], again["skipped_present"]) == (0, len(stored))

    with HierStore(str(db), "images") as store:
        expected = {hashlib.sha256(c.path.read_bytes()).hexdigest() for c in stored} | {"sku-0", "sku-2", "sku-5"}
        assert {hit.id for hit in store.iterate()} == expected and store.count() == len(expected)
        odd = next(c for c in stored if "not UTF-8" in c.what)
        [record] = store.get([hashlib.sha256(odd.path.read_bytes()).hexdigest()])
        assert record.uri.startswith("file://") and uri_path(record.uri) == str(odd.path)
        assert {h.id: h.categories["item"] for h in store.get(["sku-0", "sku-5"])} == {
            "sku-0": "clothing/tops/shirt", "sku-5": "clothing/bottoms/trouser"}
        [guessed] = store.get(["sku-2"])
        assert guessed.predicted and guessed.category in LEAVES and 0 < guessed.confidence["item"] <= 1
        assert all(not h.predicted and set(h.confidence.values()) == {1.0} for h in store.get(["sku-0", "sku-5"]))

