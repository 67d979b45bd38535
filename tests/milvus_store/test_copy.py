"""Copying a collection from Milvus Lite to a server (issue: scale-out ingestion, `hiervec copy`).

The source is a Milvus Lite file; the target is each store target: another Lite file, a
`milvus-lite server` process, the real Milvus 2.3 standalone (image-vector layout), Docker.
"""

from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from milvus_store import HierStore, Record, SchemaMismatchError, StoreError, copy_collection, open_copy_target
from milvus_store.copy import target_spec

from .conftest import fresh_collection
from .helpers import LEVELS, SPEC

WEIGHTS = (0.5, 0.6, 0.62)


def catalogue(n: int, seed: int = 0) -> list[Record]:
    """Records whose image vector concatenates scaled unit level vectors, as a trained model's do."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        units = {}
        for name, dim in zip(LEVELS, SPEC.level_dims):
            v = rng.normal(size=dim).astype(np.float32)
            units[name] = v / np.linalg.norm(v)
        d, c, t = i % 3, i % 2, i % 4
        records.append(Record(
            category=f"d{d}/c{d}{c}/i{d}{c}{t}",
            vector=np.concatenate([w * units[n] for w, n in zip(WEIGHTS, LEVELS)]),
            level_vectors=units, id=f"img{i}", uri=f"file:///images/{i}.png",
            meta={"n": i, "tags": ["a", "b"][: i % 3]},
            predicted=i % 5 == 0, confidence={n: 0.5 + 0.1 * k for k, n in enumerate(LEVELS)} if i % 5 == 0 else None,
        ))
    return records


@pytest.fixture
def source(tmp_path):
    with HierStore(str(tmp_path / "laptop.db"), "images", spec=SPEC, fingerprint="f00dfeed") as store:
        store.upsert(catalogue(230))
        store.flush()
        store.record_model("/models/demo.pt")
        yield store


def rows_by_id(store: HierStore) -> dict[str, dict]:
    return {row["id"]: row for batch in store.row_batches(batch_size=100) for row in batch}


def assert_same_rows(source: HierStore, target: HierStore) -> None:
    src, dst = rows_by_id(source), rows_by_id(target)
    assert sorted(src) == sorted(dst)
    fields = target.spec.fields
    for rid, row in src.items():
        got = dst[rid]
        for name in (fields.uri, fields.meta, *fields.levels.values(), fields.predicted):
            assert got[name] == row[name], (rid, name)
        for name in fields.confidence.values():
            assert got[name] == pytest.approx(row[name]), (rid, name)
        np.testing.assert_allclose(got[fields.vector], row[fields.vector], atol=1e-6)
        for level, field in fields.level_vectors.items():
            expected = row.get(source.spec.fields.level_vectors.get(level, ""))
            if expected is None:  # the source kept no field for this level: read back from the image vector
                dims = dict(zip(LEVELS, SPEC.level_dims))
                start = sum(list(dims.values())[: LEVELS.index(level)])
                part = np.asarray(row[fields.vector][start: start + dims[level]])
                expected = part / np.linalg.norm(part)
            np.testing.assert_allclose(got[field], expected, atol=1e-5)


def test_a_copy_holds_the_same_rows_vectors_and_properties(source, target):
    name = fresh_collection()
    layout = {} if target.level_vectors else {"vector_levels": ()}
    with open_copy_target(source, target.uri, name, **layout) as copy:
        report = copy_collection(source, copy, batch_size=64)
        assert (report.source_count, report.copied, report.skipped, report.target_count) == (230, 230, 0, 230)
        assert copy.fingerprint == "f00dfeed" and copy.model_location == "/models/demo.pt"
        assert copy.spec.index == "FLAT" and copy.spec.level_names == LEVELS and copy.spec.dim == SPEC.dim
        assert_same_rows(source, copy)
        # the same searches give the same hits
        query = catalogue(1, seed=9)[0].vector
        want = [h.id for h in source.search([query], k=5, where={"department": "d1"})[0]]
        assert [h.id for h in copy.search([query], k=5, where={"department": "d1"})[0]] == want
    with HierStore(target.uri, name, create=False) as reopened:  # what was recorded, read back cold
        assert reopened.fingerprint == "f00dfeed" and reopened.model_location == "/models/demo.pt"
        assert reopened.count() == 230
        reopened.drop()


def test_an_interrupted_copy_resumes_where_it_stopped(source, target):
    name = fresh_collection()
    layout = {} if target.level_vectors else {"vector_levels": ()}
    batches = []

    def stop_after_two(n):
        batches.append(n)
        if len(batches) == 2:
            raise KeyboardInterrupt

    with open_copy_target(source, target.uri, name, **layout) as copy:
        with pytest.raises(KeyboardInterrupt):
            copy_collection(source, copy, batch_size=50, progress=stop_after_two)
        copy.flush()
        assert copy.count() == 100  # the two batches written before the interruption
    with open_copy_target(source, target.uri, name, **layout) as copy:
        report = copy_collection(source, copy, batch_size=50)
        assert (report.copied, report.skipped, report.target_count) == (130, 100, 230)
        assert_same_rows(source, copy)
        again = copy_collection(source, copy, batch_size=50)
        assert (again.copied, again.skipped, again.target_count) == (0, 230, 230)
        copy.drop()


@pytest.mark.lite
def test_a_layout_without_level_vectors_copies_back_to_one_with_them(source, tmp_path):
    with open_copy_target(source, str(tmp_path / "slim.db"), "images", vector_levels=()) as slim:
        copy_collection(source, slim)
        assert slim.spec.kept_vector_levels == ()
        with open_copy_target(slim, str(tmp_path / "full.db"), "images", vector_levels=LEVELS) as full:
            report = copy_collection(slim, full)
            assert report.copied == 230 and full.spec.kept_vector_levels == LEVELS
            assert_same_rows(slim, full)  # level vectors derived from the image vector
            original = rows_by_id(source)
            for rid, row in rows_by_id(full).items():  # ... equal the ones the source stored
                for field in full.spec.fields.level_vectors.values():
                    np.testing.assert_allclose(row[field], original[rid][field], atol=1e-5)


@pytest.mark.lite
def test_a_target_of_another_model_is_refused_and_untouched(source, tmp_path):
    other = str(tmp_path / "other.db")
    with HierStore(other, "images", spec=SPEC, fingerprint="0123456789abcdef") as store:
        store.upsert(catalogue(3, seed=5))
        store.flush()
    with pytest.raises(SchemaMismatchError, match="fingerprint"):
        open_copy_target(source, other, "images")
    with HierStore(other, "images", create=False) as store:
        assert store.count() == 3
    with pytest.raises(StoreError, match="same collection"):
        open_copy_target(source, source.settings.uri, "images")
    with pytest.raises(StoreError, match="batch_size"):
        with open_copy_target(source, str(tmp_path / "x.db"), "images") as copy:
            copy_collection(source, copy, batch_size=0)


@pytest.mark.unit
def test_the_target_spec_keeps_the_model_and_leaves_the_choices():
    spec = replace(SPEC, vector_levels=("item",), partition_key="", num_partitions=None)
    asked = target_spec(spec)
    assert (asked.level_names, asked.dim, asked.level_dims, asked.metric, asked.index) == (
        spec.level_names, spec.dim, spec.level_dims, spec.metric, "FLAT")
    assert asked.vector_levels is None and asked.partition_key is None  # the target's defaults
    assert target_spec(spec, index="HNSW", partition_key="department").index == "HNSW"


@pytest.mark.lite
def test_the_copy_command(source, tmp_path):
    source.close()  # a Lite file is opened by one process... and one client at a time
    laptop, server = str(tmp_path / "laptop.db"), str(tmp_path / "server.db")
    runner = CliRunner()
    result = runner.invoke(cli, ["copy", "--from", laptop, "--to", server, "--collection", "images",
                                 "--level-vectors", "none", "--batch-size", "100"])
    assert result.exit_code == 0, result.output
    assert "copied 230 rows, skipped 0 already there" in result.output and "holds 230" in result.output
    result = runner.invoke(cli, ["copy", "--from", laptop, "--to", server, "--collection", "images", "--json"])
    assert result.exit_code == 0, result.output
    assert '"copied": 0, "skipped": 230' in result.output and '"level_vectors": []' in result.output
    result = runner.invoke(cli, ["copy", "--from", laptop, "--to", server, "--collection", "images", "--level-vectors", "shoes"])
    assert result.exit_code == 2 and "--level-vectors" in result.output
    result = runner.invoke(cli, ["copy", "--from", laptop, "--to", server, "--collection", "nothing"])
    assert result.exit_code == 1 and "does not exist" in result.output
