"""Ingest throughput: one process against Ray Data (1 and 2 embedding actors), the same files.

    .venv/bin/python bench/ingest_scale.py                  # 64 and 224 px, the figures in BENCHMARKS.md
    .venv/bin/python bench/ingest_scale.py --smoke          # seconds: CI keeps it from rotting

The model is the default one (MobileNetV2 pyramid, 64-d per level, 3 levels; random
weights: speed does not depend on them), saved as a checkpoint that each Ray actor loads.
Each row ingests the same PNG files into a fresh Milvus Lite collection and reports images
stored per second over the whole ingest (listing excluded): the single process with all
of this machine's threads; Ray with a local Ray started once before the rows (its start is
not counted; starting the actors and loading the model in them is), `cores / actors`
torch threads per actor. The ratio is each row's rate over the single process's. What a
Ray ingest pays once (starting its actors, loading the model in each, two passes of Ray
Data) is measured by an 8-file ingest, and the rate after it is (files - 8) / (seconds -
that start): the rate a long ingest approaches.

The last table is rows per second of writing the same rows through `upsert` into Milvus
Lite against writing them as the Parquet files Milvus's bulk import loads
(`milvus_store.bulk.BulkFiles`, pymilvus's `LocalBulkWriter`), when that module exists.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._machine import describe  # noqa: E402
from embedder import Embedder, EmbedderConfig, Hierarchy, PyramidEmbedder, save_checkpoint  # noqa: E402
from embedder.fashion_mnist import CLASS_PATHS, LEVEL_NAMES  # noqa: E402
from milvus_store import CollectionSpec, HierStore, Record  # noqa: E402
from hiervec_app import ImageIndex, IngestItem

START_FILES = 8  # a Ray ingest this small measures what every Ray ingest pays once


def make_model(folder: Path, size: int) -> Path:
    hierarchy = Hierarchy.from_paths(CLASS_PATHS, LEVEL_NAMES)
    torch.manual_seed(0)
    config = EmbedderConfig.for_hierarchy(hierarchy, dim=64, image_size=size)
    path = folder / f"model-{size}.pt"
    save_checkpoint(path, PyramidEmbedder(config), hierarchy)
    return path


def make_files(folder: Path, size: int, n: int) -> list[IngestItem]:
    rng = np.random.default_rng(size)
    items = []
    for i in range(n):
        path = folder / f"{size}-{i}.png"
        pixels = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        items.append(IngestItem(path, CLASS_PATHS[i % len(CLASS_PATHS)]))
    return items


def single(model: Path, items, folder: Path, tag: str, batch: int) -> float:
    embedder = Embedder.from_checkpoint(model, runtime="torch")
    with ImageIndex.open(embedder, str(folder / f"{tag}.db"), "bench") as index:
        report = index.ingest(items, batch_size=batch)
    assert report.stored == len(items), report.to_dict()
    return report.stored / report.seconds


def with_ray(model: Path, items, folder: Path, tag: str, batch: int, actors: int, cores: int) -> tuple[float, float]:
    """(images/s over the whole ingest, seconds of a `START_FILES`-file ingest: starting the actors,
    loading the model in each, two passes over Ray Data, what every ingest pays once)."""
    from scaleout import EmbedderRecipe, RayOptions, ray_ingest

    embedder = Embedder.from_checkpoint(model, runtime="torch")
    recipe = EmbedderRecipe(str(model), runtime="torch", threads=max(1, cores // actors))
    options = RayOptions(actors=actors, cpus_per_actor=min(1.0, (cores - 0.5) / actors), batch_size=batch)
    seconds = {}
    for name, some in (("start", items[:START_FILES]), ("all", items)):
        with ImageIndex.open(embedder, str(folder / f"{tag}-{name}.db"), "bench") as index:
            report = ray_ingest(index, some, recipe, options)
        assert report.stored == len(some), report.to_dict()
        seconds[name] = report.seconds
    return len(items) / seconds["all"], seconds["start"]


def write_rates(n: int, folder: Path) -> dict:
    """Rows/s of upsert into Milvus Lite and of bulk-import Parquet files, the same rows."""
    spec = CollectionSpec(LEVEL_NAMES, 192, (64, 64, 64), index="HNSW")
    rng = np.random.default_rng(0)
    records = [Record(CLASS_PATHS[i % len(CLASS_PATHS)], rng.normal(size=192).astype(np.float32),
                      {lv: rng.normal(size=64).astype(np.float32) for lv in LEVEL_NAMES}, id=f"r{i}",
                      uri=f"file:///x/{i}.png") for i in range(n)]
    out = {}
    with HierStore(str(folder / "rows.db"), "rows", spec=spec) as store:
        from milvus_store.records import to_rows

        rows = to_rows(records, store.spec)
        started = time.perf_counter()
        store.upsert_rows(rows, batch_size=1000)
        store.flush()
        out["upsert_rows_s"] = n / (time.perf_counter() - started)
        try:
            from milvus_store.bulk import BulkFiles
        except ImportError:
            return out
        started = time.perf_counter()
        with BulkFiles(store.spec, folder / "bulk") as files:
            files.append(rows)
        out["bulk_files_rows_s"] = n / (time.perf_counter() - started)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,224")
    parser.add_argument("--images", default="3072,384", help="files per size, comma-separated")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rows", type=int, default=20_000, help="rows for the write-rate table")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="32 px, 16 files, 500 rows, Ray with 2 actors only: seconds")

    args = parser.parse_args(argv)
    import ray

    from scaleout.ray_engine import start_local_ray

    sizes = [int(s) for s in args.sizes.split(",")]
    counts = [int(n) for n in args.images.split(",")]
    if args.smoke:
        sizes, counts, args.batch, args.rows = [32], [16], 8, 500
    cores = os.cpu_count() or 1
    start_local_ray(ray, num_cpus=cores, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(cores)  # the single process's row: every core
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="hiervec-ingest-scale-") as tmp:
            folder = Path(tmp)
            for size, n in zip(sizes, counts):
                model, items = make_model(folder, size), make_files(folder, size, n)
                rates = {"single process": single(model, items, folder, f"s{size}", args.batch)}
                starts = {}
                for actors in (2,) if args.smoke else (1, 2):  # smoke: every code path, Ray started once
                    name = f"Ray, {actors} actor{'s' if actors > 1 else ''}"
                    rates[name], starts[name] = with_ray(model, items, folder, f"r{size}-{actors}", args.batch,
                                                         actors, cores)
                results.append({"size": size, "images": n, "rates": rates, "start_s": starts})
            writes = write_rates(args.rows, folder)
    finally:
        ray.shutdown()
        torch.set_num_threads(threads)  # as the caller had it: main() also runs inside other programs (tests)
    command = "python bench/ingest_scale.py" + (" --smoke" if args.smoke else "")
    print(f"# ingest throughput: one process against Ray Data, the same files into Milvus Lite\n\n"
          f"machine: {describe()}\ncommand: {command}\n")
    print(f"| image size | files | engine | images/s | ratio to one process | start, s ({START_FILES} files) | "
          f"images/s after the start | ratio after the start |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        base = r["rates"]["single process"]
        for name, value in r["rates"].items():
            start = r["start_s"].get(name)
            if start is None:
                print(f"| {r['size']} px | {r['images']} | {name} | {value:.1f} | 1.00 | - | - | - |")
                continue
            steady = (r["images"] - START_FILES) / max(r["images"] / value - start, 1e-9)
            print(f"| {r['size']} px | {r['images']} | {name} | {value:.1f} | {value / base:.2f} | {start:.1f} | "
                  f"{steady:.1f} | {steady / base:.2f} |")
    print(f"\nwriting {args.rows:,} rows (192-d image + 3 x 64-d level vectors):\n")
    print("| how | rows/s |")
    print("|---|---|")
    print(f"| upsert into Milvus Lite (+ flush) | {writes['upsert_rows_s']:,.0f} |")
    if "bulk_files_rows_s" in writes:
        print(f"| bulk-import Parquet files (LocalBulkWriter) | {writes['bulk_files_rows_s']:,.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "writes": writes, "machine": describe()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
