"""Micro-batching: concurrent requests share one forward pass and one Milvus search call.

A CPU forward pass of 16 images costs far less than 16 passes of one, and one Milvus
search with 16 query vectors far less than 16 searches. So the service queues each
request's work and a single worker per stage takes whatever has queued up (while the
previous batch ran, or within a short window), runs it as one call on its own thread,
and hands each caller its own result. Requests only share a call when they share its
parameters (the `key`: for a search, the collection and the `SearchRequest`, which compares
without its query vectors).
The event loop never waits on the model or on Milvus.

The search stage follows the embedding stage (`after`): when it could start a call while a
forward pass is running, it waits for that pass, whose queries come to it next, and takes
them in the same call. And it runs up to two calls at once (`calls`), since a search call
mostly waits on the store (another process, or a server): while one is answered, the next
is sent. Measured together (`bench/serve_load.py`, BENCHMARKS.md): 16 clients got 15% more
queries per second and search batches of 9 instead of 6; either alone moved nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .settings import SettingsError


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0

    @property
    def mean_batch(self) -> float:
        return self.items / self.batches if self.batches else 0.0

    def to_dict(self) -> dict:
        return {"batches": self.batches, "items": self.items, "mean_batch": round(self.mean_batch, 2)}


class MicroBatcher:
    """Run `run(key, items) -> one result per item` on batches of at most `max_batch` items with equal keys.

    A batch starts with the oldest waiting item and takes every waiting item with the
    same key; it waits up to `window_s` for more only while it has room. With
    ``window_s=0`` batches form only from requests that arrived while a call ran, so a
    lone request never waits. At most `calls` batches run at once, each on its own
    thread; a batch forms only when one of them is free. With `after` (the batcher whose
    callers submit here next), a batch with room also waits for the call that one is
    running, if any, to hand out its results.
    """

    def __init__(self, run: Callable[[Hashable, list], Sequence], *, max_batch: int = 32, window_s: float = 0.0,
                 name: str = "batch", calls: int = 1, after: MicroBatcher | None = None):
        if max_batch < 1:
            raise SettingsError(f"max_batch must be positive, got {max_batch}")
        if window_s < 0:
            raise SettingsError(f"window_s must not be negative, got {window_s}")
        if not 1 <= calls <= 8:
            raise SettingsError(f"calls must be in [1, 8], got {calls}")
        self._run_batch = run
        self.max_batch = max_batch
        self.window_s = window_s
        self.calls = calls
        self.after = after
        self.stats = BatchStats()
        self._executor = ThreadPoolExecutor(max_workers=calls, thread_name_prefix=f"hiervec-{name}")
        self._waiting: list[tuple[Hashable, Any, asyncio.Future]] = []
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._free: asyncio.Semaphore | None = None  # calls that may start
        self._finished: asyncio.Event | None = None  # set each time a call has handed out its results
        self._running: set[asyncio.Task] = set()

    async def running_call_done(self) -> None:
        """Return once the call running now, if any, has handed out its results (at once when none runs)."""
        if self._running:
            self._finished.clear()
            await self._finished.wait()

    async def submit(self, item: Any, key: Hashable = None) -> Any:
        """This item's result, computed in one call with its waiting peers of the same key."""
        self._ensure_worker()
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((key, item, future))
        self._arrived.set()
        return await future

    def close(self) -> None:
        for task in [self._worker, *self._running]:
            if task is not None and not task.done():
                task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._worker is None or self._worker.done():
            self._loop, self._waiting, self._arrived = loop, [], asyncio.Event()
            self._free, self._finished, self._running = asyncio.Semaphore(self.calls), asyncio.Event(), set()
            self._worker = loop.create_task(self._work(), name="hiervec-micro-batcher")

    def _take(self) -> tuple[Hashable, list[tuple[Any, asyncio.Future]]]:
        key = self._waiting[0][0]
        batch, rest = [], []
        for entry in self._waiting:
            if entry[0] == key and len(batch) < self.max_batch:
                batch.append(entry)
            else:
                rest.append(entry)
        self._waiting = rest
        return key, [(item, future) for _, item, future in batch if not future.cancelled()]

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._free.acquire()  # while every call is busy, items keep gathering for the next batch
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            if self.window_s and len(self._waiting) < self.max_batch:
                deadline = loop.time() + self.window_s
                while len(self._waiting) < self.max_batch and loop.time() < deadline:
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
                    except asyncio.TimeoutError:  # an alias of TimeoutError from Python 3.11
                        break
            if self.after is not None and len(self._waiting) < self.max_batch:
                await self.after.running_call_done()  # its callers submit here as they get their results
            key, batch = self._take()
            if not batch:
                self._free.release()
                continue
            task = loop.create_task(self._call(loop, key, batch), name="hiervec-micro-batch")
            self._running.add(task)

    async def _call(self, loop: asyncio.AbstractEventLoop, key: Hashable,
                    batch: list[tuple[Any, asyncio.Future]]) -> None:
        try:
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, key, [i for i, _ in batch])
            except Exception as exc:  # the batch's callers each get the error; the worker lives on
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                return
            self.stats.batches += 1
            self.stats.items += len(batch)
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
        finally:  # the callers were woken first: they submit downstream before a batcher after this one looks
            self._running.discard(asyncio.current_task())
            self._free.release()
            self._finished.set()
