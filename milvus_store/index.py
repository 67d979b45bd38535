"""`ImageIndex`: images in, hits out. Composes a `HierStore` with any `ImageEmbedder`.

Batching, content-hash ids, skip-if-present and the per-file error report live here,
once, for the CLI, the HTTP service and apps alike. The embedder is anything with the
small `ImageEmbedder` protocol (`embedder.Embedder` is one), so this module never
imports torch.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .errors import FilterError
from .filters import Predicted, Under, WhereInput, both
from .records import Hit, Record, check_id, content_id, path_uri, printable, validate_records
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

    def embed(self, prepared: Sequence[Any]) -> Any:
        """Vectors of prepared images: an object with ``.levels`` ({level: (n, d)}) and ``.concat`` ((n, D))."""

    # Optional: `predict_vectors(levels, concat) -> [prediction]`, each with `.path` and
    # `.probabilities` ({level: p}). With it, images without a category path get the
    # model's prediction, flagged as predicted; without it they are refused.


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


@dataclass(frozen=True)
class Route:
    """How one query was routed: its predicted path, and the subtree searched (None: everywhere)."""

    prediction: Any  # .path, .probabilities
    level: str
    min_confidence: float
    within: str | None  # the predicted category at `level` when confident enough

    @property
    def routed(self) -> bool:
        return self.within is not None

    def to_dict(self) -> dict:
        return {"level": self.level, "min_confidence": self.min_confidence, "routed": self.routed,
                "within": self.within, "predicted_path": self.prediction.path,
                "probabilities": dict(self.prediction.probabilities)}


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
    >>> index.search(["query.jpg"], k=5, where=under("clothing"))             # doctest: +SKIP
    """

    def __init__(self, store: HierStore, embedder: ImageEmbedder):
        self.store = store
        self.embedder = embedder

    @classmethod
    def open(
        cls,
        embedder: ImageEmbedder,
        uri: str | os.PathLike | None = None,
        collection: str = "images",
        *,
        index: str | None = None,
        metric: str = "L2",
        create: bool = True,
        **connection,
    ) -> ImageIndex:
        """Open (or create) the collection for `embedder`; a collection of another model is refused."""
        spec = CollectionSpec(tuple(embedder.level_names), embedder.dim, tuple(embedder.level_dims), metric, index)
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
    ) -> IngestReport:
        """Store every item that decodes; list the others with their reason.

        Files are read and decoded in a thread pool while the previous batch is embedded;
        ids already stored are skipped without decoding (re-running never duplicates);
        the collection is flushed at the end so searches use the built index. Items
        with the id of an earlier item of the same call (the same bytes, when ids are
        content hashes) are not stored: the first wins, and the report lists the others
        under `duplicates`, whatever the batch size.
        `progress(n)` is called with the number of items finished in each batch.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be positive, got {workers}")
        report = IngestReport()
        started = time.perf_counter()
        # One thread prepares the next batch (reads, ids, skip-if-present) and hands its
        # images to the decode pool while this thread embeds and writes the current one.
        decoders = ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 1) + 2))
        with decoders, ThreadPoolExecutor(max_workers=1) as stage:
            pending: Future | None = None
            first_of: dict[str, str] = {}  # id -> the item that stored it or found it present (one prepare at a time)
            for batch in _batches(items, batch_size):
                ready = stage.submit(self._prepare_batch, batch, skip_existing, decoders, first_of)
                if pending is not None:
                    self._store_batch(pending.result(), report, progress)
                pending = ready
            if pending is not None:
                self._store_batch(pending.result(), report, progress)
        self.store.flush()
        report.seconds = time.perf_counter() - started
        return report

    def _prepare_batch(self, batch: list[IngestItem], skip_existing: bool, pool: ThreadPoolExecutor,
                       first_of: dict[str, str]):
        """Read, hash and decode a batch: (prepared, ids already present, failures, duplicates, seen)."""
        failures, loaded, duplicates = [], [], []
        for item in batch:
            try:
                data = item.source if isinstance(item.source, bytes) else _read(item.source)
            except OSError as exc:
                failures.append(FailedItem(item.name, f"cannot read: {exc.strerror or exc}", "read"))
                continue
            if item.category is None and not self.can_predict:
                failures.append(FailedItem(item.name, "has no category path (and the model cannot predict one)",
                                           "invalid", item.id))
                continue
            rid = item.id if item.id is not None else content_id(data)
            try:
                check_id(rid)  # before the id reaches a query: one odd id must not fail the batch
            except ValueError as exc:
                failures.append(FailedItem(item.name, str(exc), "invalid", printable(rid)))
                continue
            if rid in first_of:  # an earlier item with this id is stored or present: no need to decode
                duplicates.append(DuplicateItem(item.name, first_of[rid], rid))
                continue
            loaded.append((item, rid, data))
        present = self.store.existing_ids([rid for _, rid, _ in loaded]) if skip_existing and loaded else set()
        todo, skipped = [], []
        for item, rid, data in loaded:
            if rid not in present:
                todo.append((item, rid, data))
            elif rid in first_of:
                duplicates.append(DuplicateItem(item.name, first_of[rid], rid))
            else:
                first_of[rid] = item.name
                skipped.append(rid)
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
        item, rid, data = entry
        try:
            return _Prepared(item, rid, self.embedder.prepare(data))
        except Exception as exc:  # any decoder failure is this file's, never the batch's
            reason = getattr(exc, "reason", None) or str(exc) or exc.__class__.__name__
            return FailedItem(item.name, reason, "decode", rid)

    def _store_batch(self, prepared_batch, report: IngestReport, progress) -> None:
        prepared, skipped, failures, duplicates, seen = prepared_batch
        report.seen += seen
        report.skipped_present += len(skipped)
        report.ids += skipped
        report.failed += failures
        report.duplicates += duplicates
        if prepared:
            vectors = self.embedder.embed([p.data for p in prepared])
            unlabelled = [row for row, p in enumerate(prepared) if p.item.category is None]
            predictions = dict(zip(unlabelled, self._predict(vectors, unlabelled))) if unlabelled else {}
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
            rows, problems = validate_records(records, self.store.spec)
            report.failed += [FailedItem(prepared[i].item.name, reason, "invalid", prepared[i].id) for i, reason in problems]
            report.stored += self.store.upsert_rows(rows)
            report.predicted += sum(1 for row in rows if row[self.store.spec.fields.predicted])
            report.ids += [row[self.store.spec.fields.id] for row in rows]
        if progress is not None:
            progress(seen)

    @property
    def can_predict(self) -> bool:
        return callable(getattr(self.embedder, "predict_vectors", None))

    def _predict(self, vectors, rows: list[int]) -> list:
        levels = {level: v[rows] for level, v in vectors.levels.items()}
        return self.embedder.predict_vectors(levels, vectors.concat[rows])

    # -- search --------------------------------------------------------------------------
    def embed(self, images: Sequence[Any]):
        return self.embedder.embed([self.embedder.prepare(image) for image in images])

    def search(
        self,
        images: Sequence[Any],
        k: int = 10,
        *,
        level: str | None = None,
        where: WhereInput = None,
        group_by: str | None = None,
        group_size: int = 1,
    ) -> list[list[Hit]]:
        """Hits for each query image (path, bytes or PIL image), on the image or one level's vector."""
        vectors = self.embed(images)
        query = vectors.concat if level is None else _level_vectors(vectors, level)
        return self.store.search(query, k, level=level, where=where, group_by=group_by, group_size=group_size)

    def route(self, vectors, auto: str, min_confidence: float) -> list[Route]:
        """Each query's predicted path, and the category at level `auto` to search within when its
        probability there is at least `min_confidence`."""
        if not self.can_predict:
            raise FilterError("this model cannot predict categories, so it cannot route queries")
        if auto not in self.store.spec.level_names:
            raise FilterError(f"unknown level {auto!r} to route at; levels are {', '.join(self.store.spec.level_names)}")
        if not 0 <= min_confidence <= 1:
            raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
        depth = self.store.spec.level_names.index(auto) + 1
        routes = []
        for guess in self._predict(vectors, list(range(len(vectors.concat)))):
            confident = guess.probabilities[auto] >= min_confidence
            within = "/".join(guess.path.split("/")[:depth]) if confident else None
            routes.append(Route(guess, auto, min_confidence, within))
        return routes

    def search_routed(
        self,
        images: Sequence[Any],
        k: int = 10,
        *,
        auto: str,
        min_confidence: float = 0.5,
        level: str | None = None,
        where: WhereInput = None,
        group_by: str | None = None,
        group_size: int = 1,
    ) -> list[tuple[Route, list[Hit]]]:
        """Like `search`, but each query searches only within its predicted category at level `auto`
        when the prediction is confident enough there, and everywhere otherwise."""
        vectors = self.embed(images)
        query = vectors.concat if level is None else _level_vectors(vectors, level)
        results = []
        for row, route in enumerate(self.route(vectors, auto, min_confidence)):
            routed = where if route.within is None else both(where, Under(route.within))
            hits = self.store.search(query[row : row + 1], k, level=level, where=routed, group_by=group_by,
                                     group_size=group_size)[0]
            results.append((route, hits))
        return results

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
            raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
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


def _level_vectors(vectors, level: str):
    if level not in vectors.levels:
        raise FilterError(f"unknown level {level!r}; the model's levels are {', '.join(vectors.levels) or 'none (flat)'}")
    return vectors.levels[level]


def _read(path: str | os.PathLike) -> bytes:
    """The file's bytes; a FIFO, socket or device is refused before opening (reading one could block forever)."""
    with open(path, "rb", opener=_regular_file_opener) as fh:
        return fh.read()


def _regular_file_opener(path: str, flags: int) -> int:
    fd = os.open(path, flags | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return fd


def _batches(items: Iterable[IngestItem], size: int) -> Iterator[list[IngestItem]]:
    batch: list[IngestItem] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
