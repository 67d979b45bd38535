"""Retrieval quality of the pyramid model against flat metric learning and off-the-shelf features.

    .venv/bin/python bench/quality.py                          # class-level Fashion-MNIST, BENCHMARKS.md
    .venv/bin/python bench/quality.py --benchmark products     # product-level Fashion-MNIST (4 levels)
    .venv/bin/python bench/quality.py --benchmark openclipart --image-size 224   # real RGB clip art (2 levels)
    .venv/bin/python bench/quality.py --benchmark openclipart --per-leaf 5       # the few-shot variant
    .venv/bin/python bench/quality.py --smoke                  # seconds: CI keeps it from rotting

Methods, all with the same backbone (ImageNet MobileNetV2), input size, training budget
and seeds:

- ``pyramid``: what ``hiervec train`` does by default (its loss weights and model config);
- ``flat``: one global vector of the same total size, contrastive loss on leaf labels only;
- ``flat+softmax``: the same plus a softmax classifier on the leaf;
- ``off-the-shelf``: ImageNet MobileNetV2's pooled 1280-d features, no training (what a
  plain reverse-image-search pipeline does); one run, it has no seed;
- ``pyramid-no-softmax`` / ``pyramid-no-contrastive``: the pyramid's loss without its
  per-level softmax terms / without its contrastive terms.

Benchmarks:

- ``classes``: Fashion-MNIST's 3 levels (department > category > item). Trains on the
  first ``--train`` images of the train split; evaluates on the test split (``--split
  test``) or, for tuning, on ``--val`` train images never trained on (``--split val``).
- ``products``: each Fashion-MNIST image is a product with ``--photos`` random photos
  (`embedder.fashion_mnist.product_photos`); 4 levels, the leaf is the product. Trains
  on ``--train`` products of the train split; test products come from the test split,
  validation products from train images after the training ones: never seen in training.
- ``openclipart``: Debian's ``openclipart-png``, real RGB images in a 2-level category tree
  (department > category, 49 categories), exported by ``hiervec data openclipart`` (into
  ``--data``, on first use) with its deterministic train/val/test split by file. Training
  keeps its best epoch on the val split (as ``hiervec train`` does on its validation images)
  and stops early; ``--split test`` reports the test split, ``--split val`` the val split
  (tuning: the epoch is then chosen on the split that is reported, for every trained method
  alike). ``--per-leaf N`` trains on at most N images per category (the few-shot variant).

Protocol: the evaluation images are embedded, stored in Milvus Lite (FLAT, exact) and
each stored image vector searches the collection for its top 50, itself left out: the path
users' searches take. From those hits: leaf R@1/R@10, consistency@K at every level for
K = 1, 5, 10, 50, mean hierarchical distance of the top 10 (height of the lowest common
ancestor). MAP@R and H-AP read each query's ranking down to R, up to every item (999
hits per query on the class-level test split, which Milvus Lite returns at about 0.2 s a
query): they are computed exactly in numpy from the vectors read back from the
collection, and ``milvus_vs_exact@10`` in the JSON shows both rankings agree.

Every (method, seed) result is a JSON file under ``--out``; a rerun skips those already
there (``--fresh`` redoes them), then prints the tables and draws the consistency@K plot.
``--set [METHOD:]KEY=VALUE`` changes a knob for this run's methods, or for one of them
(tuning; name the configuration with ``--tag``):
EmbedderConfig fields (``level_weights``, ``level_dims``, ``classifier_scale``, ``pooling``),
TrainConfig fields (``lr``, ``margin``, ``classes_per_batch``, ``per_class``, ``epochs``, ...)
and loss weights (``contrastive``, ``level_contrastive``, ``softmax``); lists are
comma-separated.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._machine import describe  # noqa: E402
from embedder import EmbedderConfig, Hierarchy, LossWeights, TrainConfig, fashion_mnist, load_images, openclipart, read_source, train  # noqa: E402
from embedder.baseline import BackboneEmbedder  # noqa: E402
from embedder.inference import forward_batches  # noqa: E402
from embedder.metrics import (  # noqa: E402
    consistency_at_k, exact_neighbours, hierarchical_ap, hierarchical_distance, map_at_r, others_in_category,
    recall_at_k, shared_depth,
)
from milvus_store import CollectionSpec, HierStore, Record  # noqa: E402

METHODS = ("pyramid", "flat", "flat+softmax", "off-the-shelf", "pyramid-no-softmax", "pyramid-no-contrastive")
CONSISTENCY_KS = (1, 5, 10, 50)
CONFIG_KEYS = {"level_weights", "level_dims", "classifier_scale", "pooling", "fpn_channels", "dim"}
LOSS_KEYS = {"contrastive", "level_contrastive", "softmax"}
TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)} - {"loss", "seed", "val_fraction"}


# -- data --------------------------------------------------------------------------------
@dataclasses.dataclass
class Split:
    images: torch.Tensor  # uint8 (n, 3, S, S)
    paths: list[str]  # category path of each image, coarsest first


def to_rgb(gray: np.ndarray, size: int) -> torch.Tensor:
    """``(n, 28, 28)`` uint8 -> ``(n, 3, size, size)`` uint8, bilinear with antialiasing."""
    x = torch.from_numpy(np.array(gray, dtype=np.uint8))[:, None].float()
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


def class_splits(args) -> tuple[Split, Split]:
    images, labels = fashion_mnist.load("train")
    if args.train + args.val > len(images):
        raise SystemExit(f"--train {args.train} + --val {args.val} exceed the {len(images)} train images")
    train_split = Split(to_rgb(images[: args.train], args.image_size),
                        [fashion_mnist.CLASS_PATHS[c] for c in labels[: args.train]])
    if args.split == "val":
        chosen = slice(args.train, args.train + args.val)
    else:
        images, labels = fashion_mnist.load("test")
        chosen = slice(0, args.test or len(images))
    return train_split, Split(to_rgb(images[chosen], args.image_size),
                              [fashion_mnist.CLASS_PATHS[c] for c in labels[chosen]])


def product_split(split: str, count: int, offset: int, args) -> Split:
    views, labels = fashion_mnist.products(split, count, args.photos, offset=offset, seed=args.data_seed)
    paths = [f"{fashion_mnist.CLASS_PATHS[c]}/{fashion_mnist.product_name(split, offset + i)}"
             for i, c in enumerate(labels) for _ in range(args.photos)]
    return Split(to_rgb(views.reshape(-1, 28, 28), args.image_size), paths)


def openclipart_split(args, split: str) -> Split:
    """One split of the exported tree, decoded at --image-size; the training split cut to --per-leaf per category."""
    if not (args.data / "train").is_dir():
        print(f"exporting openclipart into {args.data} ...", file=sys.stderr)
        openclipart.export(args.data)
    listing = read_source(args.data / split)
    items = sorted(listing.items, key=lambda item: (item.category, item.path.name))
    if split == "train" and args.per_leaf:
        taken: dict[str, int] = {}
        few = []
        for item in items:
            if taken.get(item.category, 0) < args.per_leaf:
                taken[item.category] = taken.get(item.category, 0) + 1
                few.append(item)
        items = few
    images, indices, failures = load_images([i.path for i in items], args.image_size)
    if failures:
        raise SystemExit(f"{len(failures)} images of {args.data / split} failed to decode, e.g. {failures[0]}")
    return Split(images, [items[i].category for i in indices])


def openclipart_splits(args) -> tuple[Split, Split, Split]:
    """(train, evaluated, validation for choosing the epoch)."""
    train_split, val_split = openclipart_split(args, "train"), openclipart_split(args, "val")
    return train_split, val_split if args.split == "val" else openclipart_split(args, "test"), val_split


def product_splits(args) -> tuple[Split, Split]:
    train_split = product_split("train", args.train, 0, args)
    if args.split == "val":
        return train_split, product_split("train", args.val, args.train, args)
    return train_split, product_split("test", args.test or 1000, 0, args)


# -- methods -----------------------------------------------------------------------------
def parse_value(text: str):
    parts = [p.strip() for p in text.split(",")]
    values = []
    for part in parts:
        try:
            values.append(int(part))
        except ValueError:
            try:
                values.append(float(part))
            except ValueError:
                values.append(part)
    return tuple(values) if len(values) > 1 or text.endswith(",") else values[0]


def parse_overrides(pairs: list[str]) -> dict[str | None, dict]:
    """``{method or None (every method): {key: value}}`` from ``[METHOD:]KEY=VALUE`` pairs."""
    overrides: dict[str | None, dict] = {}
    for pair in pairs:
        target, colon, rest = pair.partition(":")
        method, assignment = (target, rest) if colon and target in METHODS else (None, pair)
        key, sep, value = assignment.partition("=")
        if not sep or key not in CONFIG_KEYS | LOSS_KEYS | TRAIN_KEYS:
            raise SystemExit(f"--set {pair!r}: expected [METHOD:]KEY=VALUE with KEY one of "
                             f"{', '.join(sorted(CONFIG_KEYS | LOSS_KEYS | TRAIN_KEYS))}")
        overrides.setdefault(method, {})[key] = parse_value(value)
    return overrides


def overrides_for(overrides: dict[str | None, dict], method: str) -> dict:
    return overrides.get(None, {}) | overrides.get(method, {})


def method_setup(method: str, hierarchy: Hierarchy, labels: np.ndarray, args, overrides: dict, seed: int):
    """(EmbedderConfig, TrainConfig) of a trained method on training `labels`, with the --set overrides applied."""
    depth = hierarchy.depth
    config_kwargs = {k: v for k, v in overrides.items() if k in CONFIG_KEYS}
    dim = config_kwargs.pop("dim", args.dim)
    dims = config_kwargs.pop("level_dims", dim)
    dims = tuple(dims) if isinstance(dims, tuple) else dims
    if isinstance(config_kwargs.get("level_weights"), (int, float)):
        config_kwargs["level_weights"] = (config_kwargs["level_weights"],) * depth
    mode = "flat" if method.startswith("flat") else "pyramid"
    if mode == "flat":
        config_kwargs.pop("level_weights", None)
    config = EmbedderConfig.for_hierarchy(hierarchy, dim=dims, backbone="mobilenet_v2", image_size=args.image_size,
                                          mode=mode, **config_kwargs)
    train_kwargs = {k: v for k, v in overrides.items() if k in TRAIN_KEYS}
    train_kwargs.setdefault("epochs", args.epochs)
    if args.steps:
        train_kwargs.setdefault("steps_per_epoch", args.steps)
    base = TrainConfig(**train_kwargs, seed=seed, val_fraction=0.0)
    default = base.loss_weights(dataclasses.replace(config, mode="pyramid"), labels[:, -1])
    as_tuple = lambda v: tuple(v) if isinstance(v, tuple) else (v,) * depth  # noqa: E731
    loss = LossWeights(
        contrastive=overrides.get("contrastive", default.contrastive),
        level_contrastive=as_tuple(overrides["level_contrastive"]) if "level_contrastive" in overrides
        else default.level_contrastive,
        softmax=as_tuple(overrides["softmax"]) if "softmax" in overrides else default.softmax,
    )
    if method == "flat":
        loss = LossWeights(contrastive=loss.contrastive or 1.0)
    elif method == "flat+softmax":
        leaf = loss.by_level("softmax", config.level_names).get(config.level_names[-1]) or 1.0
        loss = LossWeights(contrastive=loss.contrastive or 1.0, softmax={config.level_names[-1]: leaf})
    elif method == "pyramid-no-softmax":
        loss = dataclasses.replace(loss, softmax=())
    elif method == "pyramid-no-contrastive":
        loss = dataclasses.replace(loss, contrastive=0.0, level_contrastive=())
    return config, dataclasses.replace(base, loss=loss)


def off_the_shelf_vectors(images: torch.Tensor, level_names) -> np.ndarray:
    """ImageNet MobileNetV2's globally pooled last feature map (1280-d), L2-normalised: `hiervec eval --baseline`."""
    return BackboneEmbedder(level_names=level_names, image_size=images.shape[-1]).embed(images).concat


# -- evaluation through Milvus Lite -------------------------------------------------------
def milvus_neighbours(concat: np.ndarray, levels: dict[str, np.ndarray], paths: list[str], level_names, depth: int,
                      folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Store the vectors in Milvus Lite (FLAT) and search each one, itself left out.

    Returns (neighbours ``(n, depth)`` indices, image vectors read back from Milvus).
    """
    spec = CollectionSpec(level_names, dim=concat.shape[1], level_dims=tuple(v.shape[1] for v in levels.values()),
                          index="FLAT")
    store = HierStore(str(folder / "eval.db"), "quality", spec=spec)
    try:
        store.upsert((Record(path, concat[i], {k: v[i] for k, v in levels.items()}, id=str(i))
                      for i, path in enumerate(paths)), batch_size=2000)
        store.flush()
        ids = [str(i) for i in range(len(paths))]
        stored = np.concatenate([store.embeddings(ids[s : s + 2000]).concat for s in range(0, len(ids), 2000)])
        neighbours = np.empty((len(paths), depth), dtype=np.int64)
        for start in range(0, len(paths), 100):
            results = store.search(stored[start : start + 100], k=depth + 1, output=[])
            for q, hits in enumerate(results, start=start):
                ranked = [int(h.id) for h in hits if h.id != str(q)][:depth]
                if len(ranked) < depth:
                    raise RuntimeError(f"Milvus returned {len(ranked)} neighbours of {q}, expected {depth}")
                neighbours[q] = ranked
    finally:
        store.close()
    return neighbours, stored


def evaluate(concat: np.ndarray, levels: dict[str, np.ndarray], split: Split, level_names, folder: Path) -> dict:
    labels = Hierarchy.from_paths(split.paths, level_names).encode_many(split.paths)
    r = others_in_category(labels)
    depth = min(len(labels) - 1, max(CONSISTENCY_KS))
    started = time.perf_counter()
    neighbours, stored = milvus_neighbours(concat, levels, split.paths, level_names, depth, folder)
    search_s = time.perf_counter() - started
    # one query set for every figure: the queries with another image of their leaf category (as
    # pytorch-metric-learning's AccuracyCalculator; none are left out on these splits)
    same = leaf_agreement(labels, neighbours, len(level_names))[r > 0]
    report = {"recall@1": recall_at_k(same, 1), "recall@10": recall_at_k(same, 10),
              "hier_distance@10": hierarchical_distance(same, 10), "left_out": int((r == 0).sum())}
    for i, name in enumerate(level_names):
        for k in CONSISTENCY_KS:
            report[f"consistency@{k}/{name}"] = consistency_at_k(same, k, i)
    # MAP@R and H-AP read each query's ranking down to R (up to all items): exact, in numpy,
    # over the vectors read back from Milvus; top-10 agreement shows both rank alike.
    started = time.perf_counter()
    exact = exact_neighbours(stored, min(len(labels) - 1, max(depth, int(r.max()))))
    report["milvus_vs_exact@10"] = float(np.mean([len(set(a[:10]) & set(b[:10])) / 10
                                                  for a, b in zip(neighbours, exact)]))
    report["map@r"] = map_at_r(leaf_agreement(labels, exact, len(level_names))[r > 0], r[r > 0])
    # H-AP as HAPPIER computes it (the query counted in the relevance sets), with its "map" and "pop"
    # relevances; "h_ap" without the query, the convention of the tables published before
    report["hap"] = hierarchical_ap(stored, labels)
    if len(level_names) > 1:
        report["hap_pop"] = hierarchical_ap(stored, labels, relevance="pop")
    report["h_ap"] = hierarchical_ap(stored, labels, count_query=False)
    report["seconds_milvus"], report["seconds_exact"] = search_s, time.perf_counter() - started
    return report


def leaf_agreement(labels: np.ndarray, neighbours: np.ndarray, depth: int) -> np.ndarray:
    """``(n, K, levels)``: does hit j share query q's path down to each level?"""
    shared = shared_depth(labels, labels[neighbours])
    return shared[:, :, None] > np.arange(depth)[None, None, :]


def run_one(method: str, seed: int, data: tuple[Split, ...], level_names, args, overrides: dict) -> dict:
    train_split, eval_split, *selection_split = data
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        if method == "off-the-shelf":
            concat, levels, setup = off_the_shelf_vectors(eval_split.images, level_names), {}, {}
            train_s = 0.0
        else:
            hierarchy = Hierarchy.from_paths(train_split.paths, level_names)
            labels = hierarchy.encode_many(train_split.paths)
            config, train_config = method_setup(method, hierarchy, labels, args, overrides, seed)
            validation = [(split.images, hierarchy.encode_many(split.paths)) for split in selection_split]
            result = train(train_split.images, labels, hierarchy, config, train_config, out=Path(tmp) / "m.pt",
                           backbone_weights="imagenet", log=lambda line: print("   ", line, file=sys.stderr),
                           validation=validation[0] if validation else None)
            train_s = time.perf_counter() - started
            model = result.checkpoint
            from embedder import PyramidEmbedder

            net = PyramidEmbedder(model.config)
            net.load_state_dict(model.state_dict)
            vectors = forward_batches(net, eval_split.images, 128)
            concat, levels = vectors.concat, dict(vectors.levels)
            setup = {"config": config.to_dict() | {"num_classes": None}, "train": train_config.to_dict(),
                     "selection": model.selection}
        report = evaluate(concat, levels, eval_split, level_names, Path(tmp))
    return {"method": method, "seed": seed, "train_s": round(train_s, 1), **setup, "metrics": report}


# -- report ------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


COLUMNS = [("recall@1", "leaf R@1", True), ("recall@10", "leaf R@10", True), ("map@r", "MAP@R", True),
           ("hap", "H-AP", True)]


def h_ap_key(results: dict[str, list[dict]]) -> tuple[str, str]:
    """The H-AP every result has: HAPPIER's ("hap"), or, when a result predates it, the one without
    the query in the relevance sets ("h_ap"), titled so."""
    if all("hap" in r["metrics"] for runs in results.values() for r in runs):
        return "hap", "H-AP"
    return "h_ap", "H-AP (query not counted)"


def table(results: dict[str, list[dict]], level_names) -> tuple[str, list[str]]:
    columns = [c if c[0] != "hap" else (*h_ap_key(results), True) for c in COLUMNS]
    columns += [(f"consistency@10/{n}", f"consistency@10 {n}", True) for n in level_names[:-1]]
    columns += [(f"consistency@10/{level_names[-1]}", f"consistency@10 {level_names[-1]}", True),
                ("hier_distance@10", "hier. distance@10", False)]
    stats = {m: {key: mean_std([r["metrics"][key] for r in runs]) for key, _, _ in columns}
             for m, runs in results.items()}
    lines = ["| method | seeds | " + " | ".join(title for _, title, _ in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    best = {key: (max if higher else min)(stats, key=lambda m: stats[m][key][0]) for key, _, higher in columns}
    for method, runs in results.items():
        cells = []
        for key, _, _ in columns:
            mean, std = stats[method][key]
            text = f"{mean:.4f} ± {std:.4f}" if len(runs) > 1 else f"{mean:.4f}"
            cells.append(f"**{text}**" if best[key] == method else text)
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + " |")
    losses = []
    if "pyramid" in stats:
        for key, title, higher in columns:
            mean, std = stats["pyramid"][key]
            behind, close = [], []
            for other in stats:
                if other == "pyramid":
                    continue
                o_mean, o_std = stats[other][key]
                shown = f"{other} {o_mean:.4f} ± {o_std:.4f}"
                if (o_mean > mean) if higher else (o_mean < mean):
                    behind.append(shown)
                elif abs(mean - o_mean) <= 2 * max(std, o_std):
                    close.append(shown)
            parts = ([f"behind {', '.join(behind)}"] if behind else []) + (
                [f"within 2 std of {', '.join(close)}"] if close else [])
            if parts:
                losses.append(f"{title}: pyramid {mean:.4f} ± {std:.4f}; " + "; ".join(parts))
    return "\n".join(lines), losses


def consistency_table(results: dict[str, list[dict]], level_names) -> str:
    lines = ["| method | level | " + " | ".join(f"@{k}" for k in CONSISTENCY_KS) + " |",
             "|---|---|" + "---|" * len(CONSISTENCY_KS)]
    for method, runs in results.items():
        for name in level_names:
            cells = [mean_std([r["metrics"][f"consistency@{k}/{name}"] for r in runs]) for k in CONSISTENCY_KS]
            lines.append(f"| {method} | {name} | " + " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], level_names, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(level_names), figsize=(4 * len(level_names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], level_names):
        for method, runs in results.items():
            stats = [mean_std([r["metrics"][f"consistency@{k}/{name}"] for r in runs]) for k in CONSISTENCY_KS]
            ax.errorbar(CONSISTENCY_KS, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", ms=3,
                        capsize=2, label=method)
        ax.set_xscale("log")
        ax.set_xticks(CONSISTENCY_KS, [str(k) for k in CONSISTENCY_KS])
        ax.set_title(name)
        ax.set_xlabel("K")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("consistency@K")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(args, level_names) -> None:
    """One row per configuration (results folder) and method: the tuning record."""
    prefix = f"quality-{args.benchmark}-{args.split}"
    print(f"| configuration | method | seeds | loss weights and knobs | leaf R@1 | MAP@R | H-AP (query not counted) | "
          + " | ".join(f"consistency@10 {n}" for n in level_names[:-1]) + " | hier. distance@10 |")
    print("|---|---|---|---|---|---|---|" + "---|" * (len(level_names) - 1) + "---|")
    for folder in sorted(args.out.glob(f"{prefix}*"), key=lambda f: f.stat().st_mtime):
        runs: dict[str, list[dict]] = {}
        for path in sorted(folder.glob("*.json")):
            result = json.loads(path.read_text())
            runs.setdefault(result["method"], []).append(result)
        for method, results in runs.items():
            cells = [np.mean([r["metrics"][k] for r in results]) for k in
                     ["recall@1", "map@r", "h_ap", *(f"consistency@10/{n}" for n in level_names[:-1]),
                      "hier_distance@10"]]
            loss = (results[0].get("train") or {}).get("loss") or {}
            knobs = {k: v for k, v in (results[0].get("overrides") or {}).items() if k not in LOSS_KEYS}
            shown = (f"contrastive {loss.get('contrastive')}, softmax {loss.get('softmax')}"
                     + (f", level contrastive {loss['level_contrastive']}" if loss.get("level_contrastive") else "")
                     if loss else "(no training)") + "".join(f", {k} {v}" for k, v in knobs.items())
            print(f"| {folder.name[len(prefix) + 1:] or '(defaults)'} | {method} | {len(results)} | {shown} | "
                  + " | ".join(f"{c:.4f}" for c in cells) + " |")


# -- main --------------------------------------------------------------------------------
DEFAULTS = {  # benchmark -> the budget BENCHMARKS.md reports
    "classes": dict(train=10000, val=5000, test=5000, epochs=2),
    "products": dict(train=4000, val=500, test=1000, epochs=3),
    "openclipart": dict(),  # the exported splits; epochs and steps: `hiervec train`'s defaults from the data
}
LEVELS = {"classes": fashion_mnist.LEVEL_NAMES, "products": fashion_mnist.PRODUCT_LEVEL_NAMES,
          "openclipart": openclipart.LEVEL_NAMES}
TITLES = {"classes": "Fashion-MNIST classes", "products": "Fashion-MNIST products", "openclipart": "openclipart"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", choices=tuple(DEFAULTS), default="classes")
    parser.add_argument("--data", type=Path, default=Path("bench/out/openclipart-data"),
                        help="openclipart: the tree `hiervec data openclipart` wrote (exported there when missing)")
    parser.add_argument("--per-leaf", type=int, help="openclipart: at most N training images per category")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--train", type=int, help="training images (classes) or products; default per benchmark")
    parser.add_argument("--val", type=int, help="validation images or products, after the training ones")
    parser.add_argument("--test", type=int, help="test images or products, the first of the test split")
    parser.add_argument("--photos", type=int, default=5, help="photos per product")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the products' photos")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--steps", type=int, help="steps per epoch (default: one pass over the training images)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64, help="vector size per level (flat: times the levels)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tag", default="", help="names this configuration's results folder")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--plot", type=Path, help="PNG of consistency@K (default: beside the results)")
    parser.add_argument("--fresh", action="store_true", help="redo results already on disk")
    parser.add_argument("--smoke", action="store_true", help="tiny data, a few steps, 2 seeds, into a temp folder")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: tables and plot from the results already on disk (seeds may differ)")
    parser.add_argument("--summary", action="store_true",
                        help="only list every configuration already run for --benchmark and --split")
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.benchmark].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.smoke:
        args.train, args.val, args.test, args.epochs, args.steps = (240, 60, 60, 1, 2) if args.benchmark == "products" \
            else (320, 80, 120, 1, 2)
        args.seeds, args.image_size, args.dim, args.photos = "0,1", 32, 8, 3
    level_names = LEVELS[args.benchmark]
    if args.summary:
        summary(args, level_names)
        return 0
    overrides = parse_overrides(args.overrides)
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]

    with tempfile.TemporaryDirectory() as smoke_dir:
        name = (f"quality-{args.benchmark}-{args.split}" + (f"-{args.image_size}px" if args.benchmark == "openclipart" else "")
                + (f"-per{args.per_leaf}" if args.per_leaf else "") + (f"-{args.tag}" if args.tag else ""))
        folder = (Path(smoke_dir) if args.smoke else args.out) / name
        folder.mkdir(parents=True, exist_ok=True)
        data = None
        results: dict[str, list[dict]] = {}
        for method in methods:
            for seed in seeds[:1] if method == "off-the-shelf" else seeds:
                path = folder / f"{method}-seed{seed}.json"
                if path.is_file() and not args.fresh:
                    results.setdefault(method, []).append(json.loads(path.read_text()))
                    continue
                if args.report_only:
                    continue
                if data is None:
                    data = {"products": product_splits, "classes": class_splits,
                            "openclipart": openclipart_splits}[args.benchmark](args)
                    print(f"{len(data[0].images)} training images, {len(data[1].images)} {args.split} images",
                          file=sys.stderr)
                print(f"== {method} seed {seed}", file=sys.stderr)
                chosen = overrides_for(overrides, method)
                result = run_one(method, seed, data, level_names, args, chosen)
                result["overrides"] = {k: list(v) if isinstance(v, tuple) else v for k, v in chosen.items()}
                path.write_text(json.dumps(result, indent=1))
                results.setdefault(method, []).append(result)
                m = result["metrics"]
                print(f"   {method} seed {seed}: R@1 {m['recall@1']:.4f} MAP@R {m['map@r']:.4f} H-AP {m['hap']:.4f} "
                      f"hier {m['hier_distance@10']:.4f} ({result['train_s']:.0f}s training)", file=sys.stderr)
        if not results:
            raise SystemExit(f"no results in {folder} for methods {', '.join(methods)}")
        plot_path = args.plot or folder / "consistency.png"
        budget = (f"the exported split{f', at most {args.per_leaf} training images per category' if args.per_leaf else ''}"
                  f", {args.epochs or 'default'} epoch(s), {args.image_size} px"
                  if args.benchmark == "openclipart" else
                  f"{args.train} {'products x ' + str(args.photos) + ' photos' if args.benchmark == 'products' else 'images'}"
                  f", {args.epochs} epoch(s){f' of {args.steps} steps' if args.steps else ''}, {args.image_size} px")
        plot(results, level_names, plot_path, f"{TITLES[args.benchmark]}, {args.split} split; {budget}")
        main_table, losses = table(results, level_names)
        command = "python bench/quality.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
        print(f"# retrieval quality, {TITLES[args.benchmark]} ({args.split} split), leave-one-out through "
              f"Milvus Lite\n\nmachine: {describe(('torch', 'torchvision', 'pymilvus', 'milvus-lite'))}\n"
              f"command: {command}\nbudget: {budget}, mobilenet_v2 (ImageNet), seeds {args.seeds}"
              + "".join(f"; {m or 'every method'}: {o}" for m, o in overrides.items()) + "\n")
        print(main_table)
        print("\nconsistency@K, mean ± std over seeds:\n")
        print(consistency_table(results, level_names))
        if "pyramid" in results:
            print("\nwhere the pyramid model does not win, method by method (behind, or within 2 standard deviations, "
                  "the larger of the two):")
            print("\n".join(f"- {line}" for line in losses) or "- nowhere: it leads every column by more than 2 std")
        print(f"\nplot: {'(smoke: temporary)' if args.smoke and not args.plot else plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
