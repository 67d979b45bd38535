"""Search latency and recall of each index offered on Milvus Lite, with and without level filters.

    .venv/bin/python bench/search_latency.py              # 100,000 vectors, the figures in BENCHMARKS.md
    .venv/bin/python bench/search_latency.py --smoke      # seconds: CI keeps it from rotting

The collection has the default layout of a 3-level model (image vector 192 = 3 x 64,
one 64-d vector per level). Vectors are unit-length draws around 1,000 cluster centres,
as trained embeddings are clustered; queries are fresh draws from the same clusters.
Filters: one department (20% of rows), one item (2% of rows). Latency is one query per
call, ids only, p50/p99 over the queries; recall@10 is against numpy brute force over
the rows that pass the same filter.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._machine import describe  # noqa: E402
from milvus_store import LITE_INDEXES, CollectionSpec, Eq, HierStore, Record  # noqa: E402

LEVELS = ("department", "category", "item")


def clustered(rng: np.random.Generator, n: int, dim: int, centres: np.ndarray, assign: np.ndarray) -> np.ndarray:
    x = centres[assign] + rng.normal(scale=0.6 / np.sqrt(dim), size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_data(n: int, queries: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, 192))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    assign = rng.integers(0, 1000, size=n + queries)
    vectors = clustered(rng, n + queries, 192, centres, assign)
    leaf = np.arange(n) % 50  # 5 departments x 5 categories x 2 items
    paths = [f"d{i // 10}/c{i // 2}/i{i}" for i in range(50)]
    return vectors[:n], vectors[n:], leaf, paths


def percentile_ms(samples: list[float], q: float) -> float:
    return float(np.percentile(samples, q) * 1000)


def run_index(index: str, vectors, queries, leaf, paths, k: int, folder: Path, settle_s: float,
              search_params: dict | None = None) -> dict:
    spec = CollectionSpec(LEVELS, dim=192, level_dims=(64, 64, 64), index=index)
    store = HierStore(str(folder / f"{index}.db"), "bench", spec=spec)
    records = [
        Record(paths[leaf[i]], vectors[i], {lv: vectors[i, 64 * j: 64 * (j + 1)] for j, lv in enumerate(LEVELS)},
               id=str(i))
        for i in range(len(vectors))
    ]
    started = time.perf_counter()
    store.upsert(records, batch_size=2000)
    store.flush()
    build_s = time.perf_counter() - started
    # Milvus Lite reports the index finished at flush but keeps working on its segments
    # in the background for tens of seconds; measure the settled state users search.
    time.sleep(settle_s)
    department = np.array([paths[i].split("/")[0] for i in range(50)])[leaf]
    filters = {
        "none": (None, np.ones(len(vectors), bool)),
        "department (20%)": (Eq("department", "d0"), department == "d0"),
        "item (2%)": (Eq("item", paths[0]), leaf == 0),
    }
    results = {"index": index, "build_s": build_s, "filters": {}}
    for name, (where, mask) in filters.items():
        pool = np.flatnonzero(mask)
        latencies, recalls = [], []
        for query in queries:
            t0 = time.perf_counter()
            [hits] = store.search(query, k=k, where=where, output=[], search_params=search_params)
            latencies.append(time.perf_counter() - t0)
            dist = ((vectors[pool] - query) ** 2).sum(1)
            truth = set(pool[np.argsort(dist)[:k]].astype(str))
            recalls.append(len(truth & {h.id for h in hits}) / k)
        results["filters"][name] = {
            "share": float(mask.mean()), "p50_ms": percentile_ms(latencies, 50), "p99_ms": percentile_ms(latencies, 99),
            "recall@10": float(np.mean(recalls)),
        }
    store.close()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--indexes", default=",".join(LITE_INDEXES))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--settle", type=float, default=60.0, help="seconds to wait after flush before measuring")
    parser.add_argument("--search-param", metavar="NAME=INT", default=None,
                        help="fix the search breadth (e.g. ef=64) instead of the store's filter-aware default")
    parser.add_argument("--smoke", action="store_true", help="2,000 vectors, 10 queries, no settling: seconds")
    args = parser.parse_args(argv)
    fixed = None
    if args.search_param:
        name, _, value = args.search_param.partition("=")
        fixed = {name: int(value)}
    if args.smoke:
        args.n, args.queries, args.settle = 2000, 10, 0.0
    vectors, queries, leaf, paths = make_data(args.n, args.queries)
    folder = Path(tempfile.mkdtemp(prefix="hiervec-bench-"))
    try:
        runs = [run_index(index, vectors, queries, leaf, paths, 10, folder, args.settle, fixed)
                for index in args.indexes.split(",")]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    command = "python bench/search_latency.py" + (" --smoke" if args.smoke else "") + (
        f" --indexes {args.indexes} --search-param {args.search_param}" if fixed else "")
    print(f"# top-10 search on Milvus Lite, {args.n:,} vectors (192-d image + 3 x 64-d level), "
          f"{args.queries} queries, measured {args.settle:.0f}s after flush, search breadth "
          f"{args.search_param or 'filter-aware (the default)'}\n\n"
          f"machine: {describe()}\ncommand: {command}\n")
    print("| index | insert + flush s | filter | rows passing | p50 ms | p99 ms | recall@10 |")
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        for name, r in run["filters"].items():
            print(f"| {run['index']} | {run['build_s']:.1f} | {name} | {r['share']:.1%} | {r['p50_ms']:.2f} | "
                  f"{r['p99_ms']:.2f} | {r['recall@10']:.3f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"n": args.n, "queries": args.queries, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
