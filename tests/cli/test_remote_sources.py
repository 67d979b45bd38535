"""Manifests whose paths are URLs (an S3 stand-in on loopback, moto) as well as local files:
`hiervec train` and `hiervec ingest` read them through fsspec, report a missing and a denied
object per file, and lose nothing else."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from embedder import load_checkpoint, read_source

from ..conftest import LEAVES, LEVELS


def run(*args) -> subprocess.CompletedProcess:
    """The CLI in a process of its own: s3fs's event-loop thread then never lives in the test process,
    which forks later (loader workers, servers)."""
    result = subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[2], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result

pytestmark = pytest.mark.lite


def test_the_manifest_keeps_urls_and_turns_file_urls_into_paths(s3_catalogue):
    listing = read_source(s3_catalogue.manifest)
    assert listing.failures == []  # objects are looked up when read, not when listed
    paths = [item.path for item in listing.items]
    assert paths[:12] == [url for url, _ in s3_catalogue.rows[:12]] and all(isinstance(p, str) for p in paths[:14])
    assert paths[14:] == [s3_catalogue.local, s3_catalogue.via_url]  # file:// is a local path


def test_a_scheme_fsspec_cannot_open_is_reported_per_row(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,category\nnosuchscheme://bucket/a.png,clothing/tops/shirt\n")
    listing = read_source(manifest)
    assert listing.items == []
    assert [(f.source, f.reason) for f in listing.failures] == [
        (f"{manifest}:2", "cannot open 'nosuchscheme://bucket/a.png': fsspec knows no filesystem for nosuchscheme:// "
                          "URLs")]


def test_train_reads_the_catalogue_from_s3_and_reports_the_missing_and_the_denied_object(s3_environment, tmp_path):
    out = tmp_path / "model.pt"
    result = run("train", s3_environment.manifest, "--out", out, "--levels", ",".join(LEVELS), "--backbone",
                 "resnet18", "--weights", "none", "--epochs", "1", "--steps-per-epoch", "15", "--dim", "8",
                 "--classes-per-batch", "4", "--per-class", "2", "--val-fraction", "0.3", "--workers", "0")
    # the default image size is read from the headers of the 14 objects and files it can open (40 px: the smallest size)
    assert "image size 64 px: the median shorter side of 14 sampled images is 40 px" in result.stderr
    assert f"skipped {s3_environment.missing}: file does not exist" in result.stderr
    assert f"skipped {s3_environment.denied}: permission denied" in result.stderr
    assert "wrote " in result.stdout
    assert load_checkpoint(out).hierarchy.level_names == LEVELS


def test_ingest_stores_the_s3_objects_under_their_urls_and_reports_the_missing_and_the_denied_one(
        s3_environment, tiny_model, tmp_path):
    report_path = tmp_path / "report.json"
    result = run("ingest", s3_environment.manifest, "--model", tiny_model, "--uri", tmp_path / "s3.db",
                 "--collection", "images", "--runtime", "torch", "--report", report_path, "--json")
    summary = json.loads(result.stdout)
    assert summary["stored"] == len(s3_environment.rows) - 2 and summary["failed"] == 2
    written = json.loads(report_path.read_text())
    assert {key: value for key, value in written.items() if key != "items"} == summary
    assert [item["status"] for item in written["items"]].count("failed") == 2  # every object's outcome
    reasons = {failure["source"]: failure for failure in summary["failures"]}
    missing = next(v for k, v in reasons.items() if s3_environment.missing in k)
    denied = next(v for k, v in reasons.items() if s3_environment.denied in k)
    assert (missing["stage"], missing["reason"]) == ("read", "cannot read: does not exist")
    assert (denied["stage"], denied["reason"]) == ("read", "cannot read: permission denied")

    from milvus_store import HierStore

    with HierStore(str(tmp_path / "s3.db"), "images", create=False) as store:
        uris = sorted(row["uri"] for batch in store.row_batches(batch_size=100) for row in batch)
    expected = sorted([url for url, _ in s3_environment.rows[:12]]
                      + [str(s3_environment.local), str(s3_environment.via_url)])
    assert uris == expected and len(LEAVES) == 4
