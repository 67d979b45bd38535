"""Category prediction on Fashion-MNIST: accuracy per level, calibration, and `--auto` routing.

    .venv/bin/python bench/prediction.py            # the demo model (run `make demo` first), test split
    .venv/bin/python bench/prediction.py --queries 500 --thresholds 0.5,0.9
    .venv/bin/python bench/prediction.py --smoke    # seconds: a tiny untrained model, CI keeps it from rotting

Measures, on the test split (never seen in training):
- hierarchical accuracy of `Embedder.predict` per level (the predicted category at the
  level is the true one), and of level-by-level argmax for comparison;
- expected calibration error per level before and after the checkpoint's temperatures;
- leave-one-out search through Milvus Lite (FLAT, exact) for `--queries` test images:
  plain search against `--auto LEVEL` at each level and threshold: leaf R@1,
  consistency@10 per level, and the share of queries routed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._machine import describe  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "runs/demo/fashion.pt"))
    parser.add_argument("--queries", type=int, default=2000, help="Leave-one-out search queries (test images).")
    parser.add_argument("--thresholds", default="0.5,0.9,0.99")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    thresholds = [float(t) for t in args.thresholds.split(",")]

    from embedder import Embedder, expected_calibration_error, fashion_mnist
    from milvus_store import Record
    from hiervec_app import ImageIndex, SearchRequest

    if args.smoke:
        images, labels, embedder = _smoke_setup()
        args.queries, thresholds = 20, [0.5]
    else:
        if not Path(args.model).exists():
            parser.error(f"{args.model} is missing: run `make demo` first, or pass --model")
        embedder = Embedder.from_checkpoint(args.model)
        images, labels = _fashion_test(fashion_mnist, embedder)
    hierarchy, names = embedder.hierarchy, embedder.level_names
    started = time.perf_counter()
    out = embedder.embed(images)
    predictions = embedder.predict_vectors(out)
    truth = [hierarchy.leaves[int(code)] for code in labels[:, -1]]
    report: dict = {"machine": describe(("torch", "pymilvus", "milvus-lite")),
                    "command": "python bench/prediction.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "images": len(truth), "temperatures": dict(embedder.temperatures)}

    # accuracy: joint decoding against level-by-level argmax
    raw = _raw_logits(embedder, out)
    report["accuracy"] = {}
    for depth, name in enumerate(names, start=1):
        joint = np.mean([p.path.split("/")[:depth] == t.split("/")[:depth] for p, t in zip(predictions, truth)])
        argmax = None if raw[depth - 1] is None else float(np.mean(raw[depth - 1].argmax(1).numpy() == labels[:, depth - 1]))
        report["accuracy"][name] = {"joint": float(joint), "argmax": argmax}
    if all(r is not None for r in raw):
        codes = np.stack([r.argmax(1).numpy() for r in raw], 1)
        consistent = [all(hierarchy.parents[lv][c[lv]] == c[lv - 1] for lv in range(1, len(names))) for c in codes]
        report["argmax_paths_impossible"] = float(1 - np.mean(consistent))
    report["ece"] = {name: {"before": expected_calibration_error(torch.softmax(r, 1), labels[:, i]),
                            "after": expected_calibration_error(torch.softmax(r / t, 1), labels[:, i])}
                     for i, (name, r, t) in enumerate(zip(names, raw, embedder.temperatures.values())) if r is not None}

    # routing through Milvus Lite, leave-one-out
    rng = np.random.default_rng(0)
    queries = np.sort(rng.choice(len(truth), size=min(args.queries, len(truth)), replace=False))
    with tempfile.TemporaryDirectory(prefix="hiervec-prediction-") as tmp, \
            ImageIndex.open(embedder, str(Path(tmp) / "p.db"), "test", index="FLAT") as index:
        records = [Record(truth[i], out.concat[i], {n: v[i] for n, v in out.levels.items()}, id=str(i))
                   for i in range(len(truth))]
        index.store.upsert(records)
        index.store.flush()
        configs = [("plain", None, 0.5)] + [(f"auto {name} >= {t}", name, t) for name in names for t in thresholds]
        report["routing"] = []
        for label, level, threshold in configs:
            # each query searches with its stored vectors, itself left out (leave-one-out)
            request = SearchRequest(k=10, ids=tuple(str(q) for q in queries), auto=level, min_confidence=threshold)
            results = index.search(request)
            same_leaf, consistent = [], {n: [] for n in names}
            routed = sum(1 for result in results if result.route is not None and result.route.routed)
            for query, result in zip(queries, results):
                hits = result.hits
                query_path = truth[query].split("/")
                same_leaf.append(bool(hits) and hits[0].category == truth[query])
                for depth, name in enumerate(names, start=1):
                    consistent[name].append(np.mean([h.category.split("/")[:depth] == query_path[:depth] for h in hits]))
            report["routing"].append({"search": label, "routed": routed / len(queries),
                                      "leaf_r@1": float(np.mean(same_leaf)),
                                      **{f"consistency@10/{n}": float(np.mean(v)) for n, v in consistent.items()}})
    report["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"machine: {report['machine']}\ncommand: {report['command']}")
    print(f"{report['images']} test images; temperatures {', '.join(f'{n} {t:.2f}' for n, t in report['temperatures'].items())}; "
          f"{report['seconds']} s\n")
    print("| level | accuracy (joint decoding) | accuracy (argmax per level) | ECE before | ECE after |")
    print("|---|---|---|---|---|")
    for name in names:
        acc, ece = report["accuracy"][name], report["ece"].get(name, {})
        argmax = f"{acc['argmax']:.4f}" if acc["argmax"] is not None else "-"
        print(f"| {name} | {acc['joint']:.4f} | {argmax} | {ece.get('before', float('nan')):.4f} | "
              f"{ece.get('after', float('nan')):.4f} |")
    if "argmax_paths_impossible" in report:
        print(f"\nlevel-by-level argmax gives a path that is not in the tree for "
              f"{100 * report['argmax_paths_impossible']:.2f}% of images; joint decoding never does.")
    print(f"\nleave-one-out search, {len(queries)} queries, top 10, Milvus Lite FLAT:\n")
    print("| search | routed | leaf R@1 | " + " | ".join(f"consistency@10 {n}" for n in names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for row in report["routing"]:
        print(f"| {row['search']} | {100 * row['routed']:.1f}% | {row['leaf_r@1']:.4f} | "
              + " | ".join(f"{row[f'consistency@10/{n}']:.4f}" for n in names) + " |")
    return 0


def _raw_logits(embedder, out) -> list:
    """Each level's classifier logits before temperature (None where a level has none)."""
    with torch.inference_mode():
        logits = embedder.model.classify({n: torch.from_numpy(v) for n, v in out.levels.items()},
                                         torch.from_numpy(out.concat))
    return [logits.get(name) for name in embedder.level_names]


def _fashion_test(fashion_mnist, embedder):
    """The test split, prepared exactly as ingest prepares the exported PNGs."""
    from PIL import Image

    images, classes = fashion_mnist.load("test")
    labels = embedder.hierarchy.encode_many([fashion_mnist.CLASS_PATHS[int(c)] for c in classes])
    return torch.stack([embedder.prepare(Image.fromarray(image)) for image in images]), labels


def _smoke_setup():
    from embedder import Embedder, EmbedderConfig, Hierarchy, PyramidEmbedder

    leaves = ["clothing/tops/shirt", "clothing/tops/coat", "clothing/bottoms/trouser", "footwear/boots/boot"]
    hierarchy = Hierarchy.from_paths(leaves, ("department", "category", "item"))
    torch.manual_seed(0)
    config = EmbedderConfig.for_hierarchy(hierarchy, dim=8, backbone="resnet18", image_size=32, fpn_channels=16)
    embedder = Embedder(PyramidEmbedder(config), hierarchy, "smoke")
    rng = np.random.default_rng(0)
    labels = hierarchy.encode_many([leaves[i % 4] for i in range(40)])
    images = torch.from_numpy(rng.integers(0, 255, (40, 3, 32, 32), dtype=np.uint8))
    return images, labels, embedder


if __name__ == "__main__":
    sys.exit(main())
