"""Milvus bulk import: rows written as Parquet files, then loaded by the server in one job.

For backfills of millions of images into a Milvus server: writing files and importing them
skips the per-row insert path (`hiervec ingest --bulk`). pymilvus's `BulkWriter` writes the
files in the collection's exact schema (`LocalBulkWriter` to a folder, `RemoteBulkWriter` to
the S3/MinIO bucket the server reads, e.g. docker-compose.yml's MinIO), and
`import_files` starts the import job over Milvus's REST API (2.4 and newer) and follows
it to the end. Milvus Lite has no bulk import.

    >>> with BulkFiles(store.spec, remote=S3Bucket("localhost:9000", "a-bucket")) as files:  # doctest: +SKIP
    ...     files.append(rows)
    >>> import_files(store, files.batch_files)                                                # doctest: +SKIP
    {'job_id': '4625...', 'rows': 120000, 'seconds': 41.2}
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .bucket import S3Bucket
from .errors import StoreError
from .spec import CollectionSpec
from .store import HierStore, collection_schema

BULK_EXTRA = "pip install 'pymilvus[bulk_writer]'"
CHUNK_BYTES = 256 * 1024 * 1024  # one Parquet file per ~256 MB of rows (Milvus imports files up to 16 GB)


def _bulk_writer():
    try:
        from pymilvus import bulk_writer
    except ModuleNotFoundError as exc:  # pymilvus raises it naming the missing packages
        raise StoreError(f"bulk files need pymilvus's bulk writer ({exc}): {BULK_EXTRA}") from None
    return bulk_writer


class BulkFiles:
    """Rows (as `HierStore.upsert_rows` takes them) written as Parquet files for a bulk import;
    `batch_files` lists them (one list per file) once closed."""

    def __init__(self, spec: CollectionSpec, folder: str | os.PathLike | None = None, *,
                 remote: S3Bucket | None = None, chunk_bytes: int = CHUNK_BYTES):
        if (folder is None) == (remote is None):
            raise StoreError("bulk files go to a local folder or to a remote bucket: give exactly one")
        bw = _bulk_writer()
        schema = collection_schema(spec)
        if remote is None:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self._writer = bw.LocalBulkWriter(schema=schema, local_path=str(folder), chunk_size=chunk_bytes,
                                              file_type=bw.BulkFileType.PARQUET)
        else:
            connect = bw.RemoteBulkWriter.S3ConnectParam(
                bucket_name=remote.bucket, endpoint=remote.endpoint, secure=remote.secure,
                access_key=remote.access_key or os.environ.get("HIERVEC_S3_ACCESS_KEY", "minioadmin"),
                secret_key=remote.secret_key or os.environ.get("HIERVEC_S3_SECRET_KEY", "minioadmin"))
            self._writer = bw.RemoteBulkWriter(schema=schema, remote_path=remote.prefix, connect_param=connect,
                                               chunk_size=chunk_bytes, file_type=bw.BulkFileType.PARQUET)
        self.rows = 0
        self.batch_files: list[list[str]] = []
        self._where = str(folder) if remote is None else f"bucket {remote.bucket!r} at {remote.endpoint}"

    def append(self, rows: Sequence[dict]) -> int:
        for row in rows:
            self._writer.append_row(row)
        self.rows += len(rows)
        return len(rows)

    def close(self) -> list[list[str]]:
        """Write what is buffered; the files, one list per file."""
        if self.rows:
            self._writer.commit()
        self.batch_files = [list(files) for files in self._writer.batch_files]
        if self.rows and not self.batch_files:  # pymilvus logs a failed write or upload and carries on
            raise StoreError(f"bulk files: {self.rows} rows were not written to {self._where} (the writer reported "
                             f"no file; for a bucket, check the endpoint, bucket name and keys)")
        return self.batch_files

    def __enter__(self) -> BulkFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def import_files(store: HierStore, batch_files: Sequence[Sequence[str]], *, poll_s: float = 2.0,
                 timeout_s: float = 24 * 3600, progress: Callable[[int], None] | None = None,
                 token: str | None = None, expected_rows: int | None = None) -> dict:
    """Import files (paths in the server's bucket) into `store`'s collection and wait for the job:
    {job_id, rows, seconds}. `progress(rows)` gets the rows imported so far; a job that imports
    other than `expected_rows` (when given) is an error."""
    if store.lite:
        raise StoreError("Milvus Lite has no bulk import: upsert the rows instead, or import into a Milvus server")
    if not batch_files:
        return {"job_id": None, "rows": 0, "seconds": 0.0}
    bw = _bulk_writer()
    from pymilvus.exceptions import MilvusException

    url = store.settings.uri.rstrip("/")
    settings = store.settings
    key = token if token is not None else (
        settings.token or (f"{settings.user}:{settings.password}" if settings.user else ""))
    started = time.monotonic()
    try:
        response = bw.bulk_import(url=url, collection_name=store.collection, files=[list(f) for f in batch_files],
                                  api_key=key)
        job_id = response.json()["data"]["jobId"]
        while True:
            state = bw.get_import_progress(url=url, job_id=job_id, api_key=key).json()["data"]
            rows = int(state.get("importedRows") or 0)
            if progress is not None:
                progress(rows)
            if state.get("state") == "Completed":
                if expected_rows is not None and rows != expected_rows:
                    raise StoreError(f"bulk import job {job_id} into {store.collection!r} imported {rows} rows of "
                                     f"the {expected_rows} written to its files")
                return {"job_id": job_id, "rows": rows, "seconds": round(time.monotonic() - started, 3)}
            if state.get("state") == "Failed":
                raise StoreError(f"bulk import job {job_id} into {store.collection!r} failed: "
                                 f"{state.get('reason') or 'no reason given'}")
            if time.monotonic() - started > timeout_s:
                raise StoreError(f"bulk import job {job_id} into {store.collection!r} did not finish in "
                                 f"{timeout_s:.0f} s ({rows} rows so far); it may still be running on the server")
            time.sleep(poll_s)
    except MilvusException as exc:
        raise StoreError(f"bulk import into {store.collection!r} at {store.settings.display_uri!r} failed: "
                         f"{store.settings.redact(exc.message or str(exc))} (bulk import needs Milvus 2.4 or newer, "
                         f"whose REST API answers on the same port)") from None
    except (OSError, KeyError, ValueError) as exc:  # connection refused, not Milvus's answer
        raise StoreError(f"bulk import into {store.collection!r} at {store.settings.display_uri!r} failed: "
                         f"{store.settings.redact(str(exc))} (bulk import needs Milvus 2.4 or newer, whose REST "
                         f"API answers on the same port)") from None
