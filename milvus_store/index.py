"""`ImageIndex`: images in, hits out. Composes a `HierStore` with any `ImageEmbedder`.

Batching, content-hash ids, skip-if-present and the per-file error report live here,
once, for the CLI, the HTTP service and apps alike. The embedder is anything with the
small `ImageEmbedder` protocol (`embedder.Embedder` is one), so this module never
imports torch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from hiervec_core.files import read_file, why_unreadable
from hiervec_core.names import DEFAULT_COLLECTION
from hiervec_core.vectors import LevelVectors

from .errors import FilterError, QueryError, RecordError, RecordNotFoundError
from .filters import Predicted
from .records import Hit, Record, check_id, content_id, path_uri, printable, validate_records
from .search import Route, SearchRequest, SearchResult
from .spec import CollectionSpec
from .store import HierStore


@runtime_checkable
class ImageEmbedder(Protocol):
    """What `ImageIndex` needs from a model."""

    level_names: tuple[str, ...]
    level_dims: tuple[int, ...]  # empty when the model has only the image vector
    dim: int
    fingerprint: str

    def prepare(self, image: Any) -> Any:
        """Decode one image (bytes, path, PIL image); raise with a readable reason when it cannot."""

    def embed(self, prepared: Sequence[Any]) -> LevelVectors:
        """The vectors of prepared images."""


@runtime_checkable
class CategoryPredictor(Protocol):
    """A model that also predicts category paths (`embedder.Embedder` is one). With it, images
    without a category path get the model's prediction, flagged as predicted; queries can be
    routed to their predicted category; stored predictions can be redone (`relabel`)."""

    categories: Mapping[str, Collection[str]]  # level -> the category paths the model knows

    def predict_vectors(self, vectors: LevelVectors) -> list:
        """One prediction per row, each with ``.path`` and ``.probabilities`` ({level: p})."""


@dataclass(frozen=True)
class IngestItem:
    """One image to store: a file path (or bytes with a `uri`), its leaf category path, optional id and meta."""

    source: str | os.PathLike | bytes
    category: str | None
    id: str | None = None
    meta: Mapping = field(default_factory=dict)
    uri: str | None = None
    origin: str | None = None  # where the item was listed, e.g. a manifest row "m.csv:7"

    @property
    def name(self) -> str:
        """How reports name this item: its origin and uri, else its path (printable), else ``<bytes>``."""
        where = self.uri or (os.fspath(self.source) if not isinstance(self.source, bytes) else "<bytes>")
        return printable(f"{self.origin} ({where})" if self.origin else where)


@dataclass(frozen=True)
class FailedItem:
    """An item that was not stored: where it came from, why, at which stage, and its id when known."""

    source: str
    reason: str
    stage: str = "invalid"  # "listing", "read" (cannot read the file), "decode" (not an image), "invalid" (rejected record)
    id: str | None = None
    uri: str | None = None  # the item's uri, when it has one (a sync keeps what is stored under it)


@dataclass(frozen=True)
class DuplicateItem:
    """An item with the same id (the same bytes, without a caller's id) as an earlier item of the same
    ingest: the first one is stored, with its category and meta; this one is not."""

    source: str
    same_as: str
    id: str


@dataclass
class IngestReport:
    seen: int = 0
    stored: int = 0
    predicted: int = 0  # of the stored: category path predicted by the model, not given
    skipped_present: int = 0
    failed: list[FailedItem] = field(default_factory=list)
    duplicates: list[DuplicateItem] = field(default_factory=list)
    seconds: float = 0.0
    ids: list[str] = field(default_factory=list)  # of every item now stored, new or already present

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict:
        return {
            "seen": self.seen, "stored": self.stored, "predicted": self.predicted,
            "skipped_present": self.skipped_present, "duplicates": len(self.duplicates),
            "failed": len(self.failed), "seconds": round(self.seconds, 3),
            "images_per_s": round(self.stored / self.seconds, 1) if self.seconds else None,
            "failures": [{"source": f.source, "reason": f.reason, "stage": f.stage} for f in self.failed],
            "duplicate_items": [{"source": d.source, "same_as": d.same_as, "id": d.id} for d in self.duplicates],
        }


@dataclass
class RelabelReport:
    examined: int = 0  # predicted records looked at
    changed: int = 0  # written with a new path
    confirmed: int = 0  # same path again (confidences refreshed)
    kept: int = 0  # new prediction below min_confidence: old path kept

    def to_dict(self) -> dict:
        return {"examined": self.examined, "changed": self.changed, "confirmed": self.confirmed, "kept": self.kept}


@dataclass
class _Prepared:
    item: IngestItem
    id: str
    data: Any


class ImageIndex:
    """A `HierStore` plus the model that fills it.

    >>> index = ImageIndex.open(embedder, "./hiervec.db")                     # doctest: +SKIP
    >>> report = index.ingest([IngestItem("a.jpg", "clothing/tops/shirt")])   # doctest: +SKIP
    >>> [result] = index.search(SearchRequest(k=5, under="clothing"), ["query.jpg"])  # doctest: +SKIP
    >>> [hit.category for hit in result.hits]                                # doctest: +SKIP
    """

    def __init__(self, store: HierStore, embedder: ImageEmbedder):
        self.store = store
        self.embedder = embedder

    @classmethod
    def open(
        cls,
        embedder: ImageEmbedder,
        uri: str | os.PathLike | None = None,
        collection: str = DEFAULT_COLLECTION,
        *,
        index: str | None = None,
        metric: str = "L2",
        vector_levels: Sequence[str] | None = None,
        partition_key: str | None = None,
        num_partitions: int | None = None,
        create: bool = True,
        **connection,
    ) -> ImageIndex:
        """Open (or create) the collection for `embedder`; a collection of another model is refused.

        `vector_levels`, `partition_key` and `num_partitions` choose a new collection's layout
        (`CollectionSpec`); None leaves them to the target, or to what an existing one holds.
        """
        spec = CollectionSpec(tuple(embedder.level_names), embedder.dim, tuple(embedder.level_dims), metric, index,
                              vector_levels=vector_levels, partition_key=partition_key,
                              num_partitions=num_partitions)
        store = HierStore(uri, collection, spec=spec, fingerprint=embedder.fingerprint, create=create, **connection)
        return cls(store, embedder)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> ImageIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- ingest --------------------------------------------------------------------------
    def ingest(
        self,
        items: Iterable[IngestItem],
        *,
        batch_size: int = 64,
        skip_existing: bool = True,
        workers: int | None = None,
        progress: Callable[[int], None] | None = None,
        write: Callable[[list[dict]], int] | None = None,
    ) -> IngestReport:
        """Store every item that decodes; list the others with their reason.

        Files are read and decoded in a thread pool while the previous batch is embedded;
        ids already stored are skipped without decoding (re-running never duplicates);
        the collection is flushed at the end so searches use the built index. Items
        with the id of an earlier item of the same call (the same bytes, when ids are
        content hashes) are not stored: the first wins, and the report lists the others
        under `duplicates`, whatever the batch size.
        `progress(n)` is called with the number of items finished in each batch. `write(rows)`
        stores a batch's rows instead of `store.upsert_rows` (e.g. `BulkFiles.append` for a bulk
        import); the collection is still the one that says which ids are present.
        """
        if batch_size < 1:
            raise QueryError(f"batch_size must be positive, got {batch_size}")
        if workers is not None and workers < 1:
            raise QueryError(f"workers must be positive, got {workers}")
        report = IngestReport()
        started = time.perf_counter()
        # Three stages overlap: one thread prepares the next batch (reads, ids, skip-if-present)
        # and hands its images to the decode pool, this thread embeds the current one, and a
        # writer thread stores the previous one. The report is updated in batch order.
        decoders = ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 1) + 2))
        with decoders, ThreadPoolExecutor(max_workers=1) as stage, ThreadPoolExecutor(max_workers=1) as writer:
            pending: Future | None = None
            writing: Future | None = None
            first_of: dict[str, str] = {}  # id -> the item that stored it or found it present (one prepare at a time)

            def embed_and_write(prepared_batch) -> None:
                nonlocal writing
                embedded = self._embed_batch(prepared_batch)
                if writing is not None:
                    self._report_batch(writing.result(), report, progress)
                writing = writer.submit(self._write_batch, embedded, write or self.store.upsert_rows)

            for batch in _batches(items, batch_size):
                ready = stage.submit(self._prepare_batch, batch, skip_existing, decoders, first_of)
                if pending is not None:
                    embed_and_write(pending.result())
                pending = ready
            if pending is not None:
                embed_and_write(pending.result())
            if writing is not None:
                self._report_batch(writing.result(), report, progress)
        self.store.flush()
        report.seconds = time.perf_counter() - started
        return report

    def _prepare_batch(self, batch: list[IngestItem], skip_existing: bool, pool: ThreadPoolExecutor,
                       first_of: dict[str, str]):
        """Read, hash and decode a batch: (prepared, ids already present, failures, duplicates, seen)."""
        failures, loaded = [], []
        for item in batch:
            result = read_item(item, self.can_predict)
            (failures if isinstance(result, FailedItem) else loaded).append(result)
        todo, present, found = select_new(loaded, first_of, self.store if skip_existing else None)
        skipped, duplicates = [entry[1] for entry in present], [duplicate for _, duplicate in found]
        prepared = []
        for result in pool.map(self._decode, todo) if todo else ():
            if isinstance(result, FailedItem):  # a copy that also fails is reported failed too, not a duplicate
                failures.append(result)
            elif result.id in first_of:
                duplicates.append(DuplicateItem(result.item.name, first_of[result.id], result.id))
            else:
                first_of[result.id] = result.item.name
                prepared.append(result)
        return prepared, skipped, failures, duplicates, len(batch)

    def _decode(self, entry) -> _Prepared | FailedItem:
        return decode_item(self.embedder, entry)

    def _embed_batch(self, prepared_batch) -> tuple:
        """Embed a prepared batch and make its rows: (prepared batch, rows, invalid records)."""
        rows, invalid = embed_rows(self.embedder, prepared_batch[0], self.store.spec)
        return prepared_batch, rows, invalid

    def _write_batch(self, embedded: tuple, write: Callable[[list[dict]], int]) -> tuple:
        """Store an embedded batch's rows (on the writer thread): the batch and how many were stored."""
        prepared_batch, rows, invalid = embedded
        return prepared_batch, rows, invalid, write(rows) if rows else 0

    def _report_batch(self, written: tuple, report: IngestReport, progress) -> None:
        _, skipped, failures, duplicates, seen = written[0]
        rows, invalid, stored = written[1:]
        report.seen += seen
        report.skipped_present += len(skipped)
        report.ids += skipped
        report.failed += failures + invalid
        report.duplicates += duplicates
        report.stored += stored
        report.predicted += sum(1 for row in rows if row[self.store.spec.fields.predicted])
        report.ids += [row[self.store.spec.fields.id] for row in rows]
        if progress is not None:
            progress(seen)

    @property
    def can_predict(self) -> bool:
        return isinstance(self.embedder, CategoryPredictor)

    def _predict(self, vectors: LevelVectors, rows: list[int]) -> list:
        return self.embedder.predict_vectors(vectors.rows(rows))

    # -- search --------------------------------------------------------------------------
    def embed(self, images: Sequence[Any]) -> LevelVectors:
        return self.embedder.embed([self.embedder.prepare(image) for image in images])

    def search(self, request: SearchRequest, images: Sequence[Any] | None = None, *,
               known: Mapping[str, Collection[str]] | None = None) -> list[SearchResult]:
        """Run `request`: with the query `images` (paths, bytes or PIL images), or its own vectors or ids.

        Returns one `SearchResult` per query. `known` (level -> category paths) checks the
        request's `where`/`under`; by default the model's categories, and the collection's
        too when a value is not a path the model knows. Queries that end up with the same
        filter share one Milvus call.
        """
        spec = self.store.spec
        request.check(spec.level_names, vector_levels=spec.kept_vector_levels)
        if request.needs_categories or request.min_label_confidence is not None:
            known = known if known is not None else self.known_categories(request)
        request.to_filter(known)  # a bad filter fails before any image is embedded or id read
        if images is not None:
            if request.ids or request.vectors is not None:
                raise QueryError("search with query images, or with the request's ids or vectors, not both")
            request = request.with_vectors(self.embed(images))
        vectors, query_ids = self._query_vectors(request)
        if not len(vectors):
            return []
        routes: list[Route | None] = [None] * len(vectors)
        if request.auto is not None:
            if not isinstance(self.embedder, CategoryPredictor):
                raise FilterError("this model cannot predict categories, so it cannot route queries")
            routes = [request.route(guess) for guess in self.embedder.predict_vectors(vectors)]
        groups: dict[str, tuple[Any, list[int]]] = {}  # by the filter's repr: a Meta value may be a list
        for row, (query_id, route) in enumerate(zip(query_ids, routes)):
            where = request.to_filter(known, query_id=query_id, route=route)
            groups.setdefault(repr(where), (where, []))[1].append(row)
        hits: list[list[Hit]] = [[] for _ in range(len(vectors))]
        for where, rows in groups.values():
            for row, found in zip(rows, self._search_rows(request, vectors.rows(rows), where)):
                hits[row] = found
        return [SearchResult(h, route, query_id) for h, route, query_id in zip(hits, routes, query_ids)]

    def _query_vectors(self, request: SearchRequest) -> tuple[LevelVectors, list[str | None]]:
        if request.vectors is not None:
            return request.vectors, [None] * len(request.vectors)
        if not request.ids:
            raise QueryError("a search needs query images, vectors or stored ids")
        stored = self.store.embeddings(list(request.ids))
        missing = [i for i in request.ids if i not in set(stored.ids)]
        if missing:
            raise RecordNotFoundError(f"no image with id {printable(missing[0])!r} in collection "
                                      f"{self.store.collection!r}")
        order = {rid: row for row, rid in enumerate(stored.ids)}
        return stored.rows([order[i] for i in request.ids]), list(request.ids)

    def _search_rows(self, request: SearchRequest, vectors: LevelVectors, where) -> list[list[Hit]]:
        if request.fusion is not None:
            levels = request.fused_levels(self.store.spec.level_names)
            return self.store.hybrid_search({level: vectors.query(level) for level in levels}, request.k,
                                            ranker=request.fusion, weights=dict(request.level_weights) or None,
                                            where=where)
        return self.store.search(vectors.query(request.level), request.k, level=request.level, where=where,
                                 group_by=request.group_by, group_size=request.group_size)

    def known_categories(self, request: SearchRequest | None = None, *,
                         stored: Mapping[str, Collection[str]] | None = None) -> dict[str, set[str]]:
        """Category paths per level to check filters against: the model's, and the collection's too
        unless full paths the model knows settle every value of `request` (reading the
        collection's means reading every record, so it happens only when needed). `stored`
        (level -> the collection's category paths, e.g. a cached count) saves that read."""
        levels = self.store.spec.level_names
        given = self.embedder.categories if isinstance(self.embedder, CategoryPredictor) else {}
        model = {level: set(given.get(level, ())) for level in levels}
        if request is not None and self._settled_by(request, model):
            return model
        stored = self.store.category_counts() if stored is None else stored
        return {level: model[level] | set(stored.get(level, ())) for level in levels}

    @staticmethod
    def _settled_by(request: SearchRequest, model: Mapping[str, Collection[str]]) -> bool:
        levels = list(model)
        path = (request.under or "").strip("/")
        under_known = request.under is None or (0 < path.count("/") + 1 <= len(levels)
                                                and path in model[levels[path.count("/")]])
        return under_known and all(level in model and value in model[level] for level, value in request.where)

    # -- relabel -------------------------------------------------------------------------
    def relabel(self, *, min_confidence: float = 0.0, batch_size: int = 256,
                progress: Callable[[int], None] | None = None) -> RelabelReport:
        """Predict every stored predicted path again with this model, from the stored vectors.

        Possible without the images because the classifiers read the vectors, and valid
        because the collection's fingerprint (this model's vector fingerprint) says the
        vectors are this model's. A new prediction below `min_confidence` at the finest
        level is not written: the record keeps its path. Given paths are never touched.
        """
        if not self.can_predict:
            raise FilterError("this model cannot predict categories")
        if not 0 <= min_confidence <= 1:
            raise QueryError(f"min_confidence must be in [0, 1], got {min_confidence}")
        spec, report = self.store.spec, RelabelReport()
        leaf = spec.level_names[-1]
        batch: list[Hit] = []

        def flush() -> None:
            vectors = self.store.embeddings([hit.id for hit in batch])
            by_id = {hit.id: hit for hit in batch}
            present = [by_id[i] for i in vectors.ids]
            records = []
            for row, (hit, guess) in enumerate(zip(present, self._predict(vectors, list(range(len(present)))))):
                report.examined += 1
                if guess.probabilities[leaf] < min_confidence:
                    report.kept += 1
                    continue
                if guess.path == hit.category:
                    report.confirmed += 1
                else:
                    report.changed += 1
                records.append(Record(guess.path, vectors.concat[row],
                                      {name: v[row] for name, v in vectors.levels.items()}, id=hit.id, uri=hit.uri,
                                      meta=hit.meta, predicted=True, confidence=guess.probabilities))
            if records:
                self.store.upsert(records)
            if progress is not None:
                progress(len(batch))
            batch.clear()

        for hit in list(self.store.iterate(Predicted(True))):  # listed first: the upserts must not feed the iterator
            batch.append(hit)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
        self.store.flush()
        return report



# -- the steps of one ingest, shared by `ImageIndex.ingest` and the scale-out engines -------
def read_item(item: IngestItem, can_predict: bool) -> tuple[IngestItem, str, bytes] | FailedItem:
    """An item's bytes and id (the caller's, else the content hash), or why it cannot be stored."""
    try:
        data = item.source if isinstance(item.source, bytes) else read_file(item.source)
    except OSError as exc:  # a local path or a URL alike (hiervec_core.files)
        return FailedItem(item.name, f"cannot read: {why_unreadable(exc)}", "read", uri=item.uri)
    if item.category is None and not can_predict:
        return FailedItem(item.name, "has no category path (and the model cannot predict one)", "invalid", item.id,
                          uri=item.uri)
    rid = item.id if item.id is not None else content_id(data)
    try:
        check_id(rid)  # before the id reaches a query: one odd id must not fail the batch
    except RecordError as exc:
        return FailedItem(item.name, str(exc), "invalid", printable(rid), uri=item.uri)
    return item, rid, data


def select_new(loaded: list[tuple], first_of: dict[str, str], store: HierStore | None):
    """Sort read items, ``(item, id, ...)`` tuples, into (to embed, already stored, duplicates), each a
    list of those tuples; a duplicate comes as ``(entry, DuplicateItem)``.

    `first_of` maps each id met so far in this ingest to the item that stored it or found it
    present; an item with such an id is a duplicate and is not decoded. `store` (None: do
    not look) skips the ids it holds already."""
    todo, skipped, duplicates, fresh = [], [], [], []
    for entry in loaded:
        item, rid = entry[0], entry[1]
        if rid in first_of:
            duplicates.append((entry, DuplicateItem(item.name, first_of[rid], rid)))
        else:
            fresh.append(entry)
    present = store.existing_ids([entry[1] for entry in fresh]) if store is not None and fresh else set()
    for entry in fresh:
        item, rid = entry[0], entry[1]
        if rid not in present:
            todo.append(entry)
        elif rid in first_of:
            duplicates.append((entry, DuplicateItem(item.name, first_of[rid], rid)))
        else:
            first_of[rid] = item.name
            skipped.append(entry)
    return todo, skipped, duplicates


def decode_item(embedder: ImageEmbedder, entry: tuple) -> _Prepared | FailedItem:
    """An item's image decoded by the embedder (`prepare`), or why not: any decoder failure is
    this file's, never the batch's."""
    item, rid, data = entry
    try:
        return _Prepared(item, rid, embedder.prepare(data))
    except Exception as exc:
        reason = getattr(exc, "reason", None) or str(exc) or exc.__class__.__name__
        return FailedItem(item.name, reason, "decode", rid, uri=item.uri)


def embed_rows(embedder: ImageEmbedder, prepared: list[_Prepared], spec: CollectionSpec) -> tuple[list[dict], list]:
    """Embed decoded items and make the collection's rows (predicting the category of those without
    one): (rows, items whose records were refused)."""
    if not prepared:
        return [], []
    vectors = embedder.embed([p.data for p in prepared])
    unlabelled = [row for row, p in enumerate(prepared) if p.item.category is None]
    predictions = (dict(zip(unlabelled, embedder.predict_vectors(vectors.rows(unlabelled))))
                   if unlabelled else {})
    records = []
    for row, p in enumerate(prepared):
        guess = predictions.get(row)
        records.append(Record(
            category=p.item.category if guess is None else guess.path,  # a given path always wins
            vector=vectors.concat[row],
            level_vectors={level: v[row] for level, v in vectors.levels.items()},
            id=p.id,
            uri=p.item.uri or (path_uri(p.item.source) if not isinstance(p.item.source, bytes) else ""),
            meta=dict(p.item.meta),
            predicted=guess is not None,
            confidence=None if guess is None else guess.probabilities,
        ))
    rows, problems = validate_records(records, spec)
    return rows, [FailedItem(prepared[i].item.name, reason, "invalid", prepared[i].id, prepared[i].item.uri)
                  for i, reason in problems]


def _batches(items: Iterable[IngestItem], size: int) -> Iterator[list[IngestItem]]:
    batch: list[IngestItem] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
