"""Re-embed a collection's images with another model: the items an ingest into a new collection takes.

`stored_items` turns every stored row into an `IngestItem`: its file (the stored ``uri``, or
the same relative path under a new root when the files moved), its id (kept: content-hash
ids stay what they were, as the bytes are the same), its category when it was given (a
predicted one is left to the new model to predict again) and its meta. `ImageIndex.ingest`
(or the Ray engine) then embeds them into the new collection, skipping the ids already
there, so an interrupted reindex resumes where it stopped.

    >>> with HierStore(uri, "shop", create=False) as old, ImageIndex.open(new_model, uri, "shop_v2") as new:  # doctest: +SKIP
    ...     report = new.ingest(stored_items(old))
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from milvus_store import HierStore, StoreError
from milvus_store.records import path_uri, uri_path

from .ingest import IngestItem


def stored_root(store: HierStore) -> str | None:
    """The deepest folder holding every stored local file (None when none is local)."""
    folders = set()
    for hit in store.iterate(None, output=[store.spec.fields.uri]):
        path = uri_path(hit.uri or "")
        if path:
            folders.add(os.path.dirname(path))
    return os.path.commonpath(sorted(folders)) if folders else None


def stored_items(store: HierStore, *, source: str | os.PathLike | None = None,
                 root: str | None = None) -> Iterator[IngestItem]:
    """Every stored image as an item to embed again. With `source`, a local file stored under
    `root` (default: `stored_root`) is read from the same relative path under `source`, and
    the new collection stores that new location."""
    if source is not None:
        root = root or stored_root(store)
        if root is None:
            raise StoreError("no stored image is a local file: a new source folder has nothing to stand in for")
    fields = store.spec.fields
    leaf = fields.levels[store.spec.level_names[-1]]
    output = [fields.uri, fields.meta, leaf, fields.predicted]
    for hit in store.iterate(None, output=output):
        uri = hit.uri or ""
        path = uri_path(uri)
        where: str | os.PathLike = uri if path is None else path
        if source is not None and path is not None:
            relative = os.path.relpath(path, root)
            if not relative.startswith(os.pardir):
                where = os.path.join(os.fspath(source), relative)
                uri = path_uri(where)
        if not uri:
            where = f"<no uri stored for {hit.id}>"  # read fails, and the report names the id
        yield IngestItem(where, None if hit.predicted else hit.category, hit.id, dict(hit.meta), uri or None,
                         origin=f"id {hit.id}")
