"""`Service`: the loaded model, the open collections and the micro-batchers behind the app.

The model is loaded and the store opened once, by `Service.open`. The served collection may
be an alias: the service then serves the collection it points at, with the model that
collection records, as one `Generation`, and checks the alias every
`ServiceSettings.alias_check_s`. When the alias has moved (`hiervec alias set`, `hiervec
reindex --switch`), the new collection's model is loaded beside the old one and the two are
swapped in one step: a request is served by the generation that was current when it arrived
(`Service.pin`), start to end, so no response mixes the old model with the new collection,
and none fails. Concurrent queries share
forward passes and Milvus calls through two micro-batchers (`service.batching`), off the
event loop: one forward pass at a time, and two search calls that follow the forward
passes. A search is a `milvus_store.SearchRequest`, and requests that ask the same (equal
requests, whatever their query vectors) share one `ImageIndex.search` call. The same watcher
that checks the alias starts the service's own Lite process again when it has died
(`Service.keep_lite_running`).
"""

from __future__ import annotations

import functools
import hmac
import io
import logging
import os
import stat
import sys
import threading
import time
from collections import Counter
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from embedder import Embedder, ImageDecodeError
from embedder.devices import available_cpus, set_threads
from hiervec_core.vectors import LevelVectors
from milvus_store import ConnectionSettings, HierStore, LiteProcess, content_id, uri_path
from hiervec_app import ImageIndex, SearchRequest, SearchResult

from .batching import MicroBatcher
from .errors import ApiError
from .settings import ServiceSettings

CATEGORY_CACHE_S = 30.0
FILE_CHECK_CACHE_S = 30.0  # how long hits remember whether their file is served (writes forget at once)
FILE_CHECKS_KEPT = 100_000  # remembered file checks at most (about 20 MB); all are forgotten past it
BODY_SLACK = 64 * 1024  # form fields and multipart framing around the largest file allowed
UNREADABLE_IMAGE = (UnidentifiedImageError, OSError, ValueError, SyntaxError)  # what Pillow raises on bad headers
RETIRED_KEPT = 2  # generations kept open after a switch for requests still in flight (closed at the next switches)
logger = logging.getLogger("hiervec.service")


@dataclass(eq=False)  # hashed by identity: a micro-batch key
class Generation:
    """The model and the collection it serves, swapped together when the served alias moves."""

    embedder: Embedder
    index: ImageIndex  # opened on the collection itself, never through the alias

    @property
    def collection(self) -> str:
        return self.index.store.collection


_PINNED: ContextVar[Generation | None] = ContextVar("hiervec_generation", default=None)


class Service:
    """The loaded model, the open collections and the micro-batchers behind the app."""

    def __init__(self, settings: ServiceSettings, embedder: Embedder, index: ImageIndex,
                 lite: LiteProcess | None = None):
        self.settings = settings
        self.generation = Generation(embedder, index)
        self._retired: list[Generation] = []
        self.lite = lite  # the Lite process this service started and stops, if any
        self.store_uri = _store_uri(settings, lite)
        window = settings.batch_window_ms / 1000
        # One forward pass per generation's model: a batch is keyed by the generation.
        self.embedding = MicroBatcher(lambda generation, images: generation.embedder.embed(images).split(),
                                      max_batch=settings.max_batch, window_s=window, name="embed")
        # Searches follow the forward passes and run two calls at once (see `service.batching`).
        self.searching = MicroBatcher(self._search_batch, max_batch=settings.max_batch, window_s=window,
                                      name="search", calls=2, after=self.embedding)
        self.started = time.time()
        self._closed = False
        self.requests: Counter = Counter()
        self._indexes: dict[tuple[str, str], ImageIndex] = {}  # (collection, model fingerprint) -> other collections
        self._categories: dict[str, tuple[float, dict[str, Counter]]] = {}
        self._file_checks: dict[str, tuple[float, bool]] = {}  # uri -> (when, shown)
        self._real_folders: dict[str, tuple[float, str]] = {}  # folder -> (when, its realpath)
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
        self._stop = threading.Event()
        self._lite_failures, self._lite_retry_at = 0, 0.0
        self._watcher = None
        if settings.alias_check_s > 0:
            self._watcher = threading.Thread(target=self._follow_alias, name="hiervec-watch", daemon=True)
            self._watcher.start()

    @classmethod
    def open(cls, settings: ServiceSettings) -> Service:
        """Load the model and open (or create) the default collection: mismatches fail here, before serving."""
        for name in ("pymilvus", "pymilvus.milvus_client", "milvus_lite"):  # errors reach clients as JSON, once
            logging.getLogger(name).setLevel(logging.CRITICAL)
        if settings.threads is not None:
            set_threads(settings.threads)  # the service, not the library, owns the process's thread count
        _return_freed_images_to_the_system()
        embedder = Embedder.from_checkpoint(settings.model, optimize=settings.optimize, device=settings.device,
                                            amp=settings.amp, runtime=settings.runtime)
        lite = None
        if settings.store_uri is None and settings.lite_process and ConnectionSettings.resolve(settings.uri).is_local:
            lite = LiteProcess(settings.uri).start()
        try:
            index = ImageIndex.open(embedder, _store_uri(settings, lite),
                                    settings.collection, **settings.store_connection)
            if index.store.target != settings.collection:  # an alias: serve its collection, pinned
                target = index.store.target
                index.close()
                index = ImageIndex.open(embedder, _store_uri(settings, lite), target, **settings.store_connection,
                                        create=False)
        except BaseException:
            if lite is not None:
                lite.stop()
            raise
        return cls(settings, embedder, index, lite)

    def close(self) -> None:
        """Stop the batchers, close the collections and stop the Lite process this service started (once)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=30)
        self.embedding.close()
        self.searching.close()
        for index in [*self._indexes.values(), *(g.index for g in (*self._retired, self.generation))]:
            index.close()
        if self.lite is not None:
            self.lite.stop()

    # -- the served generation -------------------------------------------------------------
    def pin(self):
        """Serve the calling request by the current generation, start to end (contextvars follow it into
        threads); returns the token `unpin` takes."""
        return _PINNED.set(self.generation)

    @staticmethod
    def unpin(token) -> None:
        _PINNED.reset(token)

    def current(self) -> Generation:
        """The generation serving this request: the one it was pinned to, else the latest."""
        return _PINNED.get() or self.generation

    @property
    def embedder(self) -> Embedder:
        return self.current().embedder

    def _follow_alias(self) -> None:
        while not self._stop.wait(self.settings.alias_check_s):
            self.keep_lite_running()
            try:
                self.follow_alias()
            except Exception as exc:  # keep serving the current generation; try again next time
                logger.error("following alias %r failed, still serving %r: %s", self.settings.collection,
                             self.generation.collection, exc)

    def keep_lite_running(self) -> bool:
        """Start the service's own Lite process again, on its port, if it died (requests meanwhile answer
        503). Attempts back off (1 s, 2 s, 4 s, ... at most a minute apart), each logged; returns whether
        it started one now."""
        lite = self.lite
        if lite is None or lite.running or self._closed or time.monotonic() < self._lite_retry_at:
            return False
        code = lite.process.poll() if lite.process is not None else None
        try:
            lite.restart()
        except Exception as exc:
            self._lite_failures += 1
            wait = min(60.0, 2.0 ** (self._lite_failures - 1))
            self._lite_retry_at = time.monotonic() + wait
            logger.error("the Milvus Lite process serving %s died (exit %s) and did not start again (attempt %d): "
                         "%s; next attempt in %.0f s", lite.path, code, self._lite_failures, exc, wait)
            return False
        logger.warning("the Milvus Lite process serving %s died (exit %s): started again on %s", lite.path, code,
                       lite.uri)
        self._lite_failures, self._lite_retry_at = 0, 0.0
        return True

    def follow_alias(self) -> bool:
        """Switch to the collection the served alias points at now, with the model it records (loaded
        beside the current one first). Returns whether it switched."""
        current = self.generation
        target = current.index.store.resolve(self.settings.collection)
        if target == current.collection:
            return False
        with HierStore(self.store_uri, target, **self.settings.store_connection, create=False) as probe:
            recorded, location, fingerprint = probe.model_location, probe.model_file(), probe.fingerprint
        if fingerprint == current.embedder.fingerprint:
            embedder = current.embedder
        elif recorded is None:
            raise ValueError(f"collection {target!r} records no model to load (ingest or reindex records it)")
        elif location is None:
            raise ValueError(f"collection {target!r} records the model {recorded!r}, which is not on this machine "
                             f"(nor under $HIERVEC_MODEL_ROOT as {probe.model_relative!r})")
        else:
            settings = self.settings
            embedder = Embedder.from_checkpoint(location, optimize=settings.optimize, device=settings.device,
                                                amp=settings.amp, runtime=settings.runtime)
        index = ImageIndex.open(embedder, self.store_uri, target, **self.settings.store_connection, create=False)
        with self._lock:
            self.generation = Generation(embedder, index)
            self._retired.append(current)
            closing = self._retired[:-RETIRED_KEPT]
            self._retired = self._retired[-RETIRED_KEPT:]
        self._categories.clear()
        for old in closing:
            old.index.close()
        logger.info("alias %r moved: now serving %r (model %s), was %r (model %s)", self.settings.collection,
                    target, embedder.fingerprint, current.collection, current.embedder.fingerprint)
        return True

    # -- search ------------------------------------------------------------------------------
    async def embed(self, prepared) -> LevelVectors:
        """One prepared image's vectors (a batch of one), in a forward pass shared with concurrent queries."""
        return await self.embedding.submit(prepared, key=self.current())

    async def search(self, request: SearchRequest, collection: str | None = None) -> SearchResult:
        """One query's result; concurrent requests that ask the same share one `ImageIndex.search` call."""
        other = collection if collection not in (None, self.settings.collection) else None
        return await self.searching.submit(request, key=(self.current(), other, request))

    def _search_batch(self, key: tuple[Generation, str | None, SearchRequest],
                      requests: list[SearchRequest]) -> list[SearchResult]:
        generation, collection, request = key
        token = _PINNED.set(generation)  # this thread serves the requests' generation
        try:
            return self._search_with(collection, request, requests)
        finally:
            _PINNED.reset(token)

    def _search_with(self, collection: str | None, request: SearchRequest,
                     requests: list[SearchRequest]) -> list[SearchResult]:
        index = self.index(collection)
        known = self.known_categories(collection) if request.needs_categories else None
        if request.vectors is None:  # by stored id: equal requests ask the same question
            [result] = index.search(request, known=known)
            return [result] * len(requests)
        stacked = LevelVectors.stack(r.vectors for r in requests)
        return index.search(request.with_vectors(stacked), known=known)

    def prepare(self, data: bytes, filename: str | None):
        """Decode one uploaded query image, at most one per CPU at a time; an error the client can read."""
        problem = pixels_over(data, self.settings.max_pixels)
        if problem:
            raise ApiError(413, "too_many_pixels", f"{filename or 'upload'} {problem}")
        try:
            with self.decoding:
                return self.embedder.prepare(data)
        except ImageDecodeError as exc:
            raise ApiError(415, "not_an_image", f"{filename or 'upload'} is not an image: {exc.reason}") from None

    # -- collections and categories ----------------------------------------------------------
    @property
    def level_names(self) -> tuple[str, ...]:
        return tuple(self.embedder.level_names)

    def index(self, collection: str | None, *, create: bool = False) -> ImageIndex:
        """The open collection `collection` (default: the served one, as this request's generation
        serves it), opened with that generation's model on first use."""
        generation = self.current()
        name = collection or self.settings.collection
        if name in (self.settings.collection, generation.collection):
            return generation.index
        key = (name, generation.embedder.fingerprint)
        with self._lock:
            if key not in self._indexes:
                self._indexes[key] = ImageIndex.open(generation.embedder, self.store_uri, name,
                                                     **self.settings.store_connection, create=create)
            return self._indexes[key]

    def categories(self, collection: str | None) -> dict[str, Counter]:
        """Stored records per category path at each level (cached briefly; writes clear it).

        Counting reads every record, so concurrent callers wait for one count, not one each.
        """
        name = self.index(collection).store.collection
        with self._counting:
            cached = self._categories.get(name)
            if cached is not None and time.monotonic() - cached[0] < CATEGORY_CACHE_S:
                return cached[1]
            counts = self.index(name).store.category_counts()
            self._categories[name] = (time.monotonic(), counts)
            return counts

    def changed(self, collection: str | None) -> None:
        self._categories.pop(self.index(collection).store.collection, None)
        self._file_checks.clear()  # an upload's file was kept or deleted
        self._real_folders.clear()

    def known_categories(self, collection: str | None) -> dict[str, set[str]]:
        """Category paths per level: the model's hierarchy and whatever the collection holds (counted
        at most every `CATEGORY_CACHE_S`)."""
        return self.index(collection).known_categories(stored=self.categories(collection))

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

    # -- who asks ----------------------------------------------------------------------------
    def has_key(self, headers) -> bool:
        """Whether `headers` carry the API key (X-API-Key, or Authorization: Bearer)."""
        given = headers.get("x-api-key") or ""
        auth = headers.get("authorization", "")
        if not given and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return self.key_matches(given)

    def key_matches(self, given: str) -> bool:
        """Whether `given` is the API key (compared in constant time)."""
        return hmac.compare_digest(given.encode(), (self.settings.api_key or "").encode())

    def is_admin(self, headers) -> bool:
        """A request with the API key sees the server's own paths; nobody does when no key is set."""
        return bool(self.settings.api_key) and self.has_key(headers)

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

    @functools.cached_property
    def store_addresses(self) -> list[str]:
        """The Milvus addresses behind the service (a server's, its own Lite process's), as they appear in
        messages (user:password masked or not), longest first: anonymous clients do not see them."""
        found = set()
        for uri in (self.settings.uri, self.store_uri):
            if uri and "://" in str(uri):
                resolved = ConnectionSettings.resolve(str(uri))
                found |= {str(uri), resolved.uri, resolved.display_uri}
        return sorted(found, key=len, reverse=True)

    def redact(self, text: str, headers) -> str:
        """`text` with the server's paths and the store's address replaced, unless the request is an admin's."""
        if self.is_admin(headers):
            return text
        for address in self.store_addresses:
            text = text.replace(address, "<store>")
        for path in self.server_paths:
            text = text.replace(path, "<server path>")
        return text

    # -- files -------------------------------------------------------------------------------
    def servable_file(self, uri: str) -> Path | None:
        """The stored `uri` as a local file under one of the image roots, else None."""
        local = uri_path(uri) if uri else None
        if not local:
            return None
        path = Path(local).resolve()
        if not path.is_file() or not any(path.is_relative_to(root) for root in self.image_roots):
            return None
        return path

    def shows_file(self, uri: str) -> bool:
        """Whether a hit with `uri` links to its file: what `servable_file` says, remembered for
        `FILE_CHECK_CACHE_S` per uri, and worked out with one `lstat` for a regular file in a
        folder seen before. A `realpath` walks every folder of the path, and ten of them a
        response took over a third of the event loop's time under load. The link checks again
        when it is followed."""
        now = time.monotonic()
        seen = self._file_checks.get(uri)
        if seen is not None and now - seen[0] < FILE_CHECK_CACHE_S:
            return seen[1]
        if len(self._file_checks) >= FILE_CHECKS_KEPT:
            self._file_checks.clear()
        local = uri_path(uri) if uri else None
        try:
            mode = os.lstat(local).st_mode if local else 0
        except (OSError, ValueError):
            mode = 0
        if stat.S_ISREG(mode):  # not a link: its real path is its real folder's plus its name
            folder, name = os.path.split(local)
            real = Path(self._real_folder(folder or ".", now)) / name
            served = any(real.is_relative_to(root) for root in self.image_roots)
        else:
            served = stat.S_ISLNK(mode) and self.servable_file(uri) is not None
        self._file_checks[uri] = (now, served)
        return served

    def _real_folder(self, folder: str, now: float) -> str:
        seen = self._real_folders.get(folder)
        if seen is None or now - seen[0] >= FILE_CHECK_CACHE_S:
            if len(self._real_folders) >= FILE_CHECKS_KEPT:
                self._real_folders.clear()
            seen = self._real_folders[folder] = (now, os.path.realpath(folder))
        return seen[1]

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


def _store_uri(settings: ServiceSettings, lite: LiteProcess | None) -> str | None:
    """Where the service reaches its store: the workers' shared Lite process, its own, or `uri`."""
    return settings.store_uri or (lite.uri if lite is not None else settings.uri)


def pixels_over(data: bytes, limit: int) -> str | None:
    """Why an encoded image is too large to decode here (from its header alone), or None."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (*UNREADABLE_IMAGE, Image.DecompressionBombError):  # decoding says why, with the reason
        return None
    if width * height > limit:
        return f"is {width}x{height} = {width * height} pixels; this service decodes at most {limit}"
    return None


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
