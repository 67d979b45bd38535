"""`hiervec ingest --engine ray`: the same ingest on Ray Data, on one machine or a cluster.

    >>> with ImageIndex.open(embedder, "http://milvus:19530", "images") as index:     # doctest: +SKIP
    ...     report = ray_ingest(index, items, EmbedderRecipe("model.pt"), RayOptions(actors=8))

Two passes over the files, both on Ray:
1. **identify**: Ray tasks read and hash every file (the id is the caller's, else the
   SHA-256 of the bytes); the driver then applies the single-process rules in listing
   order: unreadable files and ids that are not valid fail, an id met earlier in this
   ingest is a duplicate, and ids the collection holds already are skipped: before any
   image is decoded or embedded.
2. **embed**: an actor pool (`map_batches` with a class) holds one `Embedder` per actor
   (fractional CPUs, so a 2-core node runs two actors beside the readers; `gpus_per_actor`
   puts each on a GPU); each actor reads, decodes and embeds its batches and makes the
   collection's rows with the library's own steps (`read_item`, `decode_item`,
   `embed_rows`), so ids, categories, predictions and failures are those of
   `ImageIndex.ingest`. Rows are written by a bounded number of writers: the driver for a
   Milvus Lite file (one process owns it), a pool of writer actors for a server.

The report is the single-process one (`IngestReport`), in listing order.
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from milvus_store import CollectionSpec, DuplicateItem, FailedItem, ImageIndex, IngestItem, IngestReport
from milvus_store.index import CategoryPredictor, decode_item, embed_rows, read_item, select_new

from .errors import EngineMissingError, ScaleOutError

RAY_EXTRA = "pip install 'hiervec[ray]'"
LOCAL_GCS_WAIT_S = 120  # seconds a local Ray may take to start its GCS server
IDENTIFY_BATCH = 256  # files read and hashed per Ray task


@dataclass(frozen=True)
class EmbedderRecipe:
    """How each actor builds its `Embedder` (a checkpoint path and options: small and picklable)."""

    model_path: str
    runtime: str = "torch"
    optimize: bool = False
    device: str = "auto"
    amp: bool = False
    threads: int = 1  # torch threads per actor: actors sharing a node must not oversubscribe its cores

    def build(self):
        from embedder import Embedder
        from embedder.devices import set_threads

        set_threads(self.threads)
        return Embedder.from_checkpoint(self.model_path, optimize=self.optimize, device=self.device, amp=self.amp,
                                        runtime=self.runtime)


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide: `address` None starts a local Ray (on loopback); `actors` embedding
    actors of `cpus_per_actor` CPUs (fractions allowed) and `gpus_per_actor` GPUs; `writers`
    writer actors for a server (None: 2; a Milvus Lite file is always written by the driver)."""

    address: str | None = None
    actors: int = 1
    cpus_per_actor: float = 0.5
    gpus_per_actor: float = 0.0
    writers: int | None = None
    batch_size: int = 64
    num_cpus: int | None = None  # of a local Ray started here (None: this machine's)
    extra: dict = field(default_factory=dict)  # more ray.init arguments

    def __post_init__(self) -> None:
        if not 1 <= self.actors <= 1024:
            raise ScaleOutError(f"actors must be in [1, 1024], got {self.actors}")
        if not 0 < self.cpus_per_actor <= 256:
            raise ScaleOutError(f"cpus_per_actor must be in (0, 256], got {self.cpus_per_actor}")
        if not 0 <= self.gpus_per_actor <= 16:
            raise ScaleOutError(f"gpus_per_actor must be in [0, 16], got {self.gpus_per_actor}")
        if self.writers is not None and not 1 <= self.writers <= 64:
            raise ScaleOutError(f"writers must be in [1, 64], got {self.writers}")
        if not 1 <= self.batch_size <= 4096:
            raise ScaleOutError(f"batch_size must be in [1, 4096], got {self.batch_size}")


def import_ray():
    try:
        import ray
    except ImportError:
        raise EngineMissingError(f"--engine ray needs Ray, which is not installed: {RAY_EXTRA}") from None
    return ray


CONNECT_TIMEOUT_S = 10  # how long --ray-address may take to accept a connection


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in `timeout` seconds, with one line, when nothing answers at a Ray address (``host:port``
    or ``ray://host:port``); ``auto`` and addresses of another form are left to Ray. Ray's own
    connect waits minutes for an address that does not answer, or hangs."""
    import socket

    target = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise ScaleOutError(f"cannot reach the Ray cluster at {address!r} within {timeout:g} s: {reason}") from None


def _pack(value) -> bytes:
    """A Python object (an item, a row, a failure) as Ray Data carries it: pickled bytes, b"" for none.
    (Object columns holding None come back as NaN floats, dicts as Arrow structs.)"""
    return b"" if value is None else pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _unpack(data: bytes):
    return pickle.loads(data) if data else None


def _column(values: Sequence[bytes]) -> np.ndarray:
    column = np.empty(len(values), dtype=object)
    column[:] = list(values)
    return column


# -- pass 1: read and hash (Ray tasks) ------------------------------------------------------
def _identify(batch: dict, can_predict: bool) -> dict:
    ids, failures = [], []
    for packed in batch["item"]:
        got = read_item(_unpack(packed), can_predict)
        failed = isinstance(got, FailedItem)
        ids.append("" if failed else got[1])
        failures.append(_pack(got if failed else None))
    return {"seq": batch["seq"], "id": np.asarray(ids, dtype=object), "failure": _column(failures)}


# -- pass 2: read, decode, embed (an actor pool) --------------------------------------------
class _Embed:
    """One Ray actor: holds an `Embedder`; turns batches of (seq, item, id) into rows or failures."""

    def __init__(self, recipe: EmbedderRecipe, spec_json: str):
        self.embedder = recipe.build()
        self.spec = CollectionSpec.from_json(spec_json)
        self.can_predict = isinstance(self.embedder, CategoryPredictor)

    def __call__(self, batch: dict) -> dict:
        seqs = [int(s) for s in batch["seq"]]
        failure: dict[int, FailedItem] = {}
        prepared, seq_of = [], {}
        for seq, packed, rid in zip(seqs, batch["item"], batch["id"]):
            item = _unpack(packed)
            got = read_item(item, self.can_predict)
            if not isinstance(got, FailedItem) and got[1] != rid:
                got = FailedItem(item.name, "the file changed while it was ingested (its bytes differ from when it "
                                 "was listed); ingest again", "read", rid, item.uri)
            if not isinstance(got, FailedItem):
                got = decode_item(self.embedder, got)
            if isinstance(got, FailedItem):
                failure[seq] = got
            else:
                prepared.append(got)
                seq_of[rid] = seq
        rows, invalid = embed_rows(self.embedder, prepared, self.spec)
        row_of = {seq_of[row[self.spec.fields.id]]: row for row in rows}
        failure.update({seq_of[f.id]: f for f in invalid})
        return {"seq": np.asarray(seqs, dtype=np.int64), "row": _column([_pack(row_of.get(s)) for s in seqs]),
                "failure": _column([_pack(failure.get(s)) for s in seqs])}


class _Write:
    """One writer actor for a Milvus server: upserts the rows of the batches it is handed."""

    def __init__(self, uri: str, collection: str, token: str | None):
        from milvus_store import HierStore

        self.store = HierStore(uri, collection, token=token, create=False)

    def __call__(self, batch: dict) -> dict:
        rows = [_unpack(row) for row in batch["row"] if len(row)]
        if rows:
            self.store.upsert_rows(rows)
        return batch


# -- the driver ---------------------------------------------------------------------------
def ray_ingest(
    index: ImageIndex,
    items: Sequence[IngestItem],
    recipe: EmbedderRecipe,
    options: RayOptions = RayOptions(),
    *,
    skip_existing: bool = True,
    progress: Callable[[int], None] | None = None,
    token: str | None = None,
    write: Callable[[list[dict]], int] | None = None,
) -> IngestReport:
    """Store every item of `items` (file paths) in `index`'s collection, as `ImageIndex.ingest` does,
    with the reading and embedding on Ray (see the module's docstring). `token`: the server's,
    handed to the writer actors. `write(rows)`: the driver hands every batch's rows to it instead
    (e.g. `BulkFiles.append` for a bulk import)."""
    ray = import_ray()
    if any(isinstance(item.source, bytes) for item in items):
        raise ScaleOutError("--engine ray ingests files: give paths, not bytes")
    started = time.perf_counter()
    store = index.store
    owned = not ray.is_initialized()
    if owned:
        if not options.address:
            # A local Ray waits 30 s for its GCS server to write its port; on a loaded 2-core
            # machine it took longer once (the suite failed "Timed out waiting for file
            # .../gcs_server_port_..."). A user's own setting wins.
            os.environ.setdefault("RAY_gcs_server_port_wait_time_s", str(LOCAL_GCS_WAIT_S))
        else:
            check_reachable(options.address)
        init = {"address": options.address} if options.address else {
            "num_cpus": options.num_cpus or os.cpu_count(), "_node_ip_address": "127.0.0.1",
            "include_dashboard": False}
        ray.init(log_to_driver=False, **init, **options.extra)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.execution_options.verbose_progress = False
        report = IngestReport(seen=len(items))
        first_of: dict[str, str] = {}
        failed: dict[int, FailedItem] = {}
        duplicates: dict[int, DuplicateItem] = {}
        present: dict[int, str] = {}

        # pass 1: ids (no bytes come back to the driver)
        ids: dict[int, str] = {}
        if items:
            listing = ray.data.from_items([{"seq": i, "item": _pack(item)} for i, item in enumerate(items)])
            identified = listing.map_batches(_identify, fn_kwargs={"can_predict": index.can_predict},
                                             batch_size=IDENTIFY_BATCH, num_cpus=0.25)
            for batch in identified.iter_batches(batch_size=None, batch_format="numpy"):
                for seq, rid, failure in zip(batch["seq"], batch["id"], batch["failure"]):
                    if len(failure):
                        failed[int(seq)] = _unpack(failure)
                    else:
                        ids[int(seq)] = str(rid)

        # the single-process rules, in listing order and in its batches
        todo: list[tuple[int, IngestItem, str]] = []
        waiting: dict[str, list[int]] = {}  # id -> later items with it, settled by the first one's result
        order = sorted(ids)
        for start in range(0, len(order), options.batch_size):
            entries = [(items[seq], ids[seq], seq) for seq in order[start : start + options.batch_size]]
            fresh, skipped, found = select_new(entries, first_of, store if skip_existing else None)
            present.update({seq: rid for _, rid, seq in skipped})
            duplicates.update({entry[2]: duplicate for entry, duplicate in found})
            for item, rid, seq in fresh:
                if rid in waiting:  # the same id earlier in this ingest, not yet embedded
                    waiting[rid].append(seq)
                else:
                    waiting[rid] = []
                    todo.append((seq, item, rid))
        if progress is not None:
            progress(len(failed) + len(duplicates) + len(present))

        # pass 2: embed, then write
        fields = store.spec.fields
        stored: dict[int, tuple[str, bool]] = {}  # seq -> (id, predicted): no vectors kept here
        if todo:
            embed_ds = ray.data.from_items([{"seq": s, "item": _pack(item), "id": rid} for s, item, rid in todo])
            resources = {"num_cpus": options.cpus_per_actor}
            if options.gpus_per_actor:
                resources["num_gpus"] = options.gpus_per_actor
            embedded = embed_ds.map_batches(
                _Embed, fn_constructor_kwargs={"recipe": recipe, "spec_json": store.spec.to_json()},
                batch_size=options.batch_size, compute=ray.data.ActorPoolStrategy(size=options.actors), **resources)
            driver_writes = write is not None or store.lite  # one process owns a Lite file
            if not driver_writes:
                writers = options.writers or 2
                embedded = embedded.map_batches(
                    _Write, fn_constructor_kwargs={"uri": store.settings.uri, "collection": store.collection,
                                                   "token": token if token is not None else store.settings.token},
                    batch_size=None, compute=ray.data.ActorPoolStrategy(size=writers), num_cpus=0.1)
            for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
                rows = [_unpack(row) for row in batch["row"]]
                present_rows = [row for row in rows if row is not None]
                if driver_writes and present_rows:
                    (write or store.upsert_rows)(present_rows)
                done = 0
                for seq, row, failure in zip(batch["seq"], rows, batch["failure"]):
                    seq, failure = int(seq), _unpack(failure)
                    if row is not None:
                        stored[seq] = (row[fields.id], bool(row[fields.predicted]))
                    else:
                        failed[seq] = failure
                    done += 1 + _settle_waiting(items, seq, row, failure, waiting, duplicates, failed)
                if progress is not None:
                    progress(done)
        store.flush()

        for seq in sorted(failed):
            report.failed.append(failed[seq])
        report.duplicates = [duplicates[seq] for seq in sorted(duplicates)]
        report.skipped_present = len(present)
        report.stored = len(stored)
        report.predicted = sum(1 for _, predicted in stored.values() if predicted)
        report.ids = [present[seq] if seq in present else stored[seq][0]
                      for seq in sorted({*present, *stored})]
        report.seconds = time.perf_counter() - started
        return report
    finally:
        if owned:
            ray.shutdown()


def _settle_waiting(items, seq: int, row, failure, waiting: dict[str, list[int]], duplicates: dict, failed: dict) -> int:
    """Later items with the id of the item `seq` just finished: duplicates of it when it was stored,
    failed for the same reason when it was not (the same bytes fail the same way). How many."""
    rid = row["id"] if row is not None else failure.id
    later = waiting.pop(rid, []) if rid is not None else []
    for other in later:
        if row is not None:
            duplicates[other] = DuplicateItem(items[other].name, items[seq].name, rid)
        else:
            failed[other] = FailedItem(items[other].name, failure.reason, failure.stage, rid, items[other].uri)
    return len(later)
