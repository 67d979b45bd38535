"""Copy a collection between Milvus deployments: how a catalogue graduates from Milvus Lite
on a laptop to a server or a cluster.

    >>> with HierStore("catalogue.db", "images", create=False) as source:        # doctest: +SKIP
    ...     with open_copy_target(source, "http://milvus:19530", "images") as target:
    ...         report = copy_collection(source, target)
    >>> report.copied, report.target_count                                     # doctest: +SKIP
    (120000, 120000)

The target is created with the source's levels, sizes, metric, index, level vector fields
and model fingerprint (index and level vectors can be changed, e.g. to the image vector
only for a server that takes few vector fields); the partition key defaults to the
target's own default (the coarsest level on servers), and the stored model location is carried over. Rows
are copied field for field (ids, categories, predicted flags, confidences, meta, vectors);
a level vector the target keeps but the source did not is read back from the image vector.
Ids already in the target are skipped, so an interrupted copy resumes where it stopped,
and the counts are checked at the end.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np

from hiervec_core.vectors import levels_from_concat

from .connection import ConnectionSettings
from .errors import CollectionNotFoundError, StoreError
from .spec import CollectionSpec
from .store import HierStore

MAX_COPY_BATCH = 16_384  # Milvus's query-iterator batch limit


@dataclass
class CopyReport:
    """What one copy did: rows seen in the source, written, skipped as already in the target."""

    source_count: int
    copied: int
    skipped: int
    target_count: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return round((self.copied + self.skipped) / self.seconds, 1) if self.seconds else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"rows_per_s": self.rows_per_s}


def target_spec(source: CollectionSpec, *, index: str | None = None, vector_levels: tuple[str, ...] | None = None,
                partition_key: str | None = None, num_partitions: int | None = None) -> CollectionSpec:
    """The spec a copy of `source` asks for: the same levels, sizes and metric; the index as given,
    else the source's; layout and partition key as given, else left to the target (its defaults
    when it creates the collection, whatever it holds when it exists)."""
    return replace(source, index=index or source.index, vector_levels=vector_levels, partition_key=partition_key,
                   num_partitions=num_partitions)


def open_copy_target(source: HierStore, uri: str, collection: str, *, token: str | None = None,
                     index: str | None = None, vector_levels: tuple[str, ...] | None = None,
                     partition_key: str | None = None, num_partitions: int | None = None,
                     timeout: float | None = None) -> HierStore:
    """The target collection for a copy of `source`: created like it (and checked against it, with
    its model fingerprint, when it exists: a resumed copy keeps the layout it was started with),
    with the source's model location recorded."""
    settings = ConnectionSettings.resolve(uri, token=token)
    same_place = (os.path.realpath(settings.uri) == os.path.realpath(source.settings.uri) if settings.is_local
                  else settings.uri.rstrip("/") == source.settings.uri.rstrip("/"))
    if same_place and source.collection == collection:
        raise StoreError(f"copy: source and target are the same collection {collection!r} at "
                         f"{source.settings.display_uri!r}")
    spec = target_spec(source.spec, index=index, vector_levels=vector_levels, partition_key=partition_key,
                       num_partitions=num_partitions)
    try:  # an existing target (a copy resumed) keeps its layout unless one is asked for
        target = HierStore(uri, collection, spec=spec, fingerprint=source.fingerprint, token=token, timeout=timeout,
                           create=False)
    except CollectionNotFoundError:  # a new one keeps the source's level vectors unless told otherwise
        if vector_levels is None:
            spec = replace(spec, vector_levels=source.spec.kept_vector_levels)
        target = HierStore(uri, collection, spec=spec, fingerprint=source.fingerprint, token=token, timeout=timeout)
    try:
        if source.model_location:
            target.record_model(source.model_location, relative=source.model_relative)
    except BaseException:
        target.close()
        raise
    return target


def copy_collection(source: HierStore, target: HierStore, *, batch_size: int = 1000,
                    progress: Callable[[int], None] | None = None, timeout: float | None = None) -> CopyReport:
    """Copy every row of `source` into `target` (see the module's docstring); `progress` gets the
    number of rows handled after each batch."""
    if not 1 <= batch_size <= MAX_COPY_BATCH:
        raise StoreError(f"batch_size must be in [1, {MAX_COPY_BATCH}], got {batch_size}")
    src, dst = source.spec, target.spec
    if (src.level_names, src.dim, src.level_dims, src.metric) != (dst.level_names, dst.dim, dst.level_dims,
                                                                 dst.metric):
        raise StoreError(f"copy: collection {target.collection!r} holds levels {dst.level_names} of sizes "
                         f"{dst.level_dims} ({dst.metric}), not the source's {src.level_names} of sizes "
                         f"{src.level_dims} ({src.metric})")
    started = time.perf_counter()
    source_count = source.count(timeout=timeout)
    copied = skipped = 0
    fields = dst.fields
    for rows in source.row_batches(batch_size=batch_size, timeout=timeout):
        present = target.existing_ids([row[fields.id] for row in rows], timeout=timeout)
        fresh = [row for row in rows if row[fields.id] not in present]
        if fresh:
            target.upsert_rows(convert_rows(fresh, src, dst), batch_size=len(fresh), timeout=timeout)
        copied += len(fresh)
        skipped += len(rows) - len(fresh)
        if progress is not None:
            progress(len(rows))
    target.flush(timeout=timeout)
    target_count = target.count(timeout=timeout)
    report = CopyReport(source_count, copied, skipped, target_count, time.perf_counter() - started)
    if copied + skipped != source_count or target_count < source_count:
        raise StoreError(f"copy incomplete: the source holds {source_count} rows, {copied + skipped} were read "
                         f"({copied} written, {skipped} already there) and the target holds {target_count}; "
                         f"run the copy again to resume")
    return report


def convert_rows(rows: list[dict], source: CollectionSpec, target: CollectionSpec) -> list[dict]:
    """Source rows in the target's fields: the same scalars and image vector; the target's level
    vector fields from the source's, or read back from the image vector where the source kept none."""
    src_fields, dst_fields = source.fields, target.fields
    keep = [dst_fields.id, *dst_fields.scalars, dst_fields.vector]
    out = [{name: row[name] for name in keep} for row in rows]
    derived = [level for level in dst_fields.level_vectors if level not in src_fields.level_vectors]
    if derived:
        concat = np.asarray([row[src_fields.vector] for row in rows], dtype=np.float32)
        dims = dict(zip(source.level_names, source.level_dims))
        levels = levels_from_concat(concat, dims)
    for i, (row, new) in enumerate(zip(rows, out)):
        for level, field in dst_fields.level_vectors.items():
            new[field] = levels[level][i].tolist() if level in derived else row[src_fields.level_vectors[level]]
    return out
