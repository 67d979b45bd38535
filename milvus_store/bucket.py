"""`S3Bucket`: where a Milvus server reads bulk-import files. Imports nothing of pymilvus, so the CLI
reads `--bulk-endpoint` and `--bulk-bucket`'s defaults here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class S3Bucket:
    """The S3/MinIO bucket the Milvus server reads (its `minio.*` settings). Keys default to
    $HIERVEC_S3_ACCESS_KEY / $HIERVEC_S3_SECRET_KEY, else MinIO's own defaults (docker-compose.yml)."""

    endpoint: str = "localhost:9000"
    bucket: str = "a-bucket"
    prefix: str = "hiervec-bulk"
    secure: bool = False
    access_key: str | None = None
    secret_key: str | None = None

    def __repr__(self) -> str:  # keys never appear in logs or errors
        return f"S3Bucket(endpoint={self.endpoint!r}, bucket={self.bucket!r}, prefix={self.prefix!r})"
