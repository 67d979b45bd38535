"""What several routers share: reading an upload within its limit, and rendering a hit."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from fastapi import Request, UploadFile

from milvus_store import uri_path

from .core import Service
from .errors import ApiError
from .models import HitOut


def hit_out(service: Service, request: Request, hit) -> HitOut:
    url = None
    if service.servable_file(hit.uri):
        url = str(request.url_for("get_image_file", image_id=quote(hit.id, safe="")))
    uri = hit.uri
    local = uri_path(uri) if uri else None
    if local and not service.is_admin(request.headers):  # the file's name, not where the server keeps it
        uri = Path(local).name
    return HitOut(id=hit.id, distance=hit.distance, uri=uri, category=hit.category,
                  categories=hit.categories, meta=hit.meta, predicted=hit.predicted, confidence=hit.confidence,
                  image_url=url)


async def read_upload(upload: UploadFile, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "too_large", f"{upload.filename or 'upload'} is larger than the {limit} byte limit")
    if not data:
        raise ApiError(415, "not_an_image", f"{upload.filename or 'upload'} is empty")
    return data
