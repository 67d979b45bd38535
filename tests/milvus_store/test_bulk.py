"""Bulk import (`hiervec ingest --bulk`): the Parquet files pymilvus's BulkWriter writes for a
collection, and the import job hiervec starts and follows over Milvus's REST API.

The files are checked with pyarrow. The job is checked against a stand-in for Milvus's REST
import endpoints (the answers of Milvus 2.5's `/v2/vectordb/jobs/import/*`), and against the
real Milvus 2.3 standalone, which has no such API (the error says what is needed). A real
import runs against a Milvus 2.4+ server with its MinIO when HIERVEC_TEST_BULK_URI and
HIERVEC_TEST_BULK_S3 are set (e.g. `docker compose up -d`; skipped here, there is no Docker).
"""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from milvus_store import HierStore, StoreError
from milvus_store.records import to_rows

from .conftest import fresh_collection
from .helpers import SPEC, make_records

bulk = pytest.importorskip("milvus_store.bulk")
try:
    from pymilvus import bulk_writer  # noqa: F401
except ModuleNotFoundError as exc:
    pytest.skip(f"pymilvus's bulk writer is not installed ({exc}): pip install 'pymilvus[bulk_writer]'",
                allow_module_level=True)
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def rows_of(n: int, spec=SPEC):
    return to_rows(make_records(n, spec=spec), spec)


@pytest.mark.unit
def test_bulk_files_hold_the_collection_schema_and_the_rows(tmp_path):
    spec = SPEC.resolved(index="HNSW", partition_key="")
    rows = rows_of(25)
    with bulk.BulkFiles(spec, tmp_path / "files") as files:
        assert files.append(rows[:10]) == 10 and files.append(rows[10:]) == 15
    assert files.rows == 25 and len(files.batch_files) == 1
    [[path]] = files.batch_files
    table = pq.read_table(path)
    schema = table.schema
    assert schema.names == ["id", "uri", "meta", "department", "category", "item", "predicted",
                            "conf_department", "conf_category", "conf_item", "vec", "vec_department",
                            "vec_category", "vec_item"]
    for name, dim in spec.vector_dims().items():
        assert schema.field(name).type == pa.list_(pa.float32()), (name, schema.field(name).type)  # not large_list
        assert {len(v) for v in table.column(name).to_pylist()} == {dim}
    assert schema.field("id").type == pa.string() and schema.field("predicted").type == pa.bool_()
    got = {row["id"]: row for row in table.to_pylist()}
    for row in rows:
        back = got[row["id"]]
        assert (back["uri"], back["department"], back["item"]) == (row["uri"], row["department"], row["item"])
        assert json.loads(back["meta"]) == row["meta"]
        np.testing.assert_allclose(back["vec"], row["vec"], rtol=1e-6)
        np.testing.assert_allclose(back["vec_item"], row["vec_item"], rtol=1e-6)


@pytest.mark.unit
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # pymilvus's upload thread
def test_rows_that_never_reach_the_bucket_are_an_error_not_an_empty_import(tmp_path, monkeypatch):
    from tests.servers import free_port

    monkeypatch.chdir(tmp_path)  # pymilvus buffers remote files under the working folder
    files = bulk.BulkFiles(SPEC, remote=bulk.S3Bucket(f"127.0.0.1:{free_port()}", "nobucket"))
    files.append(rows_of(3))
    with pytest.raises(StoreError, match="3 rows were not written to bucket 'nobucket'"):
        files.close()


@pytest.mark.unit
def test_a_job_that_imports_fewer_rows_than_written_is_an_error():
    fake = FakeMilvusRest(rows=20)
    try:
        with pytest.raises(StoreError, match="imported 20 rows of the 25 written"):
            bulk.import_files(StoreAt(fake.uri), [["p/1.parquet"]], poll_s=0.01, expected_rows=25)
    finally:
        fake.close()


@pytest.mark.unit
def test_bulk_files_need_exactly_one_place():
    with pytest.raises(StoreError, match="exactly one"):
        bulk.BulkFiles(SPEC)
    assert "secret" not in repr(bulk.S3Bucket(secret_key="secret", access_key="key"))


class FakeMilvusRest:
    """Milvus 2.5's REST import endpoints: a job that goes Pending, Importing, then `final`."""

    def __init__(self, final="Completed", rows=25, reason=""):
        self.requests, self.polls = [], 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((self.path, body, self.headers.get("Authorization")))
                if self.path.endswith("/import/create"):
                    answer = {"code": 0, "data": {"jobId": "job-7"}}
                else:
                    fake.polls += 1
                    state = ["Pending", "Importing", final][min(fake.polls - 1, 2)]
                    answer = {"code": 0, "data": {"jobId": "job-7", "state": state, "reason": reason,
                                                  "importedRows": rows if state != "Pending" else 0}}
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class StoreAt:
    """The parts of a HierStore `import_files` reads, for a server at `uri`."""

    def __init__(self, uri, collection="images", token="user:pw"):
        from milvus_store import ConnectionSettings

        self.settings = ConnectionSettings.resolve(uri, token=token)
        self.collection, self.lite = collection, False


@pytest.mark.unit
def test_an_import_job_is_started_and_followed_to_the_end():
    fake = FakeMilvusRest()
    try:
        seen = []
        result = bulk.import_files(StoreAt(fake.uri), [["p/1.parquet"], ["p/2.parquet"]], poll_s=0.01,
                                   progress=seen.append)
    finally:
        fake.close()
    assert result["job_id"] == "job-7" and result["rows"] == 25 and seen == [0, 25, 25]
    path, body, auth = fake.requests[0]
    assert path == "/v2/vectordb/jobs/import/create"
    assert body["collectionName"] == "images" and body["files"] == [["p/1.parquet"], ["p/2.parquet"]]
    assert auth == "Bearer user:pw"
    assert all(p == "/v2/vectordb/jobs/import/describe" for p, _, _ in fake.requests[1:])


@pytest.mark.unit
def test_a_failed_import_job_is_an_error_with_its_reason():
    fake = FakeMilvusRest(final="Failed", reason="field vec: dim mismatch")
    try:
        with pytest.raises(StoreError, match="job-7 .* failed: field vec: dim mismatch"):
            bulk.import_files(StoreAt(fake.uri), [["p/1.parquet"]], poll_s=0.01)
    finally:
        fake.close()


@pytest.mark.unit
def test_no_server_and_milvus_lite_are_clear_errors(tmp_path):
    from tests.servers import free_port

    with pytest.raises(StoreError, match="needs Milvus 2.4 or newer") as error:
        bulk.import_files(StoreAt(f"http://127.0.0.1:{free_port()}", token="user:s3cret"), [["p/1.parquet"]])
    assert "s3cret" not in str(error.value)
    with HierStore(str(tmp_path / "l.db"), "images", spec=SPEC) as store:
        with pytest.raises(StoreError, match="Milvus Lite has no bulk import"):
            bulk.import_files(store, [["p/1.parquet"]])


@pytest.mark.server
def test_milvus_2_3_has_no_bulk_import_api_and_says_what_is_needed(embedded_milvus):
    from dataclasses import replace

    with HierStore(embedded_milvus, fresh_collection(), spec=replace(SPEC, vector_levels=())) as store:
        try:
            with pytest.raises(StoreError, match="bulk import needs Milvus 2.4 or newer"):
                bulk.import_files(store, [["p/1.parquet"]], poll_s=0.01, timeout_s=5)
            assert store.count() == 0
        finally:
            store.drop()


@pytest.mark.server
def test_a_real_bulk_import_into_a_server_with_its_bucket():
    uri, s3 = os.environ.get("HIERVEC_TEST_BULK_URI"), os.environ.get("HIERVEC_TEST_BULK_S3")
    if not (uri and s3):
        pytest.skip("no Milvus 2.4+ server with its MinIO here (no Docker engine): set HIERVEC_TEST_BULK_URI="
                    "http://localhost:19530 and HIERVEC_TEST_BULK_S3=localhost:9000/a-bucket after "
                    "`docker compose up -d` to run it")
    endpoint, _, bucket = s3.partition("/")
    rows = rows_of(40)
    with HierStore(uri, fresh_collection(), spec=SPEC) as store:
        try:
            with bulk.BulkFiles(store.spec, remote=bulk.S3Bucket(endpoint, bucket or "a-bucket")) as files:
                files.append(rows)
            result = bulk.import_files(store, files.batch_files, poll_s=1)
            assert result["rows"] == 40 and store.count() == 40
            assert {h.id for h in store.get([r["id"] for r in rows])} == {r["id"] for r in rows}
        finally:
            store.drop()


@pytest.mark.unit
def test_ingest_bulk_into_milvus_lite_is_a_usage_error(tmp_path, tiny_model):
    from click.testing import CliRunner

    from cli.main import cli

    (tmp_path / "images").mkdir()
    result = CliRunner().invoke(cli, ["ingest", str(tmp_path / "images"), "--model", str(tiny_model),
                                      "--uri", str(tmp_path / "x.db"), "--bulk"])
    assert result.exit_code == 2 and "Milvus Lite has no bulk import" in result.output
    assert not (tmp_path / "x.db").exists()  # nothing created
