"""Load on `hiervec serve`: QPS and latency of POST /search under concurrent clients, on loopback.

    .venv/bin/python bench/serve_load.py            # the demo model and test split (run `make demo` first)
    .venv/bin/python bench/serve_load.py --model M.pt --images DIR --requests 600 --concurrency 1,4,16
    .venv/bin/python bench/serve_load.py --smoke    # seconds, a tiny untrained model: CI keeps it from rotting
    .venv/bin/python bench/serve_load.py --uri http://127.0.0.1:19530 --store-pid PID   # a Milvus server

What it does, in a child process (a Lite file is locked by the process that opened it):
ingests `--ingest` images of DIR into a fresh Milvus Lite file, waits `--settle` seconds
for Lite's background index build, and measures the offline path on `--queries` of them
(`ImageIndex.search` in batches of 32: decode, embed, one search call per batch). Then starts `hiervec serve` and, for each concurrency level,
sends a fixed number of POST /search requests (multipart upload, k=10) from that many
clients, each with its own keep-alive connection (asyncio, in a process of its own, the
requests encoded beforehand, so that the clients take little of the server's CPUs). It reports QPS, p50/p99 latency, the
service's mean embedding batch, and the ratio of service QPS to the offline rate.
The clients share the machine with the server: their CPU seconds are reported beside the rates,
and so is the CPU time per query of the server's process, of its Lite process, and of the
offline path (on Linux): where the service spends more than the offline path does.
With `--uri`, a Milvus server holds the images instead (collection `serve_load`, replaced),
both for the offline path and for the service; `--store-pid` (the server's process id) adds
its CPU time per query, with its child processes', to both.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._machine import child_processes, cpu_seconds, describe, tree_cpu_seconds  # noqa: E402

HIERVEC = [sys.executable, "-c", "from cli.main import main; main()"]


def tiny_catalogue(folder: Path) -> tuple[Path, Path]:
    """An untrained seeded resnet18 (32 px) and 48 generated images in 4 leaves, for --smoke."""
    import torch
    from PIL import Image

    from embedder import EmbedderConfig, Hierarchy, PyramidEmbedder, save_checkpoint

    leaves = ["clothing/tops/shirt", "clothing/tops/coat", "clothing/bottoms/trouser", "footwear/boots/boot"]
    rng = np.random.default_rng(0)
    for n, leaf in enumerate(leaves):
        (folder / "images" / leaf).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(rng.normal(60 * n + 30, 30, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / "images" / leaf / f"{i}.png")
    hierarchy = Hierarchy.from_paths(leaves, ("department", "category", "item"))
    torch.manual_seed(0)
    config = EmbedderConfig.for_hierarchy(hierarchy, dim=8, backbone="resnet18", image_size=32, fpn_channels=16)
    save_checkpoint(folder / "model.pt", PyramidEmbedder(config), hierarchy)
    return folder / "model.pt", folder / "images"


def ingest_and_measure_offline(model: str, tree: str, db: str, queries: list[str], settle: float, repeats: int,
                               runtime: str, ingest: bool, out, collection: str = "images",
                               store_pid: int | None = None, vector_levels: tuple[str, ...] | None = None) -> None:
    """In a child process: store `tree` (when `ingest`; a server's `collection` is replaced), let
    the store build its index, then time `ImageIndex.search` on `queries` in batches of 32
    (queries per second) with `runtime`. The process ends, so the server can open a Lite file.
    The CPU time per query counts the `store_pid` process's (and its children's) too.
    `vector_levels` is the layout of a new collection (None: a vector field per level)."""
    from embedder import Embedder, read_source
    from hiervec_app import ImageIndex, IngestItem, SearchRequest

    embedder = Embedder.from_checkpoint(model, runtime=runtime)
    blobs = [Path(q).read_bytes() for q in queries]
    server = not db.endswith(".db")
    if ingest and server:
        drop_collection(db, collection)
    with ImageIndex.open(embedder, db, collection, vector_levels=vector_levels) as index:
        if ingest:
            # the real file as the uri (the tree holds links): what a catalogue stores
            items = [IngestItem(item.path, item.category, uri=str(item.path.resolve()))
                     for item in read_source(Path(tree)).items]
            index.ingest(items)
            if server:
                from bench.search_latency import wait_indexed

                wait_indexed(index.store, max(settle, 600), poll_s=1.0)
            else:
                time.sleep(settle)  # Milvus Lite goes on building the index for a while after the flush
        request = SearchRequest(k=10)
        index.search(request, blobs[:32])  # warm-up
        prepared = [embedder.prepare(b) for b in blobs[:32]]
        vectors = embedder.embed(prepared).concat
        parts = {"embed_1_ms": _best_ms(lambda: embedder.embed(prepared[:1])),
                 "embed_32_ms": _best_ms(lambda: embedder.embed(prepared)),
                 "search_1_ms": _best_ms(lambda: index.store.search(vectors[:1], 10)),
                 "search_32_ms": _best_ms(lambda: index.store.search(vectors, 10))}
        best, cpu, store_cpu = float("inf"), time.process_time(), tree_cpu_seconds(store_pid)
        for _ in range(repeats):
            started = time.perf_counter()
            for start in range(0, len(blobs), 32):
                index.search(request, blobs[start : start + 32])
            best = min(best, time.perf_counter() - started)
        parts["cpu_ms_per_query"] = round(1000 * (time.process_time() - cpu) / (repeats * len(blobs)), 2)
        if store_pid is not None:
            parts["store_cpu_ms_per_query"] = round(1000 * (tree_cpu_seconds(store_pid) - store_cpu) / (repeats * len(blobs)), 2)
    out.put((len(blobs) / best, parts))


def _result_of(child, results, seconds: float):
    """What `child` put on `results`; an error as soon as it has ended without (its traceback is
    on stderr), instead of waiting out `seconds`."""
    import queue

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            return results.get(timeout=1)
        except queue.Empty:
            if not child.is_alive():
                try:
                    return results.get(timeout=1)  # put just before it ended
                except queue.Empty:
                    raise RuntimeError(f"{child.name} ended with exit code {child.exitcode} and no result") from None
    raise RuntimeError(f"{child.name} gave no result within {seconds:.0f}s")


def drop_collection(uri: str, collection: str) -> None:
    """Drop a server's `collection` left by an earlier run, if there is one."""
    from milvus_store import CollectionNotFoundError, HierStore

    try:
        with HierStore(uri, collection, create=False) as old:
            old.drop()
    except CollectionNotFoundError:
        pass


def _best_ms(fn, repeats: int = 20) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return round(1000 * best, 1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load(base: str, blobs: list[bytes], requests: int, concurrency: int, server: int | None = None,
         store_pid: int | None = None) -> dict:
    """`requests` POST /search (k=10) from `concurrency` clients, each on its own keep-alive connection.

    The clients run in a process of their own, on asyncio with the requests encoded beforehand, so
    that they take as little as possible of the CPUs they share with the server: its CPU seconds
    are reported (`client_cpu_s`). With the `server`'s process id, the CPU time per query of the
    server's process and of its child processes (a Lite process) too, on Linux; with `store_pid`
    (a Milvus server's process), that process's and its children's as the store's."""
    port = int(base.rsplit(":", 1)[1])
    encoded = [multipart_request(f"127.0.0.1:{port}", "/search", blobs[i % len(blobs)], {"k": "10"})
               for i in range(requests)]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    before = _stats(base)
    children = child_processes(server) if server is not None else []
    cpu_before = [cpu_seconds(pid) for pid in (server, *children)] if server is not None else []
    store_before = tree_cpu_seconds(store_pid)
    clients = context.Process(target=_run_clients, args=(port, encoded, concurrency, results))
    clients.start()
    latencies, errors, seconds, cpu = _result_of(clients, results, 3600)
    clients.join()
    cpu_after = [cpu_seconds(pid) for pid in (server, *children)] if server is not None else []
    store_used = round(1000 * (tree_cpu_seconds(store_pid) - store_before) / requests, 2) if store_pid is not None else None
    after = _stats(base)
    used = [None if a is None or b is None else round(1000 * (a - b) / requests, 2)
            for a, b in zip(cpu_after, cpu_before)]

    def mean_batch(stage: str) -> float:
        batches = after[stage]["batches"] - before[stage]["batches"]
        return round((after[stage]["items"] - before[stage]["items"]) / batches, 2) if batches else 0.0

    return {"concurrency": concurrency, "requests": requests, "errors": len(errors), "seconds": round(seconds, 2),
            "qps": round(requests / seconds, 1), "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
            "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1),
            "embed_batch": mean_batch("embedding"), "search_batch": mean_batch("searching"),
            "client_cpu_s": round(cpu, 2), "server_cpu_ms": used[0] if used else None,
            "children_cpu_ms": (store_used if store_pid is not None else
                                round(sum(used[1:]), 2) if len(used) > 1 and None not in used else None),
            "first_error": errors[0] if errors else None}



def _run_clients(port: int, requests: list[bytes], concurrency: int, out) -> None:
    import asyncio

    cpu = time.process_time()
    latencies, errors, seconds = asyncio.run(_clients(port, requests, concurrency))
    out.put((latencies, errors, seconds, time.process_time() - cpu))


def multipart_request(host: str, path: str, blob: bytes, fields: dict[str, str], boundary: str = "hiervec-load") -> bytes:
    """One complete HTTP/1.1 keep-alive POST of `blob` as the form's `image` file plus `fields`."""
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
                 f"Content-Type: image/png\r\n\r\n".encode() + blob + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _clients(port: int, requests: list[bytes], concurrency: int) -> tuple[list[float], list[str], float]:
    """Send `requests` over `concurrency` keep-alive connections, each one request at a time."""
    import asyncio

    latencies, errors, queue = [], [], list(reversed(requests))

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while queue:
                request = queue.pop()
                started = time.perf_counter()
                writer.write(request)
                status, body = await _response(reader)
                latencies.append(time.perf_counter() - started)
                if status != 200:
                    errors.append(f"{status} {body[:200]!r}")
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - started


async def _response(reader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next((int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length:")),
                  None)
    if length is None:
        raise RuntimeError(f"the server answered without Content-Length: {lines[0]}")
    return status, await reader.readexactly(length)


def _stats(base: str) -> dict:
    import httpx2 as httpx

    return httpx.get(f"{base}/stats", timeout=30).json()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "runs/demo/fashion.pt"))
    parser.add_argument("--images", default=str(ROOT / "runs/demo/test"), help="A labelled folder tree.")
    parser.add_argument("--ingest", type=int, default=10_000, help="How many images of --images to store.")
    parser.add_argument("--queries", type=int, default=500, help="Distinct query images (from the stored ones).")
    parser.add_argument("--requests", type=int, default=600, help="Requests per concurrency level.")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--repeats", type=int, default=3, help="Offline passes; the best counts.")
    parser.add_argument("--batch-window-ms", type=float, default=None, help="Passed to `hiervec serve`.")
    parser.add_argument("--settle", type=float, default=60,
                        help="Seconds to wait after ingest: Milvus Lite builds the index in the background.")
    parser.add_argument("--smoke", action="store_true", help="Tiny model and data; seconds.")
    parser.add_argument("--json", action="store_true", help="Print one JSON document instead of the table.")
    parser.add_argument("--runtime", default="all",
                        help="Comma-separated runtimes (torch, onnxruntime, openvino) for the offline path and the "
                             "server, side by side; all: those installed.")
    parser.add_argument("--lite", choices=["process", "in-process", "both"], default="process",
                        help="Serve the Lite file from a process of its own (`hiervec serve`'s default), inside the "
                             "server's process, or both, one after the other.")
    parser.add_argument("--uri", default=None,
                        help="A Milvus server (http://host:port) to hold the images instead of a fresh Lite file; its "
                             "collection `serve_load` is replaced.")
    parser.add_argument("--level-vectors", choices=["all", "none"], default="all",
                        help="The collection's layout: a vector field per level too, or the image vector only "
                             "(Milvus 2.3 takes one vector field per collection).")
    parser.add_argument("--store-pid", type=int, default=None,
                        help="With --uri: the Milvus server's process id, to report its CPU time per query.")
    args = parser.parse_args(argv)
    from embedder.runtimes import installed
    from hiervec_core.names import RUNTIMES

    wanted = RUNTIMES if args.runtime == "all" else tuple(args.runtime.split(","))
    runtimes = [r for r in wanted if installed(r)]
    levels = [int(c) for c in args.concurrency.split(",")]
    lites = ["process", "in-process"] if args.lite == "both" else [args.lite]
    if args.uri is None and args.store_pid is not None:
        parser.error("--store-pid is the process of the Milvus server given with --uri")
    if args.uri is not None:
        if args.uri.endswith(".db") or "://" not in args.uri:
            parser.error(f"--uri {args.uri!r}: a Milvus server's address (http://host:port); Lite files are made here")
        lites = ["server"]
    collection = "images" if args.uri is None else "serve_load"

    with tempfile.TemporaryDirectory(prefix="hiervec-serve-load-") as tmp:
        tmp = Path(tmp)
        if args.smoke:
            model, images = tiny_catalogue(tmp)
            args.ingest, args.queries, args.requests, args.repeats, args.settle = 48, 24, 24, 1, 0
            levels = [1, 4]
        else:
            model, images = Path(args.model), Path(args.images)
            if not model.exists() or not images.is_dir():
                parser.error(f"{model} or {images} is missing: run `make demo` first, or pass --model and --images")
        files = sorted(images.rglob("*.png"))
        step = max(1, len(files) // args.ingest)
        chosen = files[::step][: args.ingest]
        tree = tmp / "tree"
        for path in chosen:  # links keep the category folders, so ingest reads labels from the tree
            link = tree / path.relative_to(images)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path.resolve())
        db = str(tmp / "load.db") if args.uri is None else args.uri
        queries = [str(p) for p in chosen[:: max(1, len(chosen) // args.queries)][: args.queries]]

        context = multiprocessing.get_context("spawn")
        blobs = [Path(q).read_bytes() for q in queries]
        measured = {}
        for n, runtime in enumerate(runtimes):  # the first one ingests; each measures offline, then serves
            results = context.Queue()
            child = context.Process(target=ingest_and_measure_offline,
                                    args=(str(model), str(tree), db, queries, args.settle, args.repeats, runtime,
                                          n == 0, results, collection, args.store_pid,
                                          () if args.level_vectors == "none" else None))
            child.start()
            offline_qps, parts = _result_of(child, results, 1800)
            child.join()

            runs = []
            for lite in lites:
                port = free_port()
                base = f"http://127.0.0.1:{port}"
                server = subprocess.Popen([*HIERVEC, "serve", "--model", str(model), "--uri", db, "--port", str(port),
                                           "--collection", collection, "--media", str(tmp / "media"),
                                           "--runtime", runtime, *([f"--lite-{lite}"] if lite != "server" else []),
                                           *(["--batch-window-ms", str(args.batch_window_ms)]
                                             if args.batch_window_ms is not None else [])],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                try:
                    _wait(base, server)
                    load(base, blobs, min(20, args.requests), 2)  # warm-up
                    runs += [load(base, blobs, args.requests, c, server.pid, args.store_pid) | {"lite": lite}
                             for c in levels]
                finally:
                    server.terminate()
                    server.wait(timeout=60)
            measured[runtime] = {"offline_qps": round(offline_qps, 1), "parts": parts,
                                 "runs": [run | {"vs_offline": round(run["qps"] / offline_qps, 2)} for run in runs]}

    report = {"machine": describe(("torch", "pymilvus", "milvus-lite", "fastapi", "uvicorn", "onnxruntime",
                                   "openvino")),
              "command": "python bench/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "stored": len(chosen), "queries": len(queries), "runtimes": measured}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"machine: {report['machine']}\ncommand: {report['command']}")
    store = "Milvus Lite" if args.uri is None else f"a Milvus server at {args.uri}"
    print(f"{report['stored']} images stored ({store}, HNSW); {report['queries']} distinct query images")
    for runtime, m in measured.items():
        print(f"{runtime}: offline ImageIndex.search {m['offline_qps']} queries/s; parts (best of 20): "
              + ", ".join(f"{k} {v}" for k, v in m["parts"].items() if not k.endswith("cpu_ms_per_query")))
    print("\n| runtime | Milvus | clients | requests | errors | QPS | p50 ms | p99 ms | mean embed batch | mean search batch "
          "| client CPU s | server CPU ms/query | Lite process or Milvus server CPU ms/query | offline CPU ms/query "
          "| offline QPS | QPS / offline |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for runtime, m in measured.items():
        for run in m["runs"]:
            print(f"| {runtime} | {run['lite']} | {run['concurrency']} | {run['requests']} | {run['errors']} | {run['qps']} | "
                  f"{run['p50_ms']} | {run['p99_ms']} | {run['embed_batch']} | {run['search_batch']} | "
                  f"{run['client_cpu_s']} | {_or_dash(run['server_cpu_ms'])} | {_or_dash(run['children_cpu_ms'])} | "
                  f"{_offline_cpu(m['parts'])} | {m['offline_qps']} | {run['vs_offline']} |")
    return 0 if all(run["errors"] == 0 for m in measured.values() for run in m["runs"]) else 1


def _offline_cpu(parts: dict) -> str:
    """The offline path's CPU per query, with the Milvus server's after a + when it was measured."""
    if "store_cpu_ms_per_query" in parts:
        return f"{parts['cpu_ms_per_query']} + {parts['store_cpu_ms_per_query']}"
    return str(parts["cpu_ms_per_query"])


def _or_dash(value) -> str:
    return "-" if value is None else str(value)


def _wait(base: str, server: subprocess.Popen, seconds: float = 120) -> None:
    import httpx2 as httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"hiervec serve exited with {server.returncode}: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.3)
    raise RuntimeError(f"hiervec serve did not answer on {base} within {seconds}s")


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    sys.exit(main())
