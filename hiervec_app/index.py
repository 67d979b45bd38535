"""`ImageIndex`: images in, hits out. Composes a `HierStore` with any `ImageEmbedder`.

Ingest (`hiervec_app.ingest`: ids, skip-if-present, duplicates, per-item outcomes), search
(`SearchRequest`) and relabel, for the CLI, the HTTP service and apps alike. The embedder is
anything with the small `ImageEmbedder` protocol (`embedder.Embedder` is one), so this
module never imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hiervec_core.names import DEFAULT_COLLECTION
from hiervec_core.vectors import LevelVectors
from milvus_store import CollectionSpec, FilterError, HierStore, Hit, Predicted, QueryError, Record, RecordNotFoundError
from milvus_store.records import printable

from .ingest import (
    CallableSink, Executor, IngestItem, IngestReport, ItemCheck, Sink, ThreadExecutor, UriOf, run_ingest,
)
from .protocols import CategoryPredictor, ImageEmbedder
from .search import Route, SearchRequest, SearchResult


@dataclass
class RelabelReport:
    examined: int = 0  # predicted records looked at
    changed: int = 0  # written with a new path
    confirmed: int = 0  # same path again (confidences refreshed)
    kept: int = 0  # new prediction below min_confidence: old path kept

    def to_dict(self) -> dict:
        return {"examined": self.examined, "changed": self.changed, "confirmed": self.confirmed, "kept": self.kept}


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
        executor: Executor | None = None,
        sink: Sink | None = None,
        check: ItemCheck | None = None,
        uri_of: UriOf | None = None,
        record_model: bool = True,
    ) -> IngestReport:
        """Store every item that decodes; report every item's outcome (`hiervec_app.ingest.run_ingest`).

        Files are read and decoded in a thread pool while the previous batch is embedded (or on
        Ray, with `executor=scaleout.RayExecutor(...)`); ids already stored are skipped without
        decoding (re-running never duplicates), or replaced when `skip_existing` is False; items
        with the id of an earlier item of the same call are duplicates of it, whatever the batch
        size. `progress(n)` is called with the items settled since its last call. `write(rows)`
        (or a `sink`) stores the rows instead of `store.upsert_rows` (e.g. `BulkFiles.append`).
        """
        if write is not None and sink is not None:
            raise QueryError("give write or sink, not both")
        if write is not None:
            sink = CallableSink(self.store, write)
        return run_ingest(items, self.embedder, self.store,
                          executor=executor or ThreadExecutor(batch_size, workers), sink=sink,
                          on_present="skip" if skip_existing else "replace", check=check, uri_of=uri_of,
                          progress=progress, record_model=record_model)

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
