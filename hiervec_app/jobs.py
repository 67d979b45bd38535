"""Whole jobs the faces run in one call: a source's listing into a collection (`ingest_listing`),
optionally removing what the source no longer lists (the sync rules), and a dry run of that sync.

    >>> listing = Listing.of(embedder.read_source("photos/"), folder="photos/")       # doctest: +SKIP
    >>> with ImageIndex.open(embedder, "./hiervec.db") as index:                      # doctest: +SKIP
    ...     result = ingest_listing(index, listing, sync=True)
    >>> result.report.stored, result.count, result.synced["removed"]                  # doctest: +SKIP
    (120, 480, 3)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from milvus_store import HierStore
from milvus_store.records import path_uri, printable
from milvus_store.sync import apply_sync, plan_sync

from .index import ImageIndex
from .ingest import Executor, FailedItem, IngestItem, IngestReport, Sink, read_item


def stored_uri(path: str | os.PathLike) -> str:
    """What a listed image's ``uri`` field holds: its absolute path, or its URL as listed."""
    return path_uri(path if isinstance(path, str) else Path(path).resolve())


@dataclass
class Listing:
    """What a source lists: the items to ingest, the entries that could not become items (a bad
    manifest row, a file at the wrong depth), and the folder listed when the source is one (a
    sync removes only what was stored from under it; None: a manifest or a dataset, the whole
    collection)."""

    items: list[IngestItem]
    failures: list[FailedItem] = field(default_factory=list)
    folder: Path | None = None
    name: str = "the source"  # how messages name the source

    @classmethod
    def of(cls, listing, folder: str | os.PathLike | None = None, name: str | None = None) -> Listing:
        """From a source listing (`embedder.SourceListing`, or anything with ``items`` of ``path``,
        ``category``, ``id``, ``meta``, ``origin`` and ``failures`` of ``source``, ``reason``)."""
        items = [IngestItem(item.path, item.category, item.id, item.meta, stored_uri(item.path), item.origin)
                 for item in listing.items]
        failures = [FailedItem(printable(f.source), printable(f.reason), "listing") for f in listing.failures]
        return cls(items, failures, Path(folder) if folder is not None else None,
                   name if name is not None else str(folder or "the source"))

    def sync_scope(self) -> tuple[str | None, set[str], str | None]:
        """(the uri prefix a sync may remove under, None for the whole collection; the uris kept whatever
        their ids; why a sync must not run, or None). A listing with errors never syncs, except a
        folder's files that were not listed as images (wrong depth, odd names): what is stored of
        them is kept."""
        unlisted = [f for f in self.failures if f.reason.startswith("cannot list")]
        if unlisted or (self.failures and self.folder is None):
            first = (unlisted or self.failures)[0]
            return None, set(), (f"the listing of {self.name!r} had {len(self.failures)} error(s) (first: {first.source}: "
                                 f"{first.reason}): nothing was removed")
        kept = {path_uri(form) for f in self.failures
                for form in (Path(f.source).absolute(), Path(f.source).resolve())}
        return (stored_uri(self.folder) if self.folder is not None else None), kept, None


@dataclass
class IngestResult:
    """An ingest job's report, and the collection after it."""

    report: IngestReport
    collection: str
    count: int
    synced: dict | None = None

    def to_dict(self, *, items: bool = False) -> dict:
        result = self.report.to_dict(items=items) | {"collection": self.collection, "count": self.count}
        if self.synced is not None:
            result["sync"] = self.synced
        if self.report.sink is not None:
            result["bulk_import"] = self.report.sink
        return result


def ingest_listing(index: ImageIndex, listing: Listing, *, executor: Executor | None = None,
                   sink: Sink | None = None, sync: bool = False,
                   progress: Callable[[int], None] | None = None) -> IngestResult:
    """Ingest `listing` through the pipeline (`ImageIndex.ingest`); its failures count as seen and
    failed. With `sync`, then remove what the source no longer lists (`sync_store`)."""
    report = index.ingest(listing.items, executor=executor, sink=sink, progress=progress)
    report.add_listing_failures(listing.failures)
    synced = sync_store(index.store, listing, report) if sync else None
    return IngestResult(report, index.store.collection, index.store.count(), synced)


def sync_store(store: HierStore, listing: Listing, report: IngestReport) -> dict:
    """Remove what the source no longer lists (`milvus_store.sync`): an image stays when this ingest
    stored or found its id, or could not read (or store) what its uri holds now."""
    under, kept, refused = listing.sync_scope()
    if refused:
        return {"removed": 0, "refused": refused}
    plan = plan_sync(store, report.ids, kept | {f.uri for f in report.failed if f.uri}, under_uri=under)
    return plan.to_dict() | {"removed": apply_sync(store, plan)}


def sync_dry_run(store: HierStore, listing: Listing) -> dict:
    """What a sync would remove, reading every listed file for its id; nothing is written."""
    under, kept, refused = listing.sync_scope()
    if refused:
        return {"removed": 0, "refused": refused, "dry_run": True}
    ids = []
    for item in listing.items:
        read = read_item(item, True)
        if isinstance(read, FailedItem):
            kept.add(read.uri)
        else:
            ids.append(read[1])
    return plan_sync(store, ids, kept, under_uri=under).to_dict() | {"removed": 0, "dry_run": True}

