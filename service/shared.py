"""What several routers share: reading an upload within its limit, and rendering a hit."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from fastapi import Request, UploadFile

from milvus_store import uri_path

from .core import Service
from .errors import ApiError
from .models import HitOut


def hits_out(service: Service, request: Request, hits) -> list[HitOut]:
    """Hits as the client sees them: a link to each file this service serves, and a file's name
    instead of where the server keeps it unless the caller is an admin.

    What does not change from hit to hit is worked out once per response: whether the caller
    is an admin, and the file link's prefix (one `url_for`, not one per hit). Whether a hit's
    file is served comes from `Service.shows_file`, which remembers the file-system check.
    """
    admin = service.is_admin(request.headers)
    prefix = None
    out = []
    for hit in hits:
        url = None
        if hit.uri and service.shows_file(hit.uri):
            if prefix is None:  # /media/{id}: everything but the id's one character
                prefix = str(request.url_for("get_image_file", image_id="-"))[:-1]
            url = prefix + quote(hit.id, safe="")
        uri = hit.uri
        local = uri_path(uri) if uri else None
        if local and not admin:  # the file's name, not where the server keeps it
            uri = Path(local).name
        out.append(HitOut(id=hit.id, distance=hit.distance, uri=uri, category=hit.category,
                          categories=hit.categories, meta=hit.meta, predicted=hit.predicted,
                          confidence=hit.confidence, image_url=url))
    return out


def hit_out(service: Service, request: Request, hit) -> HitOut:
    [out] = hits_out(service, request, [hit])
    return out


async def read_upload(upload: UploadFile, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "too_large", f"{upload.filename or 'upload'} is larger than the {limit} byte limit")
    if not data:
        raise ApiError(415, "not_an_image", f"{upload.filename or 'upload'} is empty")
    return data
