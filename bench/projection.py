"""How much of the backbone's search survives the backbone start's projection, by width.

    .venv/bin/python bench/projection.py                               # validation split, 128 px
    .venv/bin/python bench/projection.py --per-leaf 5 --split test     # the few-shot variant's test split

The backbone start (`PyramidEmbedder.start_from_backbone`) makes every level vector the
backbone's average-pooled deepest map projected on its top singular directions, computed
from the training images: epoch 0 searches with that projection, and training that never
beats it keeps it. This script measures that projection against the untrained backbone's full
1280-d vectors (the off-the-shelf baseline), with no model and no training: ImageNet
MobileNetV2's pooled features of the openclipart export (`hiervec data openclipart`), the
directions fitted on the training split (cut to `--per-leaf` per category, as
`bench/quality.py` does), searched leave-one-out on the evaluated split with exact cosine
neighbours (numpy; `bench/quality.py` searches through Milvus Lite, whose FLAT search
ranks the same). Rows: the full vector, the uncentred top-k directions the start uses (k =
64, the default --dim, then 128 and 256), and for comparison the centred ones (PCA).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._machine import describe  # noqa: E402
from bench.quality import leaf_agreement, openclipart_split  # noqa: E402
from embedder import Hierarchy  # noqa: E402
from embedder.baseline import BackboneEmbedder, pooled_features  # noqa: E402
from embedder.metrics import consistency_at_k, exact_neighbours, map_at_r, others_in_category, recall_at_k  # noqa: E402

LEVELS = ("department", "category")
DEFAULT_DATA = Path(__file__).resolve().parent / "out" / "openclipart-data"


def features(images: torch.Tensor) -> np.ndarray:
    """ImageNet MobileNetV2's average-pooled deepest map, not normalised."""
    backbone = BackboneEmbedder(level_names=LEVELS, image_size=images.shape[-1])
    body, stage, mean, std = backbone.body, backbone.stage, backbone.mean, backbone.std
    return pooled_features(body, stage, images, mean, std, normalize=False)


def scores(vectors: np.ndarray, paths: list[str]) -> dict:
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
    labels = Hierarchy.from_paths(paths, LEVELS).encode_many(paths)
    r = others_in_category(labels)
    neighbours = exact_neighbours(vectors, min(len(paths) - 1, max(10, int(r.max()))))
    same = leaf_agreement(labels, neighbours, len(LEVELS))
    out = {"recall@1": recall_at_k(same, 1), "map@r": map_at_r(same, r)}
    for i, name in enumerate(LEVELS):
        out[f"consistency@10/{name}"] = consistency_at_k(same, 10, i)
    return {k: round(float(v), 4) for k, v in out.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--per-leaf", type=int, default=None)
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--widths", default="64,128,256")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    print(describe(("torch", "torchvision")))
    train = openclipart_split(args, "train")
    evaluated = openclipart_split(args, args.split)
    fit, query = features(train.images).astype(np.float64), features(evaluated.images).astype(np.float64)
    rows = {"backbone, 1280-d (off-the-shelf)": scores(query, evaluated.paths)}
    _, _, vh = np.linalg.svd(fit, full_matrices=False)  # uncentred: the start's directions
    mean = fit.mean(0)
    _, _, pc = np.linalg.svd(fit - mean, full_matrices=False)
    for width in (int(w) for w in args.widths.split(",")):
        rows[f"uncentred top {width} (the start)"] = scores(query @ vh[:width].T, evaluated.paths)
        rows[f"centred top {width} (PCA)"] = scores((query - mean) @ pc[:width].T, evaluated.paths)
    header = ["vectors", "leaf R@1", "MAP@R", "consistency@10 department", "consistency@10 category"]
    print(f"\n{len(train.paths)} training images (per leaf: {args.per_leaf or 'all'}), {len(evaluated.paths)} "
          f"{args.split} images, {args.image_size} px\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in row.values()) + " |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
