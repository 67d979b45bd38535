"""Search latency and recall of each index on Milvus Lite or a Milvus server, with and without level filters.

    .venv/bin/python bench/search_latency.py              # 100,000 vectors, every index, the figures in BENCHMARKS.md
    .venv/bin/python bench/search_latency.py --n 100000,1000000 --indexes HNSW   # the default index at scale
    .venv/bin/python bench/search_latency.py --uri http://127.0.0.1:19530 --indexes HNSW,IVF_SQ8   # a server
    .venv/bin/python bench/search_latency.py --partition-key both --indexes HNSW   # with and without the key
    .venv/bin/python bench/search_latency.py --smoke      # seconds: CI keeps it from rotting

On a server (`--uri`) the collection holds the image vector only by default (`--level-vectors
none`: what any server can hold, Milvus 2.3 included); measuring starts once the server
reports every row indexed. `--partition-key department|none|both` makes the coarsest level
the partition key, or not, or measures both.

The collection has the default layout of a 3-level model (image vector 192 = 3 x 64,
one 64-d vector per level). Vectors are unit-length draws around 1,000 cluster centres,
as trained embeddings are clustered; queries are fresh draws from the same clusters.
Filters: one department (20% of rows), one item (2% of rows). Latency is one query per
call, ids only, p50/p99 over the queries; recall@10 is against numpy brute force over
the rows that pass the same filter.

End to end (`--end-to-end`, on by default): one query image, a Fashion-MNIST PNG on
disk, is decoded, embedded by a 3-level MobileNetV2 `Embedder` at 64 px (untrained: the
cost is the same) and searched for its top 10 in the last index's collection; p50/p99
of the whole and of each part.
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


def end_to_end(store: HierStore, folder: Path, repeats: int) -> dict:
    """Decode + embed + search of one query image, `repeats` times: p50/p99 ms of each part."""
    from embedder import Embedder, EmbedderConfig, Hierarchy, PyramidEmbedder, fashion_mnist
    from PIL import Image

    hierarchy = Hierarchy.from_paths(fashion_mnist.CLASS_PATHS, fashion_mnist.LEVEL_NAMES)
    embedder = Embedder(PyramidEmbedder(EmbedderConfig.for_hierarchy(hierarchy, dim=64)), hierarchy, "bench")
    path = folder / "query.png"
    Image.fromarray(fashion_mnist.load("test")[0][0], mode="L").save(path)
    parts: dict[str, list[float]] = {"decode": [], "embed": [], "search": [], "total": []}
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        image = embedder.prepare(path)
        t1 = time.perf_counter()
        vector = embedder.embed([image]).concat
        t2 = time.perf_counter()
        store.search(vector, k=10, output=[])
        t3 = time.perf_counter()
        if i:  # the first round warms up
            for name, value in (("decode", t1 - t0), ("embed", t2 - t1), ("search", t3 - t2), ("total", t3 - t0)):
                parts[name].append(value)
    return {name: {"p50_ms": percentile_ms(v, 50), "p99_ms": percentile_ms(v, 99)} for name, v in parts.items()}


def exact_top(vectors: np.ndarray, pool: np.ndarray, queries: np.ndarray, k: int, chunk: int = 200_000):
    """Ids of the exact `k` nearest rows of `vectors[pool]` to each query (unit vectors: by inner product)."""
    best_ids = np.empty((len(queries), 0), dtype=np.int64)
    best_sim = np.empty((len(queries), 0), dtype=np.float32)
    for start in range(0, len(pool), chunk):
        ids = pool[start : start + chunk]
        sims = queries @ vectors[ids].T
        top = np.argpartition(-sims, min(k, len(ids)) - 1, axis=1)[:, :k]
        best_ids = np.concatenate([best_ids, ids[top]], axis=1)
        best_sim = np.concatenate([best_sim, np.take_along_axis(sims, top, axis=1)], axis=1)
        keep = np.argsort(-best_sim, axis=1)[:, :k]
        best_ids, best_sim = np.take_along_axis(best_ids, keep, 1), np.take_along_axis(best_sim, keep, 1)
    return best_ids


def settle(path: Path, at_most_s: float, quiet_s: float = 60.0, poll_s: float = 5.0) -> float:
    """Wait until no file under `path` has changed for `quiet_s` (at most `at_most_s`); seconds waited."""
    started = time.time()
    while time.time() - started < at_most_s:
        latest = max((f.stat().st_mtime for f in path.rglob("*") if f.is_file()), default=0.0)
        if time.time() - latest >= min(quiet_s, at_most_s):
            break
        time.sleep(poll_s)
    return time.time() - started


def wait_indexed(store: HierStore, at_most_s: float, poll_s: float = 2.0) -> float:
    """Wait until the server reports every row of every vector field indexed; seconds waited."""
    started = time.time()
    while time.time() - started < at_most_s:
        if all(total and indexed >= total for indexed, total in store.index_progress().values()):
            break
        time.sleep(poll_s)
    return time.time() - started


def run_index(index: str, vectors, queries, leaf, paths, k: int, folder: Path, settle_s: float,
              search_params: dict | None = None, e2e_repeats: int = 0, *, uri: str | None = None,
              vector_levels: tuple[str, ...] | None = None, partition_key: str = "") -> dict:
    spec = CollectionSpec(LEVELS, dim=192, level_dims=(64, 64, 64), index=index, vector_levels=vector_levels,
                          partition_key=partition_key)
    name = f"bench_{index.lower()}_{partition_key or 'nokey'}_{int(time.time())}"
    store = HierStore(uri or str(folder / f"{index}-{partition_key or 'nokey'}.db"), name, spec=spec)
    started = time.perf_counter()
    for start in range(0, len(vectors), 50_000):  # in chunks: a million Records at once take ~10 GB
        store.upsert([Record(paths[leaf[i]], vectors[i],
                             {lv: vectors[i, 64 * j: 64 * (j + 1)] for j, lv in enumerate(LEVELS)}, id=str(i))
                      for i in range(start, min(len(vectors), start + 50_000))], batch_size=2000)
    store.flush()
    build_s = time.perf_counter() - started
    # Milvus Lite reports the index finished at flush but keeps building segment indexes
    # in the background (tens of seconds at 100,000 rows, minutes at 1,000,000); measure
    # the settled state users search: once its files have been quiet for a while.
    settled_s = (wait_indexed(store, settle_s) if uri else
                 settle(folder / f"{index}-{partition_key or 'nokey'}.db", settle_s))
    department = np.array([paths[i].split("/")[0] for i in range(50)])[leaf]
    filters = {
        "none": (None, np.ones(len(vectors), bool)),
        "department (20%)": (Eq("department", "d0"), department == "d0"),
        "item (2%)": (Eq("item", paths[0]), leaf == 0),
    }
    results = {"index": index, "build_s": build_s, "settled_s": settled_s, "partition_key": partition_key,
               "vector_fields": spec.vector_field_count, "filters": {}}
    for name, (where, mask) in filters.items():
        pool = np.flatnonzero(mask)
        latencies, found = [], []
        for query in queries:
            t0 = time.perf_counter()
            [hits] = store.search(query, k=k, where=where, output=[], search_params=search_params)
            latencies.append(time.perf_counter() - t0)
            found.append({h.id for h in hits})
        truths = exact_top(vectors, pool, queries, k)
        recalls = [len(set(truth.astype(str)) & ids) / k for truth, ids in zip(truths, found)]
        results["filters"][name] = {
            "share": float(mask.mean()), "p50_ms": percentile_ms(latencies, 50), "p99_ms": percentile_ms(latencies, 99),
            "recall@10": float(np.mean(recalls)),
        }
    if e2e_repeats:
        results["end_to_end"] = end_to_end(store, folder, e2e_repeats)
    if uri:
        store.drop()
    store.close()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="100000", help="collection sizes, comma-separated")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--indexes", default=",".join(LITE_INDEXES))
    parser.add_argument("--uri", default=None, help="a Milvus server (http://host:port) instead of Lite files")
    parser.add_argument("--level-vectors", choices=("all", "none"), default=None,
                        help="keep the level vector fields (all) or the image vector only (none) [default: all on "
                             "Lite, none on a server]")
    parser.add_argument("--partition-key", choices=("none", "department", "both"), default="none",
                        help="the coarsest level as partition key, none, or both layouts in turn")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--settle", type=float, default=900.0,
                        help="at most this many seconds after flush for Lite's background indexing to go quiet "
                             "(no file changed for 60 s) before measuring")
    parser.add_argument("--search-param", metavar="NAME=INT", default=None,
                        help="fix the search breadth (e.g. ef=64) instead of the store's filter-aware default")
    parser.add_argument("--no-end-to-end", dest="end_to_end", action="store_false",
                        help="skip the decode + embed + search latency of one query image")
    parser.add_argument("--smoke", action="store_true", help="2,000 vectors, 10 queries, no settling: seconds")
    args = parser.parse_args(argv)
    fixed = None
    if args.search_param:
        name, _, value = args.search_param.partition("=")
        fixed = {name: int(value)}
    if args.smoke:
        args.n, args.queries, args.settle = "2000", 10, 0.0
    sizes = [int(n) for n in args.n.split(",")]
    indexes = args.indexes.split(",")
    level_vectors = args.level_vectors or ("none" if args.uri else "all")
    keys = {"none": [""], "department": ["department"], "both": ["", "department"]}[args.partition_key]
    target = "Milvus Lite"
    if args.uri:
        with HierStore(args.uri, "bench_probe", spec=CollectionSpec(LEVELS, 192, (64,) * 3, vector_levels=(),
                                                                    partition_key="")) as probe:
            target = f"{probe.features.name} at {args.uri}"
            probe.drop()
    runs = []
    for n in sizes:
        vectors, queries, leaf, paths = make_data(n, args.queries)
        folder = Path(tempfile.mkdtemp(prefix="hiervec-bench-"))
        try:
            for index in indexes:
                for key in keys:
                    e2e = args.queries if args.end_to_end and index == indexes[-1] and key == keys[-1] else 0
                    runs.append({"n": n, **run_index(
                        index, vectors, queries, leaf, paths, 10, folder, args.settle, fixed, e2e, uri=args.uri,
                        vector_levels=None if level_vectors == "all" else (), partition_key=key)})
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        del vectors
    command = "python bench/search_latency.py" + (" --smoke" if args.smoke else "") + (
        f" --n {args.n}" if not args.smoke and args.n != "100000" else "") + (
        f" --indexes {args.indexes}" if args.indexes != ",".join(LITE_INDEXES) else "") + (
        f" --queries {args.queries}" if not args.smoke and args.queries != 200 else "") + (
        f" --search-param {args.search_param}" if fixed else "") + (
        f" --uri {args.uri}" if args.uri else "") + (
        f" --level-vectors {args.level_vectors}" if args.level_vectors else "") + (
        f" --partition-key {args.partition_key}" if args.partition_key != "none" else "") + (
        " --no-end-to-end" if not args.end_to_end and not args.smoke else "") + (
        f" --settle {args.settle:g}" if not args.smoke and args.settle != 900.0 else "")
    waited = ", ".join(f"{run['settled_s']:.0f}" for run in runs)
    layout = "192-d image + 3 x 64-d level vectors" if level_vectors == "all" else "the 192-d image vector only"
    settled = (f"once the server reported every row indexed (waited {waited} s)" if args.uri else
               f"once Lite's files were quiet for 60 s after flush (waited {waited} s)")
    print(f"# top-10 search on {target}, {' and '.join(f'{n:,}' for n in sizes)} vectors ({layout}), "
          f"{args.queries} queries, measured " + (settled if args.settle else "right after flush") + ", search breadth "
          f"{args.search_param or 'filter-aware (the default)'}\n\n"
          f"machine: {describe()}\ncommand: {command}\n")
    print("| vectors | index | partition key | insert + flush s | filter | rows passing | p50 ms | p99 ms | recall@10 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        for name, r in run["filters"].items():
            print(f"| {run['n']:,} | {run['index']} | {run['partition_key'] or 'none'} | {run['build_s']:.1f} | {name} | "
                  f"{r['share']:.1%} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['recall@10']:.3f} |")
    with_e2e = [run for run in runs if "end_to_end" in run]
    if with_e2e:
        print(f"\none query image end to end (PNG decode + 64 px MobileNetV2 embed + top-10 search, "
              f"{args.queries} rounds):\n")
        print("| vectors | index | decode p50 / p99 ms | embed p50 / p99 ms | search p50 / p99 ms | total p50 / p99 ms |")
        print("|---|---|---|---|---|---|")
        for run in with_e2e:
            cells = [f"{run['end_to_end'][part]['p50_ms']:.1f} / {run['end_to_end'][part]['p99_ms']:.1f}"
                     for part in ("decode", "embed", "search", "total")]
            print(f"| {run['n']:,} | {run['index']} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"sizes": sizes, "queries": args.queries, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
