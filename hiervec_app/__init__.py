"""The application room: images in, hits out, between the faces and the storage adapter.

`ImageIndex` (a `HierStore` plus the model that fills it), the one ingest pipeline
(`run_ingest`: ids, skip-if-present, duplicates, per-item outcomes; executors and sinks
plugged in), `SearchRequest`, relabel, `stored_items` (reindex) and leave-one-out
evaluation. Imports `milvus_store` and `hiervec_core`, never torch or a face: any model with
the `ImageEmbedder` protocol fills an index (`embedder.Embedder` is one).
"""

from hiervec_core.lazy import lazy_exports

_EXPORTS = {
    "ON_PRESENT": ".ingest",
    "STATUSES": ".ingest",
    "BulkSink": ".ingest",
    "CallableSink": ".ingest",
    "Decoded": ".ingest",
    "DuplicateItem": ".ingest",
    "Executor": ".ingest",
    "FailedItem": ".ingest",
    "IngestItem": ".ingest",
    "IngestReport": ".ingest",
    "IngestRun": ".ingest",
    "ItemOutcome": ".ingest",
    "Sink": ".ingest",
    "ThreadExecutor": ".ingest",
    "UpsertSink": ".ingest",
    "decode_item": ".ingest",
    "embed_rows": ".ingest",
    "read_item": ".ingest",
    "run_ingest": ".ingest",
    "ImageIndex": ".index",
    "RelabelReport": ".index",
    "CategoryPredictor": ".protocols",
    "ImageEmbedder": ".protocols",
    "Route": ".search",
    "SearchRequest": ".search",
    "SearchResult": ".search",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "ON_PRESENT", "STATUSES", "BulkSink", "CallableSink", "CategoryPredictor", "Decoded", "DuplicateItem", "Executor",
    "FailedItem", "ImageEmbedder", "ImageIndex", "IngestItem", "IngestReport", "IngestRun", "ItemOutcome",
    "RelabelReport", "Route", "SearchRequest", "SearchResult", "Sink", "ThreadExecutor", "UpsertSink",
    "decode_item", "embed_rows", "read_item", "run_ingest",
]
