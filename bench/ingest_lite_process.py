"""Ingest against embedding the same files, with Milvus Lite in this process and in a process of its own.

    .venv/bin/python bench/ingest_lite_process.py                 # ONNX Runtime; a few minutes
    .venv/bin/python bench/ingest_lite_process.py --runtime torch
    .venv/bin/python bench/ingest_lite_process.py --level-vectors none --uri http://127.0.0.1:19530 --store-pid PID

The same random-pixel PNG files as `bench/speed.py` (2,048 at 64 px, 256 at 224 px), batch
64, the untrained demo network: `Embedder.embed(files)` (read and decode in a thread pool,
embed), then `ImageIndex.ingest` into a Lite file opened in this process, then into one
served by `milvus_store.LiteProcess`, then the files again; each the best of 3 passes.
Beside each rate, the CPU time per image over those passes, of this process and (for the
Lite process) its child: when every core is busy, the rates' ratio is about the inverse of
the CPU times' ratio, so the columns say what the writes cost. With `--uri`, a third pass
writes to that Milvus server (collection `ingest_bench`, replaced), and `--store-pid` (the
server's process id) adds its CPU time and its children's to this process's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._machine import cpu_seconds, describe, tree_cpu_seconds  # noqa: E402
from embedder import Embedder, EmbedderConfig, Hierarchy, PyramidEmbedder  # noqa: E402
from embedder.fashion_mnist import CLASS_PATHS, LEVEL_NAMES  # noqa: E402
from bench.serve_load import drop_collection  # noqa: E402
from milvus_store import LiteProcess  # noqa: E402
from hiervec_app import ImageIndex, IngestItem


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime", default="onnxruntime")
    parser.add_argument("--level-vectors", choices=["all", "none"], default="all",
                        help="The collections' layout: a vector field per level too, or the image vector only "
                             "(Milvus 2.3 takes one vector field per collection).")
    parser.add_argument("--uri", default=None, help="A Milvus server (http://host:port) to ingest into as well.")
    parser.add_argument("--store-pid", type=int, default=None, help="With --uri: the server's process id.")
    args = parser.parse_args(argv)
    if args.store_pid is not None and args.uri is None:
        parser.error("--store-pid is the process of the Milvus server given with --uri")
    layout = {"vector_levels": () if args.level_vectors == "none" else None}
    print(f"machine: {describe(('torch', 'pymilvus', 'milvus-lite', args.runtime))}")
    print("command: python bench/ingest_lite_process.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "\n")
    server_columns = (" | ingest into the server img/s | / files | CPU ms/img (with the server's)" if args.uri else "")
    print("| input px | files | embed files img/s | CPU ms/img | ingest, Lite in process img/s | / files | CPU ms/img "
          f"| ingest, Lite in its own process img/s | / files | CPU ms/img (both processes){server_columns} |")
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if args.uri else ""))
    hierarchy = Hierarchy.from_paths(CLASS_PATHS, LEVEL_NAMES)
    for size, n in ((64, 2048), (224, 256)):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            config = EmbedderConfig.for_hierarchy(hierarchy, dim=64, backbone="mobilenet_v2", image_size=size)
            embedder = Embedder(PyramidEmbedder(config), hierarchy, "bench", batch_size=64, runtime=args.runtime)
            pixels = (torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
            files = []
            for i in range(n):
                files.append(tmp / f"{i}.png")
                Image.fromarray(pixels[i].permute(1, 2, 0).numpy()).save(files[-1])
            items = [IngestItem(p, CLASS_PATHS[i % len(CLASS_PATHS)]) for i, p in enumerate(files)]
            embed_files, embed_cpu = rate_and_cpu(lambda: embedder.embed(files), n)
            with ImageIndex.open(embedder, str(tmp / "in-process.db"), "bench", **layout) as index:
                in_process, in_process_cpu = rate_and_cpu(
                    lambda: index.ingest(items, batch_size=64, skip_existing=False), n)
            with LiteProcess(tmp / "own.db") as lite, ImageIndex.open(embedder, lite.uri, "bench", **layout) as index:
                own, own_cpu = rate_and_cpu(lambda: index.ingest(items, batch_size=64, skip_existing=False), n,
                                            pids=(lite.process.pid,))
            rate = cpu = None
            if args.uri:
                drop_collection(args.uri, "ingest_bench")
                with ImageIndex.open(embedder, args.uri, "ingest_bench", **layout) as index:
                    rate, cpu = rate_and_cpu(lambda: index.ingest(items, batch_size=64, skip_existing=False), n,
                                             trees=(args.store_pid,) if args.store_pid else ())
            again, again_cpu = rate_and_cpu(lambda: embedder.embed(files), n)
            if again > embed_files:
                embed_files, embed_cpu = again, again_cpu
            print(f"| {size} | {n} | {embed_files:.0f} | {embed_cpu:.2f} | {in_process:.0f} | "
                  f"{in_process / embed_files:.2f} | {in_process_cpu:.2f} | {own:.0f} | {own / embed_files:.2f} | "
                  f"{own_cpu:.2f} |" + (f" {rate:.0f} | {rate / embed_files:.2f} | {cpu:.2f} |" if rate else ""),
                  flush=True)
    return 0


def rate_and_cpu(fn, images: int, repeats: int = 3, pids: tuple[int, ...] = (),
                 trees: tuple[int, ...] = ()) -> tuple[float, float]:
    """Images per second (the best of `repeats` passes after a warm-up), and CPU milliseconds per
    image over those passes, of this process, of `pids` and of `trees` with their children."""
    fn()  # warm-up
    before = [cpu_seconds(), *(cpu_seconds(pid) for pid in pids), *(tree_cpu_seconds(pid) for pid in trees)]
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    after = [cpu_seconds(), *(cpu_seconds(pid) for pid in pids), *(tree_cpu_seconds(pid) for pid in trees)]
    used = sum(a - b for a, b in zip(after, before) if a is not None and b is not None)
    return images / best, 1000 * used / (repeats * images)


if __name__ == "__main__":
    sys.exit(main())
