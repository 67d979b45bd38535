"""Reindex rate against ingest rate, the same files: both should be bound by embedding.

    .venv/bin/python bench/reindex.py                        # the figures in BENCHMARKS.md
    .venv/bin/python bench/reindex.py --smoke                # seconds: CI keeps it from rotting

Files: the first `--images` PNGs of an openclipart export's train and test splits (`hiervec data
openclipart DIR`: real RGB images of varied sizes), else generated noise PNGs. Models: two
default pyramid models (MobileNetV2, 64-d per level) with different random weights (speed
does not depend on them), at `--image-size`. Each round ingests the files with model A into a
fresh collection of a Milvus Lite file (`ImageIndex.ingest`, what `hiervec ingest` runs),
then reindexes that collection with model B into a new collection of the same file
(`ImageIndex.ingest(stored_items(...))`, what `hiervec reindex` runs: the stored rows read
back, the files read and decoded again). Rates are images stored per second over each run;
the ratio is reindex over ingest, per round, then mean and std over the rounds.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._machine import describe  # noqa: E402
from embedder import Embedder, EmbedderConfig, Hierarchy, PyramidEmbedder, read_source, save_checkpoint  # noqa: E402
from milvus_store import HierStore  # noqa: E402
from hiervec_app import ImageIndex, IngestItem
from hiervec_app.reindex import stored_items  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parent / "out" / "openclipart-data"


def catalogue(data: Path, n: int, folder: Path) -> tuple[list[IngestItem], tuple[str, ...]]:
    """(items, level names): the export's train then test files, else `n` noise PNGs in a 2-level tree."""
    if (data / "test").is_dir():
        listed = [i for split in ("train", "test") for i in read_source(data / split).items]
        items = [IngestItem(i.path, i.category, uri=str(i.path)) for i in listed[:n]]
        return items, ("department", "category")
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        leaf = f"d{i % 3}/c{i % 6}"
        (folder / leaf).mkdir(parents=True, exist_ok=True)
        path = folder / leaf / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(path)
        items.append(IngestItem(path, leaf, uri=str(path)))
    return items, ("department", "category")


def model(items, levels, size: int, seed: int, path: Path, backbone: str) -> Embedder:
    hierarchy = Hierarchy.from_paths(sorted({i.category for i in items}), levels)
    torch.manual_seed(seed)
    config = EmbedderConfig.for_hierarchy(hierarchy, dim=64, image_size=size, backbone=backbone)
    save_checkpoint(path, PyramidEmbedder(config), hierarchy)
    return Embedder.from_checkpoint(path, runtime="torch")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="16 noise files, 32 px, resnet18, 1 round: seconds")
    args = parser.parse_args(argv)
    logging.getLogger("pymilvus").setLevel(logging.ERROR)  # Lite's iterator warns about timestamps on every pass
    if args.smoke:
        args.data, args.images, args.image_size, args.rounds, args.backbone = Path("/nonexistent"), 16, 32, 1, "resnet18"
    print(describe(("torch", "pymilvus", "milvus-lite")))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        items, levels = catalogue(args.data, args.images, folder / "files")
        old = model(items, levels, args.image_size, 0, folder / "a.pt", args.backbone)
        new = model(items, levels, args.image_size, 1, folder / "b.pt", args.backbone)
        db = str(folder / "bench.db")
        with ImageIndex.open(old, db, "warm-up") as index:  # first forward passes and Lite's start, untimed
            index.ingest(items[:64], batch_size=args.batch)
        rounds = []
        for r in range(args.rounds):
            with ImageIndex.open(old, db, f"v{r}") as index:
                ingested = index.ingest(items, batch_size=args.batch)
            with HierStore(db, f"v{r}", create=False) as source, ImageIndex.open(new, db, f"r{r}") as index:
                reindexed = index.ingest(stored_items(source), batch_size=args.batch)
            # files with the same bytes are one image (content ids): both store the same ones
            assert ingested.stored == reindexed.stored > 0, (ingested.to_dict(), reindexed.to_dict())
            rates = (ingested.stored / ingested.seconds, reindexed.stored / reindexed.seconds)
            rounds.append({"ingest_img_s": round(rates[0], 1), "reindex_img_s": round(rates[1], 1),
                           "ratio": round(rates[1] / rates[0], 3)})
            print(f"round {r}: ingest {rates[0]:.1f} img/s, reindex {rates[1]:.1f} img/s, "
                  f"ratio {rates[1] / rates[0]:.3f}")
    ratios = [r["ratio"] for r in rounds]
    summary = {"images": len(items), "stored": ingested.stored, "image_size": args.image_size, "backbone": args.backbone,
               "data": str(args.data) if (args.data / "test").is_dir() else "noise PNGs", "rounds": rounds,
               "ratio_mean": round(statistics.mean(ratios), 3),
               "ratio_std": round(statistics.stdev(ratios), 3) if len(ratios) > 1 else 0.0}
    print(f"reindex / ingest: {summary['ratio_mean']:.3f} +- {summary['ratio_std']:.3f} over {len(rounds)} round(s), "
          f"{len(items)} images at {args.image_size} px ({summary['data']})")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
