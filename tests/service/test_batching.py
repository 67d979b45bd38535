"""The micro-batcher: concurrent callers share calls with equal keys and each gets exactly its own result."""

import asyncio

import numpy as np
import pytest

from service import MicroBatcher
from hiervec_core.vectors import LevelVectors

pytestmark = pytest.mark.unit


class Recorder:
    """Answers item i with (key, 10 * i); records each call's key, items and thread."""

    def __init__(self, fail_on=None):
        self.calls, self.threads, self.fail_on = [], set(), fail_on

    def __call__(self, key, items):
        import threading

        self.calls.append((key, list(items)))
        self.threads.add(threading.current_thread().name)
        if self.fail_on in items:
            raise RuntimeError(f"cannot run {self.fail_on}")
        return [(key, 10 * i) for i in items]


def run(batcher, coroutine):
    try:
        return asyncio.run(coroutine)
    finally:
        batcher.close()


def test_concurrent_requests_share_calls_up_to_max_batch():
    model = Recorder()
    batcher = MicroBatcher(model, max_batch=8, window_s=0.05, name="t")
    async def together():
        return await asyncio.gather(*(batcher.submit(i) for i in range(20)))

    results = run(batcher, together())
    assert results == [(None, 10 * i) for i in range(20)]
    assert [len(items) for _, items in model.calls] == [8, 8, 4]
    assert (batcher.stats.batches, batcher.stats.items, batcher.stats.mean_batch) == (3, 20, 20 / 3)
    assert model.threads == {"hiervec-t_0"}  # never the event loop's thread


def test_only_equal_keys_share_a_call_and_order_is_kept():
    model = Recorder()
    batcher = MicroBatcher(model, max_batch=32, window_s=0.05)
    keys = ["a", "b", "a", "c", "b", "a"]
    async def together():
        return await asyncio.gather(*(batcher.submit(i, key=k) for i, k in enumerate(keys)))

    results = run(batcher, together())
    assert results == [(k, 10 * i) for i, k in enumerate(keys)]
    assert model.calls == [("a", [0, 2, 5]), ("b", [1, 4]), ("c", [3])]


def test_without_a_window_a_lone_request_goes_at_once():
    model = Recorder()
    batcher = MicroBatcher(model, max_batch=32, window_s=0.0)

    async def one_after_another():
        return [await batcher.submit(1), await batcher.submit(2)]

    assert run(batcher, one_after_another()) == [(None, 10), (None, 20)]
    assert model.calls == [(None, [1]), (None, [2])]


def test_a_failing_call_fails_its_callers_and_the_worker_lives_on():
    model = Recorder(fail_on=3)
    batcher = MicroBatcher(model, max_batch=4, window_s=0.05)

    async def main():
        failed = await asyncio.gather(*(batcher.submit(i) for i in range(4)), return_exceptions=True)
        return failed, await batcher.submit(7)

    failed, after = run(batcher, main())
    assert all(isinstance(r, RuntimeError) and "cannot run 3" in str(r) for r in failed)
    assert after == (None, 70)


def test_up_to_calls_batches_run_at_once_and_the_rest_gather_meanwhile():
    import threading

    started, release = threading.Semaphore(0), threading.Event()
    model = Recorder()

    def slow(key, items):
        started.release()
        release.wait(5)
        return model(key, items)

    batcher = MicroBatcher(slow, max_batch=32, calls=2)

    async def main():
        first = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
        loop = asyncio.get_running_loop()
        # the second call starts while the first still runs: two calls at once
        assert await loop.run_in_executor(None, started.acquire, True, 5)
        await asyncio.sleep(0)
        first.append(asyncio.ensure_future(batcher.submit(3)))
        assert await loop.run_in_executor(None, started.acquire, True, 5)
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in (4, 5, 6)]  # both busy: these gather
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(*first, *rest)

    assert run(batcher, main()) == [(None, 10 * i) for i in range(1, 7)]
    assert sorted(items for _, items in model.calls) == [[1, 2], [3], [4, 5, 6]]
    assert len(model.threads) == 2


@pytest.mark.parametrize("follows", [True, False])
def test_a_batcher_after_another_waits_for_its_running_call(follows):
    """Items already waiting join the results of the call running upstream in one call downstream."""
    import threading

    upstream_started, release = threading.Event(), threading.Event()

    def upstream_model(key, items):
        upstream_started.set()
        release.wait(5)
        return list(items)

    downstream_model = Recorder()
    upstream = MicroBatcher(upstream_model, max_batch=32, name="up")
    downstream = MicroBatcher(downstream_model, max_batch=32, name="down", after=upstream if follows else None)

    async def through_both(i):
        return await downstream.submit(await upstream.submit(i))

    async def main():
        piped = [asyncio.ensure_future(through_both(i)) for i in (1, 2, 3)]
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, upstream_started.wait, 5)
        direct = asyncio.ensure_future(downstream.submit(9))  # arrives while the forward pass runs
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(*piped, direct)

    try:
        assert asyncio.run(main()) == [(None, 10), (None, 20), (None, 30), (None, 90)]
    finally:
        upstream.close()
        downstream.close()
    if follows:
        assert downstream_model.calls == [(None, [9, 1, 2, 3])]
    else:
        assert downstream_model.calls == [(None, [9]), (None, [1, 2, 3])]


def test_level_vectors_split_into_each_images_rows_and_stack_back():
    values = np.arange(3, dtype=np.float32)
    out = LevelVectors({"coarse": values[:, None] * 3}, np.stack([values, 2 * values], 1))
    parts = out.split()
    assert [p.concat.tolist() for p in parts] == [[[0, 0]], [[1, 2]], [[2, 4]]]
    assert [p.levels["coarse"].tolist() for p in parts] == [[[0]], [[3]], [[6]]]
    again = LevelVectors.stack(parts[::-1])
    assert again.concat.tolist() == [[2, 4], [1, 2], [0, 0]] and again.levels["coarse"].tolist() == [[6], [3], [0]]
    with pytest.raises(ValueError, match=r"level 'coarse' must be \(3, d\), got shape \(2, 1\)"):
        LevelVectors({"coarse": np.zeros((2, 1))}, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="no vectors for level 'fine'; levels with vectors: coarse"):
        out.query("fine")


@pytest.mark.parametrize("kwargs, message", [
    ({"max_batch": 0}, "max_batch must be positive, got 0"),
    ({"window_s": -1}, "window_s must not be negative, got -1"),
    ({"calls": 0}, r"calls must be in \[1, 8\], got 0"),
])
def test_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MicroBatcher(Recorder(), **kwargs)


def test_requests_beyond_max_requests_are_answered_503_while_the_others_run():
    """The bound on requests in progress (and so on bodies held) lives in the app: a request past
    `max_requests` is answered at once with 503 and Retry-After; a freed slot serves again."""
    import asyncio
    from collections import Counter
    from types import SimpleNamespace

    from service.middleware import CountRequests

    async def scenario():
        release = asyncio.Event()

        async def app(scope, receive, send):
            await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        service = SimpleNamespace(settings=SimpleNamespace(max_requests=2), requests=Counter(), pin=lambda: None,
                                  unpin=lambda token: None)
        guarded = CountRequests(app, service)

        async def call():
            sent = []

            async def send(message):
                sent.append(message)

            async def receive():
                return {"type": "http.request", "body": b""}

            await guarded({"type": "http", "method": "GET", "path": "/x", "headers": []}, receive, send)
            return sent

        running = [asyncio.create_task(call()) for _ in range(2)]
        await asyncio.sleep(0.05)
        refused = await call()  # both slots are taken
        release.set()
        done = await asyncio.gather(*running)
        again = await call()
        return refused, done, again, service.requests

    refused, done, again, counts = asyncio.run(scenario())
    assert refused[0]["status"] == 503 and (b"retry-after", b"1") in refused[0]["headers"]
    assert b"too_many_requests" in refused[1]["body"] and b"2 requests are in progress" in refused[1]["body"]
    assert [d[0]["status"] for d in done] == [200, 200] and again[0]["status"] == 200
    assert counts["refused (too many requests)"] == 1
