"""`hiervec ingest --engine ray`: the one ingest pipeline's steps on Ray Data, on one machine or a cluster.

    >>> with ImageIndex.open(embedder, "http://milvus:19530", "images") as index:     # doctest: +SKIP
    ...     report = index.ingest(items, executor=RayExecutor(EmbedderRecipe("model.pt"), RayOptions(actors=8)))

`RayExecutor` is an executor of `hiervec_app.ingest`: the rules (ids, skip-if-present,
duplicates, per-item outcomes) are the pipeline's `IngestRun`, on the driver; Ray runs the
steps, in two passes over the files:
1. **identify**: Ray tasks read and hash every file (`read_item`); the driver hands the
   ids to the run, in listing order and in batches, and it says which to embed: before any
   image is decoded or embedded.
2. **embed**: an actor pool (`map_batches` with a class) holds one `Embedder` per actor
   (fractional CPUs, so a 2-core node runs two actors beside the readers; `gpus_per_actor`
   puts each on a GPU); each actor reads, decodes and embeds its batches and makes the
   collection's rows (`read_item`, `decode_item`, `embed_rows`). Rows go to the sink: a
   pool of writer actors when it is an upsert into a Milvus server, else the driver (a
   Milvus Lite file, which one process owns; bulk-import files).

The report is the pipeline's (`IngestReport`, with every item's outcome in listing order).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from hiervec_app import (
    CategoryPredictor, FailedItem, ImageIndex, IngestItem, IngestReport, IngestRun, UpsertSink, decode_item, embed_rows,
    read_item,
)
from milvus_store import CollectionSpec

from .errors import EngineMissingError, ScaleOutError
from .options import EmbedderRecipe, RayOptions

RAY_EXTRA = "pip install 'hiervec[ray]'"
LOCAL_GCS_WAIT_S = 120  # seconds a local Ray may take to start its GCS server
LOCAL_STARTS = 3  # times a local Ray that did not come up in time is started
# How Ray says a node it started did not come up in time: its GCS server wrote no port file within
# RAY_gcs_server_port_wait_time_s, or its raylet did not register within the 30 s that Ray hard-codes
# (ray/_private/node.py). Both happened on a loaded 2-core machine, and a fresh start then worked.
STARTUP_TIMEOUTS = ("Timed out waiting for file", "timed out during startup")
IDENTIFY_BATCH = 256  # files read and hashed per Ray task


def import_ray():
    try:
        import ray
    except ImportError:
        raise EngineMissingError(f"the Ray engine needs Ray, which is not installed: {RAY_EXTRA}") from None
    return ray


def started_again_after_timeouts(start: Callable, stop: Callable[[BaseException], None], attempts: int = LOCAL_STARTS):
    """What `start()` returns, started again (at most `attempts` times in all) when Ray says a node did not
    come up in time (`STARTUP_TIMEOUTS`), after `stop(error)` stopped what that start left running. Any
    other failure, or the last attempt's, is raised."""
    for attempt in range(attempts):
        try:
            return start()
        except Exception as exc:
            if attempt == attempts - 1 or not any(text in str(exc) for text in STARTUP_TIMEOUTS):
                raise
            stop(exc)


def start_local_ray(ray, attempts: int = LOCAL_STARTS, **init) -> None:
    """`ray.init(**init)` for a Ray of this process's own, started again when it did not come up in time
    (`started_again_after_timeouts`); the processes the failed start left running (its GCS server,
    raylet, reaper) are stopped first. Its GCS server may take `LOCAL_GCS_WAIT_S` to start (Ray's
    default, 30 s, was too short once on a loaded 2-core machine); a user's own
    RAY_gcs_server_port_wait_time_s wins."""
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", str(LOCAL_GCS_WAIT_S))

    def stop(exc: BaseException) -> None:
        stop_failed_start(exc)
        ray.shutdown()

    started_again_after_timeouts(lambda: ray.init(**init), stop, attempts)


def stop_failed_start(exc: BaseException) -> int:
    """Stop the processes of the Ray node whose start raised `exc`: `ray.init` keeps no handle on a node
    that failed in its constructor, so it is found in the traceback (the frame whose `self` can
    `kill_all_processes`). Returns how many nodes were stopped (0 when Ray's internals changed: the
    processes then end with this process, as Ray's reaper or fate-sharing ends them)."""
    import traceback

    stopped = 0
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        node = frame.f_locals.get("self")
        if frame.f_code.co_name == "__init__" and callable(getattr(node, "kill_all_processes", None)):
            node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
            stopped += 1
    return stopped


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
def _identify(batch: dict, can_predict: bool, check, uri_of) -> dict:
    ids, read = [], []
    for packed in batch["item"]:
        got = read_item(_unpack(packed), can_predict, check, uri_of)
        failed = isinstance(got, FailedItem)
        ids.append("" if failed else got[1])
        read.append(_pack(got if failed else got[0]))  # the failure, or the item (its uri named)
    return {"seq": batch["seq"], "id": np.asarray(ids, dtype=object), "read": _column(read)}


# -- pass 2: read, decode, embed (an actor pool) --------------------------------------------
class _Embed:
    """One Ray actor: holds an `Embedder`; turns batches of (seq, item, id) into rows or failures."""

    def __init__(self, recipe: EmbedderRecipe, spec_json: str):
        self.embedder = recipe.build()
        self.spec = CollectionSpec.from_json(spec_json)
        self.can_predict = isinstance(self.embedder, CategoryPredictor)

    def __call__(self, batch: dict) -> dict:
        seqs = [int(s) for s in batch["seq"]]
        result: dict[int, dict | FailedItem] = {}
        decoded = []
        for seq, packed, rid in zip(seqs, batch["item"], batch["id"]):
            item = _unpack(packed)
            got = read_item(item, self.can_predict)
            if not isinstance(got, FailedItem) and got[1] != rid:
                got = FailedItem(item.name, "the file changed while it was ingested (its bytes differ from when it "
                                 "was listed); ingest again", "read", rid, item.uri)
            if not isinstance(got, FailedItem):
                got = decode_item(self.embedder, seq, got)
            if isinstance(got, FailedItem):
                result[seq] = got
            else:
                decoded.append(got)
        result.update(embed_rows(self.embedder, decoded, self.spec))
        rows = [result[s] if not isinstance(result[s], FailedItem) else None for s in seqs]
        failures = [result[s] if isinstance(result[s], FailedItem) else None for s in seqs]
        return {"seq": np.asarray(seqs, dtype=np.int64), "row": _column([_pack(r) for r in rows]),
                "failure": _column([_pack(f) for f in failures])}


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


# -- the executor ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RayExecutor:
    """Runs an ingest's steps on Ray (see the module's docstring): `recipe` builds each actor's
    `Embedder`, `options` say where and how wide. `check` and `uri_of` hooks must pickle."""

    recipe: EmbedderRecipe
    options: RayOptions = RayOptions()

    def run(self, run: IngestRun, embedder, sink, *, check=None, uri_of=None,
            progress: Callable[[int], None] | None = None) -> None:
        ray = import_ray()
        items, options = run.items, self.options
        if any(isinstance(item.source, bytes) for item in items):
            raise ScaleOutError("the Ray engine ingests files: give paths, not bytes")
        owned = not ray.is_initialized()
        if owned and options.address:
            check_reachable(options.address)
            ray.init(address=options.address, log_to_driver=False, **options.extra)
        elif owned:
            start_local_ray(ray, num_cpus=options.num_cpus or os.cpu_count(), _node_ip_address="127.0.0.1",
                            include_dashboard=False, log_to_driver=False, **options.extra)
        try:
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False
            context.execution_options.verbose_progress = False
            self._run(ray, run, isinstance(embedder, CategoryPredictor), sink, check, uri_of, progress)
        finally:
            if owned:
                ray.shutdown()

    def _run(self, ray, run: IngestRun, can_predict: bool, sink, check, uri_of, progress) -> None:
        items, options, store = run.items, self.options, run.store
        # pass 1: ids (no bytes come back to the driver)
        identified: list[int] = []
        if items:
            listing = ray.data.from_items([{"seq": i, "item": _pack(item)} for i, item in enumerate(items)])
            batches = listing.map_batches(_identify, fn_kwargs={"can_predict": can_predict, "check": check,
                                                                "uri_of": uri_of},
                                          batch_size=IDENTIFY_BATCH, num_cpus=0.25)
            for batch in batches.iter_batches(batch_size=None, batch_format="numpy"):
                for seq, rid, read in zip(batch["seq"], batch["id"], batch["read"]):
                    got = _unpack(read)
                    run.identified(int(seq), got if isinstance(got, FailedItem) else (got, str(rid), b""))
                    if not isinstance(got, FailedItem):
                        identified.append(int(seq))
        # the pipeline's rules, in listing order and in batches of the same size as in one process
        identified.sort()
        todo = []
        for start in range(0, len(identified), options.batch_size):
            todo += run.select(identified[start : start + options.batch_size])
        if progress is not None:
            progress(run.take_settled())

        # pass 2: embed, then write
        if todo:
            embed_ds = ray.data.from_items([{"seq": s, "item": _pack(run.items[s]), "id": run.item_id(s)}
                                            for s in todo])
            resources = {"num_cpus": options.cpus_per_actor}
            if options.gpus_per_actor:
                resources["num_gpus"] = options.gpus_per_actor
            embedded = embed_ds.map_batches(
                _Embed, fn_constructor_kwargs={"recipe": self.recipe, "spec_json": store.spec.to_json()},
                batch_size=options.batch_size, compute=ray.data.ActorPoolStrategy(size=options.actors), **resources)
            remote = isinstance(sink, UpsertSink) and not sink.store.lite  # one process owns a Lite file
            if remote:
                embedded = embedded.map_batches(
                    _Write, fn_constructor_kwargs={"uri": store.settings.uri, "collection": store.collection,
                                                   "token": sink.token},
                    batch_size=None, compute=ray.data.ActorPoolStrategy(size=options.writers or 2), num_cpus=0.1)
            for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
                rows = [_unpack(row) for row in batch["row"]]
                present_rows = [row for row in rows if row is not None]
                if not remote and present_rows:
                    sink.write(present_rows)
                for seq, row, failure in zip(batch["seq"], rows, batch["failure"]):
                    run.finished(int(seq), row if row is not None else _unpack(failure))
                if progress is not None:
                    progress(run.take_settled())


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
    sink=None,
    record_model: bool = True,
) -> IngestReport:
    """`index.ingest(items)` with its steps on Ray (`RayExecutor`). `token`: the server's, handed to
    the writer actors. `write(rows)` or `sink`: where the rows go instead of an upsert."""
    if sink is None and write is None and token is not None:
        sink = UpsertSink(index.store, token)
    return index.ingest(items, executor=RayExecutor(recipe, options), skip_existing=skip_existing,
                        progress=progress, write=write, sink=sink, record_model=record_model)
