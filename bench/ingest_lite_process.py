"""Ingest against embedding the same files, with Milvus Lite in this process and in a process of its own.

    .venv/bin/python bench/ingest_lite_process.py                 # ONNX Runtime; a few minutes
    .venv/bin/python bench/ingest_lite_process.py --runtime torch

The same random-pixel PNG files as `bench/speed.py` (2,048 at 64 px, 256 at 224 px), batch
64, the untrained demo network: `Embedder.embed(files)` (read and decode in a thread pool,
embed), then `ImageIndex.ingest` into a Lite file opened in this process, then into one
served by `milvus_store.LiteProcess`, then the files again; each the best of 3 passes.
Beside each rate, the CPU time per image over those passes, of this process and (for the
Lite process) its child: when every core is busy, the rates' ratio is about the inverse of
the CPU times' ratio, so the columns say what the writes cost.
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
from bench._machine import cpu_seconds, describe  # noqa: E402
from embedder import Embedder, EmbedderConfig, Hierarchy, PyramidEmbedder  # noqa: E402
from embedder.fashion_mnist import CLASS_PATHS, LEVEL_NAMES  # noqa: E402
from milvus_store import ImageIndex, IngestItem, LiteProcess  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime", default="onnxruntime")
    args = parser.parse_args(argv)
    print(f"machine: {describe(('torch', 'pymilvus', 'milvus-lite', args.runtime))}")
    print(f"command: python bench/ingest_lite_process.py --runtime {args.runtime}\n")
    print("| input px | files | embed files img/s | CPU ms/img | ingest, Lite in process img/s | / files | CPU ms/img "
          "| ingest, Lite in its own process img/s | / files | CPU ms/img (both processes) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
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
            with ImageIndex.open(embedder, str(tmp / "in-process.db"), "bench") as index:
                in_process, in_process_cpu = rate_and_cpu(
                    lambda: index.ingest(items, batch_size=64, skip_existing=False), n)
            with LiteProcess(tmp / "own.db") as lite, ImageIndex.open(embedder, lite.uri, "bench") as index:
                own, own_cpu = rate_and_cpu(lambda: index.ingest(items, batch_size=64, skip_existing=False), n,
                                            pids=(lite.process.pid,))
            again, again_cpu = rate_and_cpu(lambda: embedder.embed(files), n)
            if again > embed_files:
                embed_files, embed_cpu = again, again_cpu
            print(f"| {size} | {n} | {embed_files:.0f} | {embed_cpu:.2f} | {in_process:.0f} | "
                  f"{in_process / embed_files:.2f} | {in_process_cpu:.2f} | {own:.0f} | {own / embed_files:.2f} | "
                  f"{own_cpu:.2f} |", flush=True)
    return 0


def rate_and_cpu(fn, images: int, repeats: int = 3, pids: tuple[int, ...] = ()) -> tuple[float, float]:
    """Images per second (the best of `repeats` passes after a warm-up), and CPU milliseconds per
    image over those passes, of this process and of `pids`."""
    fn()  # warm-up
    before = [cpu_seconds(), *(cpu_seconds(pid) for pid in pids)]
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    after = [cpu_seconds(), *(cpu_seconds(pid) for pid in pids)]
    used = sum(a - b for a, b in zip(after, before) if a is not None and b is not None)
    return images / best, 1000 * used / (repeats * images)


if __name__ == "__main__":
    sys.exit(main())
