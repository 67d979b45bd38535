"""The one ingest pipeline: listing -> ids -> select new -> decode -> embed -> rows -> sink.

Every face ingests through here: `hiervec ingest` and `reindex` (in this process or on Ray),
the HTTP upload route, `ImageIndex.ingest` for apps. The rules live in `IngestRun`, once:

- an item's id is the caller's, else the SHA-256 of its bytes (`read_item`);
- an id the collection holds already is skipped unread beyond its bytes ("present"), or,
  with ``on_present="replace"``, embedded again and upserted over the stored record;
- an id met earlier in the same ingest makes the later item a duplicate of the first, once
  the first is stored or found present; when the first fails, its copies fail with its reason;
- every item ends with one `ItemOutcome` (stored, present, duplicate, failed with reason and
  stage), in listing order, whatever ran the steps.

What runs the steps is plugged in: an `Executor` (`ThreadExecutor`: threads in this process;
`scaleout.RayExecutor`: Ray Data tasks and actors), and so is where rows go: a `Sink`
(`UpsertSink`: the store; `BulkSink`: bulk-import files, imported in one job at the end).

    >>> report = run_ingest(items, embedder, store)                          # doctest: +SKIP
    >>> [(o.status, o.id) for o in report.items]                             # doctest: +SKIP
    [('stored', '9f2c...'), ('duplicate', '9f2c...'), ('failed', None)]
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from hiervec_core.files import read_file, why_unreadable
from milvus_store import HierStore, QueryError, RecordError, StoreError
from milvus_store.records import Record, check_id, content_id, path_uri, printable, validate_records
from milvus_store.spec import CollectionSpec

from .protocols import CategoryPredictor, ImageEmbedder

STATUSES = ("stored", "present", "duplicate", "failed")
ON_PRESENT = ("skip", "replace")
MAX_BATCH = 4096


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
    stage: str = "invalid"  # "listing", "read" (cannot read the file), "decode" (not an image), "invalid"
    #                         (rejected record), or a caller's check's own stage (the service's "too_large")
    id: str | None = None
    uri: str | None = None  # the item's uri, when it has one (a sync keeps what is stored under it)


@dataclass(frozen=True)
class DuplicateItem:
    """An item with the same id (the same bytes, without a caller's id) as an earlier item of the same
    ingest: the first one is stored, with its category and meta; this one is not."""

    source: str
    same_as: str
    id: str


@dataclass(frozen=True)
class ItemOutcome:
    """What became of one listed item.

    `status`: ``stored`` (written; `replaced` when it overwrote a record with its id),
    ``present`` (its id was stored already: skipped), ``duplicate`` (the item at listing
    position `same_as` holds its id) or ``failed`` (`reason`, at `stage`)."""

    position: int
    source: str
    status: str
    id: str | None = None
    uri: str | None = None
    category: str | None = None  # the stored path (given, or predicted when `predicted`)
    predicted: bool = False
    replaced: bool = False
    same_as: int | None = None
    reason: str | None = None
    stage: str | None = None

    def to_dict(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if value is not None}


@dataclass
class IngestReport:
    """The counts of an ingest and, in `items`, every item's `ItemOutcome` in listing order."""

    seen: int = 0
    stored: int = 0
    predicted: int = 0  # of the stored: category path predicted by the model, not given
    skipped_present: int = 0
    failed: list[FailedItem] = field(default_factory=list)
    duplicates: list[DuplicateItem] = field(default_factory=list)
    seconds: float = 0.0
    ids: list[str] = field(default_factory=list)  # of every item now stored, new or already present
    items: list[ItemOutcome] = field(default_factory=list)
    model_recorded: str | None = None  # the model location the collection records, when this ingest wrote it
    warnings: list[str] = field(default_factory=list)
    sink: dict | None = None  # what the sink reported when it finished (a bulk import's job)

    @property
    def ok(self) -> bool:
        return not self.failed

    def add_listing_failures(self, failures: Sequence[FailedItem]) -> None:
        """Entries of the listing that never became items (a bad manifest row): counted as seen and failed."""
        self.failed = list(failures) + self.failed
        self.seen += len(failures)

    def to_dict(self, *, items: bool = False) -> dict:
        result = {
            "seen": self.seen, "stored": self.stored, "predicted": self.predicted,
            "skipped_present": self.skipped_present, "duplicates": len(self.duplicates),
            "failed": len(self.failed), "seconds": round(self.seconds, 3),
            "images_per_s": round(self.stored / self.seconds, 1) if self.seconds else None,
            "failures": [{"source": f.source, "reason": f.reason, "stage": f.stage} for f in self.failed],
            "duplicate_items": [{"source": d.source, "same_as": d.same_as, "id": d.id} for d in self.duplicates],
        }
        if self.warnings:
            result["warnings"] = list(self.warnings)
        if items:
            result["items"] = [outcome.to_dict() for outcome in self.items]
        return result


# -- the steps (pure functions: executors run them where they like) --------------------------
ItemCheck = Callable[[IngestItem, bytes], "tuple[str, str] | None"]  # (stage, reason) when an item is refused
UriOf = Callable[[IngestItem, str], "str | None"]  # the uri an item is stored under, from its id


def read_item(item: IngestItem, can_predict: bool, check: ItemCheck | None = None,
              uri_of: UriOf | None = None) -> tuple[IngestItem, str, bytes] | FailedItem:
    """An item's bytes and id (the caller's, else the content hash), or why it cannot be stored.
    `check(item, data)` may refuse it (``(stage, reason)``); `uri_of(item, id)` names where it is stored."""
    try:
        data = item.source if isinstance(item.source, bytes) else read_file(item.source)
    except OSError as exc:  # a local path or a URL alike (hiervec_core.files)
        return FailedItem(item.name, f"cannot read: {why_unreadable(exc)}", "read", uri=item.uri)
    rid = item.id if item.id is not None else content_id(data)
    try:
        check_id(rid)  # before the id reaches a query: one odd id must not fail the batch
    except RecordError as exc:
        return FailedItem(item.name, str(exc), "invalid", printable(rid), uri=item.uri)
    if item.category is None and not can_predict:
        return FailedItem(item.name, "has no category path (and the model cannot predict one)", "invalid", rid,
                          uri=item.uri)
    refused = check(item, data) if check is not None else None
    if refused is not None:
        return FailedItem(item.name, refused[1], refused[0], rid, uri=item.uri)
    if uri_of is not None:
        item = replace(item, uri=uri_of(item, rid) or item.uri)
    return item, rid, data


@dataclass
class Decoded:
    """An item whose image the embedder has prepared: ready to embed."""

    position: int
    item: IngestItem
    id: str
    data: Any


def decode_item(embedder: ImageEmbedder, position: int, read: tuple[IngestItem, str, bytes]) -> Decoded | FailedItem:
    """An item's image decoded by the embedder (`prepare`), or why not: any decoder failure is
    this file's, never the batch's."""
    item, rid, data = read
    try:
        return Decoded(position, item, rid, embedder.prepare(data))
    except Exception as exc:
        reason = getattr(exc, "reason", None) or str(exc) or exc.__class__.__name__
        return FailedItem(item.name, reason, "decode", rid, uri=item.uri)


def embed_rows(embedder: ImageEmbedder, decoded: Sequence[Decoded],
               spec: CollectionSpec) -> list[tuple[int, dict | FailedItem]]:
    """Embed decoded items and make the collection's rows (predicting the category of those without
    one): ``(position, row)`` per item, or ``(position, FailedItem)`` when its record was refused."""
    if not decoded:
        return []
    vectors = embedder.embed([d.data for d in decoded])
    unlabelled = [row for row, d in enumerate(decoded) if d.item.category is None]
    predictions = (dict(zip(unlabelled, embedder.predict_vectors(vectors.rows(unlabelled))))
                   if unlabelled else {})
    records = []
    for row, d in enumerate(decoded):
        guess = predictions.get(row)
        records.append(Record(
            category=d.item.category if guess is None else guess.path,  # a given path always wins
            vector=vectors.concat[row],
            level_vectors={level: v[row] for level, v in vectors.levels.items()},
            id=d.id,
            uri=d.item.uri or (path_uri(d.item.source) if not isinstance(d.item.source, bytes) else ""),
            meta=dict(d.item.meta),
            predicted=guess is not None,
            confidence=None if guess is None else guess.probabilities,
        ))
    rows, problems = validate_records(records, spec)
    refused = dict(problems)
    out: list[tuple[int, dict | FailedItem]] = []
    kept = iter(rows)
    for row, d in enumerate(decoded):
        if row in refused:
            out.append((d.position, FailedItem(d.item.name, refused[row], "invalid", d.id, d.item.uri)))
        else:
            out.append((d.position, next(kept)))
    return out


# -- the rules ------------------------------------------------------------------------------
class IngestRun:
    """The rules of one ingest over `items`, applied in listing order whatever runs the steps.

    An executor reports what it learns, and asks what to do next:
    `identified(position, read)` (an item's id, or why it failed before one),
    `select(positions)` (of identified items, in listing order: the ones to embed),
    `finished(position, row_or_failure)` (embedded and written, or failed). Thread-safe.
    """

    def __init__(self, items: Sequence[IngestItem], store: HierStore, *, on_present: str = "skip"):
        if on_present not in ON_PRESENT:
            raise QueryError(f"on_present must be one of {', '.join(ON_PRESENT)}, got {on_present!r}")
        self.items = list(items)
        self.store = store
        self.on_present = on_present
        self.fields = store.spec.fields
        self._leaf_field = self.fields.levels[store.spec.level_names[-1]]
        self._ids: dict[int, str] = {}
        self._outcomes: dict[int, ItemOutcome] = {}
        self._first: dict[str, int] = {}  # id -> the position that stored it or found it present
        self._waiting: dict[str, list[int]] = {}  # id in flight -> later positions with it
        self._present: set[str] = set()  # ids stored before this ingest (replace mode)
        self._lock = threading.Lock()
        self._settled = 0

    # what executors call
    def identified(self, position: int, read: tuple | FailedItem) -> None:
        with self._lock:
            if isinstance(read, FailedItem):
                self._fail(position, read)
            else:
                self._ids[position] = read[1]
                if read[0].uri != self.items[position].uri:  # named by the pipeline (uri_of)
                    self.items[position] = read[0]

    def select(self, positions: Sequence[int]) -> list[int]:
        """Of these identified positions (listing order), the ones to decode and embed; the others
        are settled now (present, duplicate) or when the item they wait for is."""
        with self._lock:
            fresh = []
            for position in positions:
                rid = self._ids[position]
                if rid in self._first:
                    self._duplicate(position, self._first[rid])
                elif rid in self._waiting:
                    self._waiting[rid].append(position)
                else:
                    fresh.append(position)
        present = set()
        if fresh:
            present = self.store.existing_ids(list(dict.fromkeys(self._ids[p] for p in fresh)))
        todo = []
        with self._lock:
            for position in fresh:
                rid = self._ids[position]
                if rid in self._first:  # the same id twice among the fresh ones
                    self._duplicate(position, self._first[rid])
                elif rid in self._waiting:
                    self._waiting[rid].append(position)
                elif rid in present and self.on_present == "skip":
                    self._first[rid] = position
                    self._settle(ItemOutcome(position, self.items[position].name, "present", rid,
                                             self.items[position].uri))
                else:
                    if rid in present:
                        self._present.add(rid)
                    self._waiting[rid] = []
                    todo.append(position)
        return todo

    def finished(self, position: int, result: dict | FailedItem) -> None:
        with self._lock:
            if isinstance(result, FailedItem):
                rid = result.id if result.id is not None else self._ids.get(position)
                self._fail(position, result)
                for later in self._waiting.pop(rid, []) if rid is not None else []:
                    item = self.items[later]  # the same bytes fail the same way
                    self._fail(later, FailedItem(item.name, result.reason, result.stage, rid, item.uri))
                return
            f = self.fields
            rid = result[f.id]
            self._first[rid] = position
            self._settle(ItemOutcome(position, self.items[position].name, "stored", rid, result[f.uri] or None,
                                     result[self._leaf_field], bool(result[f.predicted]),
                                     replaced=rid in self._present))
            for later in self._waiting.pop(rid, []):
                self._duplicate(later, position)

    def item_id(self, position: int) -> str:
        """The id an identified item was given."""
        return self._ids[position]

    def take_settled(self) -> int:
        """How many items were settled since the last call (for progress bars)."""
        with self._lock:
            settled, self._settled = self._settled, 0
            return settled

    def report(self, seconds: float) -> IngestReport:
        """The report, in listing order; every item must be settled."""
        unsettled = [p for p in range(len(self.items)) if p not in self._outcomes]
        if unsettled:  # an executor that lost items is a bug, not a partial success
            raise RuntimeError(f"ingest ended with {len(unsettled)} unsettled items, e.g. position {unsettled[0]}")
        report = IngestReport(seen=len(self.items), seconds=seconds)
        for position in range(len(self.items)):
            outcome = self._outcomes[position]
            report.items.append(outcome)
            if outcome.status == "stored":
                report.stored += 1
                report.predicted += outcome.predicted
                report.ids.append(outcome.id)
            elif outcome.status == "present":
                report.skipped_present += 1
                report.ids.append(outcome.id)
            elif outcome.status == "duplicate":
                report.duplicates.append(DuplicateItem(outcome.source, self._outcomes[outcome.same_as].source,
                                                       outcome.id))
            else:
                report.failed.append(FailedItem(outcome.source, outcome.reason, outcome.stage, outcome.id,
                                                outcome.uri))
        return report

    # inside the lock
    def _settle(self, outcome: ItemOutcome) -> None:
        self._outcomes[outcome.position] = outcome
        self._settled += 1

    def _fail(self, position: int, failure: FailedItem) -> None:
        self._settle(ItemOutcome(position, failure.source, "failed", failure.id, failure.uri,
                                 reason=failure.reason, stage=failure.stage))

    def _duplicate(self, position: int, first: int) -> None:
        self._settle(ItemOutcome(position, self.items[position].name, "duplicate", self._ids[position],
                                 self.items[position].uri, same_as=first))


# -- sinks ----------------------------------------------------------------------------------
class Sink(Protocol):
    """Where an ingest's rows go."""

    def write(self, rows: list[dict]) -> int:
        """Store rows; how many."""

    def finish(self) -> dict | None:
        """After the last write (make them searchable, import them); what to report, if anything."""


class UpsertSink:
    """Rows upserted into the store (the default). Executors with workers of their own (Ray) may
    open the same collection there (`store.settings`, `store.collection`) and upsert from them."""

    def __init__(self, store: HierStore, token: str | None = None):
        self.store = store
        self.token = token if token is not None else store.settings.token

    def write(self, rows: list[dict]) -> int:
        return self.store.upsert_rows(rows)

    def finish(self) -> None:
        self.store.flush()


class BulkSink:
    """Rows written as bulk-import files (`milvus_store.bulk.BulkFiles`), imported in one job at the end."""

    def __init__(self, store: HierStore, files, *, progress: Callable[[int], None] | None = None,
                 log: Callable[[str], None] | None = None):
        self.store, self.files, self.progress, self.log = store, files, progress, log

    def write(self, rows: list[dict]) -> int:
        return self.files.append(rows)

    def finish(self) -> dict:
        from milvus_store.bulk import import_files

        batch_files = self.files.close()
        if self.log is not None:
            self.log(f"bulk import: {self.files.rows} rows in {len(batch_files)} file(s); importing")
        return import_files(self.store, batch_files, progress=self.progress, expected_rows=self.files.rows) | {
            "files": len(batch_files)}


class CallableSink:
    """A `write(rows)` function as a sink (the store is flushed at the end)."""

    def __init__(self, store: HierStore, write: Callable[[list[dict]], int]):
        self.store, self._write = store, write

    def write(self, rows: list[dict]) -> int:
        return self._write(rows)

    def finish(self) -> None:
        self.store.flush()


# -- executors ------------------------------------------------------------------------------
class Executor(Protocol):
    """Runs the steps of an `IngestRun`: reads and identifies every item, asks the run which to
    embed, embeds them and hands their rows to the sink, and tells the run how each ended."""

    def run(self, run: IngestRun, embedder: ImageEmbedder, sink: Sink, *, check: ItemCheck | None,
            uri_of: UriOf | None, progress: Callable[[int], None] | None) -> None: ...


@dataclass(frozen=True)
class ThreadExecutor:
    """The steps in this process, in batches of `batch_size`, three stages overlapping: one thread
    reads, hashes and selects the next batch and hands its images to a pool of `workers` decoder
    threads; the caller's thread embeds the current one; a writer thread writes the previous one."""

    batch_size: int = 64
    workers: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise QueryError(f"batch_size must be in [1, {MAX_BATCH}], got {self.batch_size}")
        if self.workers is not None and not 1 <= self.workers <= 256:
            raise QueryError(f"workers must be in [1, 256], got {self.workers}")

    def run(self, run: IngestRun, embedder: ImageEmbedder, sink: Sink, *, check=None, uri_of=None,
            progress=None) -> None:
        can_predict = isinstance(embedder, CategoryPredictor)
        spec = run.store.spec
        decoders = ThreadPoolExecutor(max_workers=self.workers or min(8, (os.cpu_count() or 1) + 2))

        def prepare(batch: list[tuple[int, IngestItem]]) -> list[Decoded]:
            read = {}
            for position, item in batch:
                got = read_item(item, can_predict, check, uri_of)
                run.identified(position, got)
                if not isinstance(got, FailedItem):
                    read[position] = got
            todo = run.select(list(read))
            decoded = []
            for result in decoders.map(lambda p: decode_item(embedder, p, read[p]), todo) if todo else ():
                if isinstance(result, FailedItem):
                    run.finished(todo[len(decoded)], result)
                    decoded.append(None)
                else:
                    decoded.append(result)
            return [d for d in decoded if d is not None]

        def write(embedded: list[tuple[int, dict | FailedItem]]) -> list[tuple[int, dict | FailedItem]]:
            rows = [result for _, result in embedded if not isinstance(result, FailedItem)]
            if rows:
                sink.write(rows)
            return embedded

        def settle(written: Future) -> None:
            for position, result in written.result():
                run.finished(position, result)
            if progress is not None:
                progress(run.take_settled())

        with decoders, ThreadPoolExecutor(max_workers=1) as stage, ThreadPoolExecutor(max_workers=1) as writer:
            pending: Future | None = None
            writing: Future | None = None

            def embed_and_write(decoded: list[Decoded]) -> None:
                nonlocal writing
                embedded = embed_rows(embedder, decoded, spec)
                if writing is not None:
                    settle(writing)
                writing = writer.submit(write, embedded)

            for batch in _batches(enumerate(run.items), self.batch_size):
                ready = stage.submit(prepare, batch)
                if pending is not None:
                    embed_and_write(pending.result())
                pending = ready
            if pending is not None:
                embed_and_write(pending.result())
            if writing is not None:
                settle(writing)
            elif progress is not None:
                progress(run.take_settled())


def run_ingest(
    items: Iterable[IngestItem],
    embedder: ImageEmbedder,
    store: HierStore,
    *,
    executor: Executor | None = None,
    sink: Sink | None = None,
    on_present: str = "skip",
    check: ItemCheck | None = None,
    uri_of: UriOf | None = None,
    progress: Callable[[int], None] | None = None,
    record_model: bool = True,
) -> IngestReport:
    """Store every item of `items` that decodes into `store`; report every item's outcome.

    `executor` runs the steps (default `ThreadExecutor()`), `sink` takes the rows (default
    `UpsertSink(store)`; the store still says which ids are present). `on_present`: ``skip``
    ids already stored (re-running never re-embeds) or ``replace`` them (an upload's upsert).
    `check(item, data)` refuses an item with ``(stage, reason)``; `uri_of(item, id)` names the
    uri it is stored under. `progress(n)` is called with the items settled since its last call.
    With `record_model`, the collection records where `embedder` lives (its ``location``,
    when it has one) so searches can load it; a store that cannot is a warning, not a failure.
    """
    items = list(items)
    started = time.perf_counter()
    run = IngestRun(items, store, on_present=on_present)
    sink = sink if sink is not None else UpsertSink(store)
    (executor or ThreadExecutor()).run(run, embedder, sink, check=check, uri_of=uri_of, progress=progress)
    finished = sink.finish()
    report = run.report(time.perf_counter() - started)
    report.sink = finished
    location = getattr(embedder, "location", None)
    if record_model and location:
        try:
            store.record_model(str(location))
            report.model_recorded = str(location)
        except StoreError as exc:
            report.warnings.append(f"the collection does not record its model ({exc}); searches must name it")
    return report


def _batches(entries: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for entry in entries:
        batch.append(entry)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
