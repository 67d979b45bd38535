"""The HTTP face of hiervec: search, add, get and delete images, browse the hierarchy.

>>> service = Service.open(ServiceSettings(model="model.pt", uri="./hiervec.db"))   # doctest: +SKIP
>>> app = create_app(service)                                                      # doctest: +SKIP
>>> # uvicorn.run(app, host="127.0.0.1", port=8000)

The model is loaded and the store opened once, by `Service.open`. Image decoding runs on
worker threads; concurrent queries share forward passes and Milvus search calls through
two micro-batchers (`service.batching`), each on its own thread, so the event loop only
routes requests. Every error reaches the client as JSON,
``{"error": {"status": 4xx, "code": "...", "message": "..."}}``; a bug becomes a 500
with the same shape and the traceback goes to the server log only.
"""

from __future__ import annotations

import functools
import hmac
import io
import json
import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from embedder import Embedder, ImageDecodeError
from embedder.devices import available_cpus, set_threads
from embedder.errors import EmbedderError
from milvus_store.spec import META_MAX_DEPTH
from milvus_store import (
    CollectionNotFoundError,
    Confident,
    Filter,
    FilterError,
    Ids,
    ImageIndex,
    FailedItem,
    IngestItem,
    Predicted,
    SchemaMismatchError,
    StoreConnectionError,
    StoreError,
    Under,
    both,
    category_filter,
    content_id,
    uri_path,
)

from .batching import MicroBatcher, Vectors, split_embeddings

log = logging.getLogger("hiervec.service")
PAGE = Path(__file__).with_name("static") / "index.html"
CATEGORY_CACHE_S = 30.0


# -- settings and the service object ------------------------------------------------------
@dataclass(frozen=True)
class ServiceSettings:
    """Everything `hiervec serve` configures; secrets never appear in `repr`."""

    model: str | os.PathLike
    uri: str | None = None
    collection: str = "images"
    token: str | None = field(default=None, repr=False)
    api_key: str | None = field(default=None, repr=False)
    max_upload_bytes: int = 20 * 2**20
    max_k: int = 1000  # hits per query: k, or k x group_size when grouped
    max_files: int = 64  # images per POST /images
    max_pixels: int = 40_000_000  # per uploaded image, read from its header before it is decoded
    max_requests: int = 64  # requests in progress at once (more answer 503), a bound on bodies held
    max_batch: int = 32
    batch_window_ms: float = 0.0
    media_dir: str | os.PathLike | None = "hiervec-media"
    image_roots: tuple[str, ...] = ()
    optimize: bool = False  # embed through the traced, frozen model (embedder.inference.frozen_for_cpu)
    device: str = "auto"  # where the model runs (embedder.devices.resolve_device)
    amp: bool = False  # mixed-precision embedding; stored and searched vectors stay float32
    threads: int | None = None  # torch threads of each server process (None: torch's default)

    def __post_init__(self):
        for name in ("max_upload_bytes", "max_k", "max_files", "max_batch", "max_pixels", "max_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_window_ms < 0:
            raise ValueError(f"batch_window_ms must not be negative, got {self.batch_window_ms}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be positive, got {self.threads}")

    def to_json(self) -> str:
        """The settings without the secrets (workers read those from the environment)."""
        data = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in self.__dict__.items()
                if k not in ("token", "api_key")}
        return json.dumps(data | {"image_roots": list(self.image_roots)})

    @classmethod
    def from_json(cls, text: str) -> ServiceSettings:
        data = json.loads(text)
        return cls(**data | {"image_roots": tuple(data.get("image_roots", ()))})


@dataclass(frozen=True)
class SearchQuery:
    """A search's parameters: requests with equal ones share one Milvus call."""

    collection: str | None
    k: int
    level: str | None = None
    where: Filter | None = None
    group_by: str | None = None
    group_size: int = 1


class ApiError(Exception):
    """An error the client caused (or a dependency that is down): status, code and message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Service:
    """The loaded model, the open collections and the micro-batchers behind the app."""

    def __init__(self, settings: ServiceSettings, embedder: Embedder, index: ImageIndex):
        self.settings = settings
        self.embedder = embedder
        window = settings.batch_window_ms / 1000
        self.embedding = MicroBatcher(lambda _, images: split_embeddings(embedder.embed(images)),
                                      max_batch=settings.max_batch, window_s=window, name="embed")
        self.searching = MicroBatcher(self._search_batch, max_batch=settings.max_batch, window_s=window,
                                      name="search")
        self.started = time.time()
        self.requests: Counter = Counter()
        self._indexes = {settings.collection: index}
        self._categories: dict[str, tuple[float, dict[str, Counter]]] = {}
        self._lock = threading.Lock()
        self._counting = threading.Lock()
        # The memory budget: decoded query images at most one per CPU at a time, writes one
        # request at a time (each decodes with ImageIndex's pool); see `memory_budget`.
        self.decode_slots = available_cpus()
        self.decoding = threading.BoundedSemaphore(self.decode_slots)
        self.writing = threading.BoundedSemaphore(1)
        roots = [Path(r) for r in settings.image_roots] or [Path.cwd()]
        if settings.media_dir is not None:
            roots.append(Path(settings.media_dir))
        self.image_roots = tuple(r.resolve() for r in roots)

    @classmethod
    def open(cls, settings: ServiceSettings) -> Service:
        """Load the model and open (or create) the default collection: mismatches fail here, before serving."""
        for name in ("pymilvus", "pymilvus.milvus_client", "milvus_lite"):  # errors reach clients as JSON, once
            logging.getLogger(name).setLevel(logging.CRITICAL)
        if settings.threads is not None:
            set_threads(settings.threads)  # the service, not the library, owns the process's thread count
        _return_freed_images_to_the_system()
        embedder = Embedder.from_checkpoint(settings.model, optimize=settings.optimize, device=settings.device,
                                            amp=settings.amp)
        index = ImageIndex.open(embedder, settings.uri, settings.collection, token=settings.token)
        return cls(settings, embedder, index)

    def close(self) -> None:
        self.embedding.close()
        self.searching.close()
        for index in self._indexes.values():
            index.close()

    async def search(self, vector: np.ndarray, query: SearchQuery) -> list:
        """Hits for one query vector; concurrent queries with equal parameters share one Milvus call."""
        return await self.searching.submit(vector, key=query)

    def _search_batch(self, query: SearchQuery, vectors: list[np.ndarray]) -> list[list]:
        store = self.index(query.collection).store
        return store.search(np.stack(vectors), query.k, level=query.level, where=query.where,
                            group_by=query.group_by, group_size=query.group_size)

    @property
    def level_names(self) -> tuple[str, ...]:
        return tuple(self.embedder.level_names)

    def index(self, collection: str | None, *, create: bool = False) -> ImageIndex:
        """The open collection `collection` (default: the served one), opened on first use."""
        name = collection or self.settings.collection
        with self._lock:
            if name not in self._indexes:
                self._indexes[name] = ImageIndex.open(self.embedder, self.settings.uri, name,
                                                      token=self.settings.token, create=create)
            return self._indexes[name]

    def categories(self, collection: str | None) -> dict[str, Counter]:
        """Stored records per category path at each level (cached briefly; writes clear it).

        Counting reads every record, so concurrent callers wait for one count, not one each.
        """
        name = collection or self.settings.collection
        with self._counting:
            cached = self._categories.get(name)
            if cached is not None and time.monotonic() - cached[0] < CATEGORY_CACHE_S:
                return cached[1]
            counts = self.index(name).store.category_counts()
            self._categories[name] = (time.monotonic(), counts)
            return counts

    def changed(self, collection: str | None) -> None:
        self._categories.pop(collection or self.settings.collection, None)

    def known_categories(self, collection: str | None) -> dict[str, set[str]]:
        """Category paths per level: the model's hierarchy and whatever the collection holds."""
        stored = self.categories(collection)
        return {level: set(vocab) | set(stored.get(level, ()))
                for level, vocab in zip(self.level_names, self.embedder.hierarchy.vocabularies)}

    @property
    def memory_budget(self) -> dict[str, int]:
        """Bytes the service holds for requests at most, by part: bodies in flight, decoded query
        images, and one write's decoding (an RGB image and its resized copy per decoding thread)."""
        settings = self.settings
        image = settings.max_pixels * 3 * 2
        parts = {"bodies": settings.max_requests * (settings.max_upload_bytes + BODY_SLACK),
                 "query_decoding": self.decode_slots * image,
                 "write_decoding": min(8, available_cpus() + 2) * image}
        return parts | {"total": sum(parts.values())}

    def _has_key(self, request: Request) -> bool:
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization", "")
        if not given and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), (self.settings.api_key or "").encode())

    def check_key(self, request: Request) -> None:
        if self.settings.api_key and not self._has_key(request):
            raise ApiError(401, "unauthorized", "this endpoint needs the API key in the X-API-Key header")

    def is_admin(self, request: Request) -> bool:
        """A request with the API key sees the server's own paths; nobody does when no key is set."""
        return bool(self.settings.api_key) and self._has_key(request)

    @functools.cached_property
    def server_paths(self) -> list[str]:
        """The server's file-system paths that responses must not show anonymous clients, longest first."""
        places = [self.settings.uri, self.settings.media_dir, self.settings.model, *self.settings.image_roots,
                  str(Path.cwd())]
        found = set()
        for place in places:
            if place and "://" not in str(place):
                found |= {str(place), str(Path(place).resolve())}
        return sorted((p for p in found if len(p) > 1), key=len, reverse=True)

    def redact(self, text: str, request: Request) -> str:
        """`text` with the server's paths replaced, unless the request is an admin's."""
        if self.is_admin(request):
            return text
        for path in self.server_paths:
            text = text.replace(path, "<server path>")
        return text

    def servable_file(self, uri: str) -> Path | None:
        """The stored `uri` as a local file under one of the image roots, else None."""
        local = uri_path(uri) if uri else None
        if not local:
            return None
        path = Path(local).resolve()
        if not path.is_file() or not any(path.is_relative_to(root) for root in self.image_roots):
            return None
        return path

    def media_path(self, record_id: str) -> Path | None:
        """Where an uploaded image is kept so the page can show it (None: uploads are not kept).

        One file per id, named by the id's hash and nothing the client chose: a re-upload
        replaces it, and its media type is read from its bytes when it is served.
        """
        if self.settings.media_dir is None:
            return None
        digest = content_id(record_id.encode())  # ids are free text; their hash is a safe file name
        return (Path(self.settings.media_dir) / digest[:2] / f"{digest[:32]}.img").resolve()

    def is_media(self, path: Path) -> bool:
        return self.settings.media_dir is not None and path.is_relative_to(Path(self.settings.media_dir).resolve())


# -- response models (they document the OpenAPI schema) ----------------------------------
class HitOut(BaseModel):
    id: str
    distance: float | None = Field(None, description="Squared L2 distance (smaller is nearer); null for a lookup.")
    uri: str = Field(description="Where the image lives (a local path for files ingested or uploaded here).")
    category: str | None = Field(None, description="Leaf category path, e.g. clothing/tops/shirt.")
    categories: dict[str, str] = Field(description="Category path at each level.")
    meta: dict[str, Any]
    predicted: bool = Field(False, description="The category path was predicted by the model at ingest, not given.")
    confidence: dict[str, float] = Field(default_factory=dict, description="Probability of the path at each level "
                                                                            "(1 for given paths).")
    image_url: str | None = Field(None, description="This service's URL of the image, when it can serve it.")


class Prediction(BaseModel):
    path: str
    probabilities: dict[str, float]


class SearchOut(BaseModel):
    query: dict[str, Any] = Field(description="What was searched with: the uploaded file's name, or the stored id.")
    level: str | None = Field(None, description="The level vector searched, or null for the image vector.")
    filter: dict[str, Any]
    routing: dict[str, Any] | None = Field(None, description="With `auto`: the query's predicted path and whether "
                                                              "the search was restricted to its category.")
    hits: list[HitOut]


class ImageResult(BaseModel):
    filename: str | None
    id: str
    status: str = Field(description="stored (new), updated (the id was stored already: category and meta "
                                    "replaced), duplicate (the same id as an earlier upload of this request, "
                                    "which is the one stored) or failed.")
    reason: str | None = None
    stage: str | None = Field(None, description="For a failure: decode (not an image), too_large (more pixels "
                                                "than the service decodes) or invalid (bad record).")
    predicted_path: str | None = Field(None, description="The category the model predicted, when none was given.")


class ImagesOut(BaseModel):
    stored: int
    updated: int
    duplicates: int = 0
    predicted: int = Field(description="How many of the stored or updated got a predicted category.")
    failed: int
    count: int
    results: list[ImageResult]


class CategoryNode(BaseModel):
    name: str
    path: str
    level: str
    count: int
    children: list[CategoryNode] = []


class CategoriesOut(BaseModel):
    levels: list[str]
    total: int
    tree: list[CategoryNode]


class ErrorBody(BaseModel):
    status: int
    code: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorBody


ERRORS = {code: {"model": ErrorOut} for code in (400, 401, 404, 409, 413, 415, 422, 503)}


# -- the app ------------------------------------------------------------------------------
def create_app(service: Service) -> FastAPI:
    """The ASGI app over an open `Service` (closed when the app shuts down)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    app = FastAPI(
        title="hiervec", version=_version(), lifespan=lifespan,
        description="Hierarchical-category image retrieval on Milvus: search by image or id inside parts of "
                    "the category tree, add and delete images, browse the hierarchy.",
    )
    app.add_middleware(BodyLimit, limit=service.settings.max_upload_bytes)
    app.state.service = service
    _add_error_handlers(app)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        service.requests[f"{request.method} {route.path if route else 'other'}"] += 1
        return response

    page_html = PAGE.read_text(encoding="utf-8")
    page_headers = {"Content-Security-Policy": _page_policy(page_html), "X-Content-Type-Options": "nosniff",
                    "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html, headers=page_headers)

    @app.post("/search", response_model=SearchOut, responses=ERRORS, summary="Search by an uploaded image or a stored id")
    async def search(
        request: Request,
        image: Annotated[UploadFile | None, File(description="The query image.")] = None,
        id: Annotated[str | None, Form(description="Search with this stored image instead of an upload.")] = None,
        k: Annotated[int, Form(ge=1, description="Number of hits.")] = 10,
        level: Annotated[str | None, Form(description="Search one level's vector instead of the image vector.")] = None,
        where: Annotated[list[str], Form(description="LEVEL=CATEGORY (a path or a unique name); repeatable.")] = [],  # noqa: B006
        under: Annotated[str | None, Form(description="Only inside this subtree, e.g. clothing/tops.")] = None,
        group_by: Annotated[str | None, Form(description="At most group_size hits per category of this level.")] = None,
        group_size: Annotated[int, Form(ge=1)] = 1,
        collection: Annotated[str | None, Form(description="Another collection of the same model.")] = None,
        auto: Annotated[str | None, Form(description="Predict the query's category and search only within it at "
                                                     "this level when confident enough.")] = None,
        min_confidence: Annotated[float, Form(ge=0, le=1, description="With `auto`: the probability needed.")] = 0.5,
        predicted: Annotated[str, Form(pattern="^(include|exclude|only)$",
                                       description="Stored images with predicted categories: include, exclude "
                                                   "or only.")] = "include",
        min_label_confidence: Annotated[float | None, Form(ge=0, le=1, description="Only stored images whose "
                                                           "category has at least this probability.")] = None,
    ) -> SearchOut:
        if (image is None) == (id is None):
            raise ApiError(422, "bad_query", "give exactly one of an uploaded `image` or a stored `id`")
        if k > service.settings.max_k:
            raise ApiError(422, "bad_query", f"k must be at most {service.settings.max_k}, got {k}")
        if group_by is not None and k * group_size > service.settings.max_k:
            raise ApiError(422, "bad_query", f"k x group_size must be at most {service.settings.max_k} hits, got "
                                             f"{k} x {group_size} = {k * group_size}")
        for name, value in (("level", level), ("group_by", group_by), ("auto", auto)):
            if value is not None and value not in service.level_names:
                raise ApiError(400, "unknown_level",
                               f"unknown level {value!r} for {name}; levels are {', '.join(service.level_names)}")
        if level is not None and not service.embedder.level_dims:
            raise ApiError(400, "unknown_level", "this model is flat: it has only the image vector, no level vectors")
        index = await run_in_threadpool(service.index, collection)
        pairs = [_pair(value) for value in where]
        where_filter = None
        if pairs or under is not None:
            known = await run_in_threadpool(service.known_categories, collection)
            where_filter = category_filter(pairs, under, known)
        extra = {"exclude": Predicted(False), "only": Predicted(True)}.get(predicted)
        if min_label_confidence is not None:
            extra = both(extra, Confident(service.level_names[-1], min_label_confidence))
        where_filter = both(where_filter, extra)
        routing = None
        if image is not None:
            data = await _read_upload(image, service.settings.max_upload_bytes)
            prepared = await run_in_threadpool(_prepare, service, data, image.filename)
            vectors = await service.embedding.submit(prepared)
            query_vector = vectors.concat if level is None else vectors.levels[level]
            query = {"filename": image.filename}
        else:
            vectors = await run_in_threadpool(_stored_vectors, index, id)
            query_vector, query = (vectors.concat if level is None else vectors.levels[level]), {"id": id}
            where_filter = both(where_filter, ~Ids((id,)))  # so a grouped search still fills the query's own group
        if auto is not None:
            route = (await run_in_threadpool(index.route, _Batch(vectors), auto, min_confidence))[0]
            routing = route.to_dict()
            if route.within is not None:
                where_filter = both(where_filter, Under(route.within))
        hits = await service.search(query_vector, SearchQuery(collection, k, level, where_filter, group_by, group_size))
        return SearchOut(query=query, level=level, routing=routing,
                         hits=[_hit_out(service, request, hit) for hit in hits],
                         filter={"where": [f"{lv}={v}" for lv, v in pairs], "under": under, "group_by": group_by})

    @app.post("/images", response_model=ImagesOut, responses=ERRORS, summary="Add (upsert) one or many images")
    async def add_images(
        request: Request,
        images: Annotated[list[UploadFile], File(description="One or more image files.")],
        category: Annotated[list[str], Form(description="Leaf category path per image, or one for all; omitted "
                                                        "or empty: the model predicts it (flagged predicted).")] = [],  # noqa: B006
        id: Annotated[list[str], Form(description="Optional id per image (default: SHA-256 of the bytes).")] = [],  # noqa: B006
        meta: Annotated[list[str], Form(description="Optional JSON object per image, or one for all.")] = [],  # noqa: B006
        collection: Annotated[str | None, Form()] = None,
    ) -> ImagesOut:
        service.check_key(request)
        n = len(images)
        if n > service.settings.max_files:
            raise ApiError(413, "too_many_files", f"at most {service.settings.max_files} images per request, got {n}")
        categories = [c or None for c in _per_image("category", category, n, allow_one=True)] if category \
            else [None] * n
        ids = _per_image("id", id, n, allow_one=False) if id else [None] * n
        metas = [_json_object(m, i) for i, m in enumerate(_per_image("meta", meta, n, allow_one=True))] if meta \
            else [{}] * n
        index = await run_in_threadpool(service.index, collection, create=True)
        uploads = [await _read_upload(upload, service.settings.max_upload_bytes) for upload in images]
        results = await run_in_threadpool(_add, service, index, images, uploads, categories, ids, metas)
        service.changed(collection)
        counts = Counter(r.status for r in results)
        body = ImagesOut(stored=counts["stored"], updated=counts["updated"], failed=counts["failed"],
                         duplicates=counts["duplicate"],
                         predicted=sum(1 for r in results if r.predicted_path),
                         count=await run_in_threadpool(index.store.count), results=results)
        if counts["failed"] == n:
            first = results[0].reason or "failed"
            stages = {r.stage for r in results}
            status, code = {frozenset({"decode"}): (415, "not_an_image"),
                            frozenset({"too_large"}): (413, "too_many_pixels")}.get(frozenset(stages), (422, "rejected"))
            return JSONResponse({"error": {"status": status, "code": code, "message": first},
                                 "results": [r.model_dump() for r in results]}, status_code=status)
        return body

    # Ids are opaque text ('/', '?', '%' included): in a path they are percent-encoded
    # (image_url does it), and the `path` convertor hands the whole decoded rest over.
    @app.get("/images/{image_id:path}", response_model=HitOut, responses=ERRORS, summary="One stored image's record")
    async def get_image(request: Request, image_id: str, collection: str | None = None) -> HitOut:
        index = await run_in_threadpool(service.index, collection)
        found = await run_in_threadpool(index.store.get, [image_id])
        if not found:
            raise ApiError(404, "not_found", f"no image with id {image_id!r} in collection {index.store.collection!r}")
        return _hit_out(service, request, found[0])

    @app.get("/media/{image_id:path}", responses=ERRORS, summary="The stored image's file, when this service can read it")
    async def get_image_file(request: Request, image_id: str, collection: str | None = None) -> FileResponse:
        index = await run_in_threadpool(service.index, collection)
        found = await run_in_threadpool(index.store.get, [image_id])
        if not found:
            raise ApiError(404, "not_found", f"no image with id {image_id!r} in collection {index.store.collection!r}")
        path = service.servable_file(found[0].uri)
        if path is None:
            where = f" at {found[0].uri!r}" if service.is_admin(request) else ""
            raise ApiError(404, "no_file", f"image {image_id!r} lives{where} where this service does not serve "
                                           "files from (not a file under its image roots)")
        # The type of what the bytes are, never of the file's name: a GIF named page.html is a GIF.
        media_type = await run_in_threadpool(_image_type, path)
        return FileResponse(path, media_type=media_type, headers=MEDIA_HEADERS)

    @app.delete("/images/{image_id:path}", responses=ERRORS, summary="Delete one image")
    async def delete_image(request: Request, image_id: str, collection: str | None = None) -> dict:
        service.check_key(request)
        index = await run_in_threadpool(service.index, collection)
        if not await run_in_threadpool(index.store.existing_ids, [image_id]):
            raise ApiError(404, "not_found", f"no image with id {image_id!r} in collection {index.store.collection!r}")
        found = await run_in_threadpool(index.store.get, [image_id])
        await run_in_threadpool(index.store.delete, [image_id])
        await run_in_threadpool(index.store.flush)
        service.changed(collection)
        kept = service.servable_file(found[0].uri) if found else None
        if kept is not None and service.is_media(kept):  # the upload's copy goes with its record
            kept.unlink(missing_ok=True)
        return {"deleted": image_id, "count": await run_in_threadpool(index.store.count)}

    @app.get("/categories", response_model=CategoriesOut, responses=ERRORS, summary="The hierarchy with counts")
    async def categories(collection: str | None = None) -> CategoriesOut:
        counts = await run_in_threadpool(service.categories, collection)
        known = await run_in_threadpool(service.known_categories, collection)
        return CategoriesOut(levels=list(service.level_names), total=sum(counts[service.level_names[0]].values()),
                             tree=_tree(service.level_names, known, counts))

    @app.get("/healthz", responses={503: {"model": ErrorOut}}, summary="Model loaded and store reachable")
    async def healthz(request: Request) -> JSONResponse:
        try:
            count = await run_in_threadpool(service.index(None).store.count, timeout=5)
        except StoreError as exc:
            return JSONResponse({"status": "unavailable", "model": service.embedder.fingerprint,
                                 "store": service.redact(str(exc), request)}, status_code=503)
        return JSONResponse({"status": "ok", "model": service.embedder.fingerprint, "store": "reachable",
                             "count": count})

    @app.get("/stats", summary="Collection, model and request statistics")
    async def stats(request: Request, collection: str | None = None) -> dict:
        index = await run_in_threadpool(service.index, collection)
        spec = index.store.spec
        config = service.embedder.config
        return {
            "collection": index.store.collection, "uri": service.redact(index.store.settings.display_uri, request),
            "count": await run_in_threadpool(index.store.count),
            "levels": list(spec.level_names), "dim": spec.dim, "level_dims": list(spec.level_dims),
            "metric": spec.metric, "index": spec.index,
            "model": {"fingerprint": service.embedder.fingerprint, "backbone": config.backbone,
                      "image_size": config.image_size, "mode": config.mode},
            "uptime_s": round(time.time() - service.started, 1),
            "requests": {key: n for key, n in sorted(service.requests.items()) if n},
            "batching": {"max_batch": service.settings.max_batch, "window_ms": service.settings.batch_window_ms},
            "memory_budget_bytes": service.memory_budget,
            "embedding": service.embedding.stats.to_dict(),
            "searching": service.searching.stats.to_dict(),
        }

    return app


def app_from_environment() -> FastAPI:
    """Factory for `uvicorn --factory` workers: settings come from $HIERVEC_SERVE_SETTINGS (JSON)."""
    settings = ServiceSettings.from_json(os.environ["HIERVEC_SERVE_SETTINGS"])
    settings = ServiceSettings(**settings.__dict__ | {"token": os.environ.get("HIERVEC_MILVUS_TOKEN"),
                                                      "api_key": os.environ.get("HIERVEC_API_KEY")})
    return create_app(Service.open(settings))


# -- helpers ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Batch:
    """One image's vectors as a batch of one (what `ImageIndex.route` takes)."""

    one: Any

    @property
    def concat(self) -> np.ndarray:
        return self.one.concat[None, :]

    @property
    def levels(self) -> dict[str, np.ndarray]:
        return {name: v[None, :] for name, v in self.one.levels.items()}


def _stored_vectors(index: ImageIndex, record_id: str) -> Vectors:
    stored = index.store.embeddings([record_id])
    if not stored.ids:
        raise ApiError(404, "not_found", f"no image with id {record_id!r} in collection {index.store.collection!r}")
    return Vectors(stored.concat[0], {name: v[0] for name, v in stored.levels.items()})


def _page_policy(html: str) -> str:
    """A strict Content-Security-Policy for the search page: its own inline script and style (by
    hash) and nothing else; images from this service or the user's own file; no frames."""
    import base64
    import hashlib
    import re

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
            f"img-src 'self' blob:; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hiervec")
    except PackageNotFoundError:
        return "0"


def _pair(value: str) -> tuple[str, str]:
    level, sep, category = value.partition("=")
    if not sep or not level.strip() or not category:
        raise ApiError(422, "bad_filter", f"where must be LEVEL=CATEGORY, got {value!r}")
    return level.strip(), category


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


async def _read_upload(upload: UploadFile, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "too_large", f"{upload.filename or 'upload'} is larger than the {limit} byte limit")
    if not data:
        raise ApiError(415, "not_an_image", f"{upload.filename or 'upload'} is empty")
    return data


def _prepare(service: Service, data: bytes, filename: str | None):
    problem = _pixels_over(data, service.settings.max_pixels)
    if problem:
        raise ApiError(413, "too_many_pixels", f"{filename or 'upload'} {problem}")
    try:
        with service.decoding:
            return service.embedder.prepare(data)
    except ImageDecodeError as exc:
        raise ApiError(415, "not_an_image", f"{filename or 'upload'} is not an image: {exc.reason}") from None


def _return_freed_images_to_the_system() -> None:
    """Make glibc hand decoded images' memory back when they are freed.

    By default glibc raises its mmap threshold to the size of the largest block freed (up to
    32 MiB), after which decoded images come from per-thread heaps that keep the memory:
    with a thread pool of decoders the process grew by about 22 images' worth after one
    burst of 32 queries, whatever the bound on images decoded at once. A fixed threshold
    (blocks from 1 MiB are mapped and unmapped) and two arenas keep memory to what is in
    use. Elsewhere than glibc this does nothing.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_mmap_threshold, m_arena_max = -3, -8
    mallopt(m_mmap_threshold, 1 << 20)
    mallopt(m_arena_max, 2)


def _pixels_over(data: bytes, limit: int) -> str | None:
    """Why an encoded image is too large to decode here (from its header alone), or None."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (*UNREADABLE_IMAGE, Image.DecompressionBombError):  # decoding says why, with the reason
        return None
    if width * height > limit:
        return f"is {width}x{height} = {width * height} pixels; this service decodes at most {limit}"
    return None


def _add(service: Service, index: ImageIndex, uploads: Sequence[UploadFile], blobs: Sequence[bytes],
         categories: Sequence[str], ids: Sequence[str | None], metas: Sequence[dict]) -> list[ImageResult]:
    """Store the uploads through `ImageIndex.ingest`; keep each stored one's file under the media folder."""
    record_ids = [given or content_id(data) for given, data in zip(ids, blobs)]
    first: dict[str, int] = {}
    for position, rid in enumerate(record_ids):
        first.setdefault(rid, position)
    present = index.store.existing_ids(list(first))
    planned = [service.media_path(rid) for rid in record_ids]
    items = [IngestItem(data, cat, rid, meta, uri=str(path) if path else (upload.filename or ""))
             for data, cat, rid, meta, path, upload in zip(blobs, categories, record_ids, metas, planned, uploads)]
    too_big = {rid: problem for rid, data in zip(record_ids, blobs)
               if (problem := _pixels_over(data, service.settings.max_pixels))}
    unique = [items[position] for position in first.values() if items[position].id not in too_big]
    with service.writing:  # the first of each id wins, as in ingest; an upsert: a re-post updates
        report = index.ingest(unique, skip_existing=False)
    failed = {failure.id: failure for failure in report.failed}
    failed |= {rid: FailedItem("", problem, "too_large", rid) for rid, problem in too_big.items()}
    unlabelled = [item.id for item in items if item.category is None and item.id not in failed]
    guessed = {hit.id: hit.category for hit in index.store.get(unlabelled)} if unlabelled else {}
    results = []
    for position, (item, path, upload) in enumerate(zip(items, planned, uploads)):
        if first[item.id] != position:
            same = first[item.id]
            results.append(ImageResult(filename=upload.filename, id=item.id, status="duplicate",
                                       reason=f"the same image (id) as upload #{same + 1} "
                                              f"({uploads[same].filename}), which is the one stored"))
            continue
        failure = failed.get(item.id)
        if failure is not None:
            reason = f"not an image: {failure.reason}" if failure.stage == "decode" else failure.reason
            results.append(ImageResult(filename=upload.filename, id=item.id, status="failed", reason=reason,
                                       stage=failure.stage))
            continue
        if path is not None:  # the record's new bytes, also when an id is uploaded again
            _write_atomically(path, item.source)
        results.append(ImageResult(filename=upload.filename, id=item.id,
                                   status="updated" if item.id in present else "stored",
                                   predicted_path=guessed.get(item.id)))
    return results


UNREADABLE_IMAGE = (UnidentifiedImageError, OSError, ValueError, SyntaxError)  # what Pillow raises on bad headers

# Served files are images, whatever their names say; browsers must not guess otherwise, and
# a file opened on its own runs nothing.
MEDIA_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'; sandbox"}


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


def _hit_out(service: Service, request: Request, hit) -> HitOut:
    url = None
    if service.servable_file(hit.uri):
        url = str(request.url_for("get_image_file", image_id=quote(hit.id, safe="")))
    uri = hit.uri
    local = uri_path(uri) if uri else None
    if local and not service.is_admin(request):  # the file's name, not where the server keeps it
        uri = Path(local).name
    return HitOut(id=hit.id, distance=hit.distance, uri=uri, category=hit.category,
                  categories=hit.categories, meta=hit.meta, predicted=hit.predicted, confidence=hit.confidence,
                  image_url=url)


def _tree(levels: Sequence[str], known: dict[str, set[str]], counts: dict[str, Counter]) -> list[CategoryNode]:
    nodes: dict[str, CategoryNode] = {}
    roots: list[CategoryNode] = []
    for depth, level in enumerate(levels):
        for path in sorted(known[level]):
            node = CategoryNode(name=path.rsplit("/", 1)[-1], path=path, level=level, count=counts[level][path])
            nodes[path] = node
            parent = nodes.get(path.rsplit("/", 1)[0]) if depth else None
            (parent.children if parent is not None else roots).append(node)
    return roots


# -- errors and limits -------------------------------------------------------------------
def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "code": code, "message": message}}, status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    mapping: list[tuple[type[BaseException], int, str]] = [
        (ImageDecodeError, 415, "not_an_image"),
        (CollectionNotFoundError, 404, "no_collection"),
        (SchemaMismatchError, 409, "model_mismatch"),
        (FilterError, 400, "bad_filter"),
        (StoreConnectionError, 503, "store_unavailable"),
        (StoreError, 400, "store_error"),
        (EmbedderError, 400, "model_error"),
        (ValueError, 422, "bad_request"),
    ]

    service: Service = app.state.service

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, service.redact(exc.message, request))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        message = {404: f"no endpoint {request.url.path}", 405: f"{request.method} is not allowed on "
                   f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
        response = _error(exc.status_code, codes.get(exc.status_code, "http_error"), message)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in exc.errors())
        return _error(422, "invalid_request", problems)

    def handler(status: int, code: str):
        async def handle(request: Request, exc: Exception) -> JSONResponse:
            message = " ".join(str(exc).split()) or type(exc).__name__
            if isinstance(exc, SchemaMismatchError):
                message += " (the served model and this collection do not match)"
            return _error(status, code, service.redact(message, request))

        return handle

    for kind, status, code in mapping:  # the most specific class wins (Starlette looks up the MRO)
        app.add_exception_handler(kind, handler(status, code))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal", "internal error; the server log has the details")


BODY_SLACK = 64 * 1024  # form fields and multipart framing around the largest file allowed


class BodyLimit:
    """Refuse request bodies over `limit` bytes with a 413, by header or while they stream in."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit + BODY_SLACK:
            response = _error(413, "too_large", f"request body of {int(declared)} bytes is over the "
                                                f"{self.limit} byte upload limit")
            return await response(scope, receive, send)
        seen, over, answered = 0, False, False

        async def limited():
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit + BODY_SLACK:
                    over = True  # stop reading: to the app the client has gone
                    return {"type": "http.disconnect"}
            return message

        async def unless_over(message):
            nonlocal answered
            if over:
                return  # the app's answer to a cut-off body is dropped: the 413 below goes instead
            answered = True
            await send(message)

        try:
            await self.app(scope, limited, unless_over)
        except Exception:
            if not over:
                raise
        if over and not answered:
            response = _error(413, "too_large", f"request body is over the {self.limit} byte upload limit")
            await response(scope, receive, send)
