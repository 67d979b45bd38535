"""Images: read a record and its file (`router`); add and delete (`writes`, which needs the API key)."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor

from hiervec_app import ImageIndex, IngestItem
from milvus_store.spec import META_MAX_DEPTH

from ..core import UNREADABLE_IMAGE, Service, pixels_over
from ..deps import ServiceDep, require_key
from ..errors import ApiError, responses
from ..models import DeletedOut, HitOut, ImageResult, ImagesOut
from ..shared import hit_out, read_upload

router = APIRouter(tags=["images"])
writes = APIRouter(tags=["images"], dependencies=[Depends(require_key)])

# Served files are images, whatever their names say; browsers must not guess otherwise, and
# a file opened on its own runs nothing.
MEDIA_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'; sandbox"}


class AnyTextConvertor(Convertor):
    """The whole decoded rest of the path, line breaks included (Starlette's `path` is `.*`,
    which stops at a newline: an id holding one was stored but could not be read or deleted)."""

    regex = "[\\s\\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anytext", AnyTextConvertor())


# Ids are opaque text ('/', '?', '%', line breaks included): in a path they are percent-encoded
# (image_url does it), and the `anytext` convertor hands the whole decoded rest over.
@router.get("/images/{image_id:anytext}", response_model=HitOut, responses=responses(404),
            summary="One stored image's record")
async def get_image(request: Request, service: ServiceDep, image_id: str, collection: str | None = None) -> HitOut:
    index = await run_in_threadpool(service.index, collection)
    return hit_out(service, request, await run_in_threadpool(_record, index, image_id))


# The file's bytes, typed by what they are (PIL's name for the format), never JSON.
MEDIA_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp", "image/tiff",
               "application/octet-stream")
MEDIA_RESPONSE = {200: {"description": "The image file, typed by its bytes (application/octet-stream when they "
                                       "are not an image PIL reads).",
                        "content": {kind: {"schema": {"type": "string", "format": "binary"}} for kind in MEDIA_TYPES}}}


@router.get("/media/{image_id:anytext}", response_class=Response, responses=MEDIA_RESPONSE | responses(404),
            summary="The stored image's file, when this service can read it")
async def get_image_file(request: Request, service: ServiceDep, image_id: str,
                         collection: str | None = None) -> FileResponse:
    index = await run_in_threadpool(service.index, collection)
    record = await run_in_threadpool(_record, index, image_id)
    path = service.servable_file(record.uri)
    if path is None:
        where = f" at {record.uri!r}" if service.is_admin(request.headers) else ""
        raise ApiError(404, "no_file", f"image {image_id!r} lives{where} where this service does not serve "
                                       "files from (not a file under its image roots)")
    # The type of what the bytes are, never of the file's name: a GIF named page.html is a GIF.
    media_type = await run_in_threadpool(_image_type, path)
    return FileResponse(path, media_type=media_type, headers=MEDIA_HEADERS)


@writes.post("/images", response_model=ImagesOut, responses=responses(401, 404, 409, 413, 415),
             summary="Add (upsert) one or many images")
async def add_images(
    service: ServiceDep,
    images: Annotated[list[UploadFile], File(description="One or more image files.")],
    category: Annotated[list[str], Form(description="Leaf category path per image, or one for all; omitted "
                                                    "or empty: the model predicts it (flagged predicted).")] = [],  # noqa: B006
    id: Annotated[list[str], Form(description="Optional id per image (default: SHA-256 of the bytes).")] = [],  # noqa: B006
    meta: Annotated[list[str], Form(description="Optional JSON object per image, or one for all.")] = [],  # noqa: B006
    collection: Annotated[str | None, Form()] = None,
) -> ImagesOut:
    n = len(images)
    if n > service.settings.max_files:
        raise ApiError(413, "too_many_files", f"at most {service.settings.max_files} images per request, got {n}")
    categories = [c or None for c in _per_image("category", category, n, allow_one=True)] if category \
        else [None] * n
    ids = _per_image("id", id, n, allow_one=False) if id else [None] * n
    metas = [_json_object(m, i) for i, m in enumerate(_per_image("meta", meta, n, allow_one=True))] if meta \
        else [{}] * n
    index = await run_in_threadpool(service.index, collection, create=True)
    uploads = [await read_upload(upload, service.settings.max_upload_bytes) for upload in images]
    results = await run_in_threadpool(_add, service, index, images, uploads, categories, ids, metas)
    service.changed(collection)
    counts = Counter(r.status for r in results)
    body = ImagesOut(stored=counts["stored"], updated=counts["updated"], failed=counts["failed"],
                     duplicates=counts["duplicate"], predicted=sum(1 for r in results if r.predicted_path),
                     count=await run_in_threadpool(index.store.count), results=results)
    if counts["failed"] == n:
        first = results[0].reason or "failed"
        stages = {r.stage for r in results}
        status, code = {frozenset({"decode"}): (415, "not_an_image"),
                        frozenset({"too_large"}): (413, "too_many_pixels")}.get(frozenset(stages), (422, "rejected"))
        return JSONResponse({"error": {"status": status, "code": code, "message": first},
                             "results": [r.model_dump() for r in results]}, status_code=status)
    return body


@writes.delete("/images/{image_id:anytext}", response_model=DeletedOut, responses=responses(401, 404),
               summary="Delete one image")
async def delete_image(service: ServiceDep, image_id: str, collection: str | None = None) -> DeletedOut:
    index = await run_in_threadpool(service.index, collection)
    record = await run_in_threadpool(_record, index, image_id)
    await run_in_threadpool(index.store.delete, [image_id])
    await run_in_threadpool(index.store.flush)
    service.changed(collection)
    kept = service.servable_file(record.uri)
    if kept is not None and service.is_media(kept):  # the upload's copy goes with its record
        kept.unlink(missing_ok=True)
    return DeletedOut(deleted=image_id, count=await run_in_threadpool(index.store.count))


# -- helpers -------------------------------------------------------------------------------
def _record(index: ImageIndex, image_id: str):
    found = index.store.get([image_id])
    if not found:
        raise ApiError(404, "not_found", f"no image with id {image_id!r} in collection {index.store.collection!r}")
    return found[0]


def _per_image(name: str, values: list[str], n: int, *, allow_one: bool) -> list[str]:
    if len(values) == n:
        return values
    if allow_one and len(values) == 1:
        return values * n
    expected = f"1 or {n}" if allow_one else str(n)
    raise ApiError(422, "bad_request", f"{name}: expected {expected} values for {n} images, got {len(values)}")


def _json_object(text: str, position: int) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(422, "bad_request", f"meta #{position + 1} is not valid JSON: {exc.msg}") from None
    except RecursionError:
        raise ApiError(422, "bad_request", f"meta #{position + 1} is nested too deeply (at most "
                                           f"{META_MAX_DEPTH} levels are stored)") from None
    if not isinstance(value, dict):
        raise ApiError(422, "bad_request", f"meta #{position + 1} must be a JSON object, got {type(value).__name__}")
    return value


def _add(service: Service, index: ImageIndex, uploads: Sequence[UploadFile], blobs: Sequence[bytes],
         categories: Sequence[str], ids: Sequence[str | None], metas: Sequence[dict]) -> list[ImageResult]:
    """Store the uploads through the ingest pipeline (an upsert: a re-posted id is replaced); keep each
    stored one's file under the media folder. Every result is the pipeline's outcome for that upload."""
    items = [IngestItem(data, cat, rid, meta, uri=upload.filename or "")
             for data, cat, rid, meta, upload in zip(blobs, categories, ids, metas, uploads)]
    limit = service.settings.max_pixels

    def too_large(item: IngestItem, data: bytes) -> tuple[str, str] | None:
        problem = pixels_over(data, limit)
        return ("too_large", problem) if problem else None

    def media_uri(item: IngestItem, rid: str) -> str | None:
        path = service.media_path(rid)
        return str(path) if path is not None else None

    with service.writing:
        report = index.ingest(items, skip_existing=False, check=too_large, uri_of=media_uri)
    results = []
    for outcome, upload, item in zip(report.items, uploads, items):
        if outcome.status == "duplicate":
            same = outcome.same_as
            results.append(ImageResult(filename=upload.filename, id=outcome.id, status="duplicate",
                                       reason=f"the same image (id) as upload #{same + 1} "
                                              f"({uploads[same].filename}), which is the one stored"))
        elif outcome.status == "failed":
            reason = f"not an image: {outcome.reason}" if outcome.stage == "decode" else outcome.reason
            results.append(ImageResult(filename=upload.filename, id=outcome.id or "", status="failed", reason=reason,
                                       stage=outcome.stage))
        else:
            path = service.media_path(outcome.id)
            if path is not None:  # the record's new bytes, also when an id is uploaded again
                _write_atomically(path, item.source)
            results.append(ImageResult(filename=upload.filename, id=outcome.id,
                                       status="updated" if outcome.replaced else "stored",
                                       predicted_path=outcome.category if outcome.predicted else None))
    return results


def _image_type(path: Path) -> str:
    """The media type of the image in `path`, read from its bytes (application/octet-stream if not an image)."""
    try:
        with Image.open(path) as image:
            return Image.MIME.get(image.format or "", "application/octet-stream")
    except UNREADABLE_IMAGE:
        return "application/octet-stream"


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)
