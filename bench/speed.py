"""Embedding throughput: `Embedder.embed` against the bare backbone's forward pass.

    .venv/bin/python bench/speed.py                 # 64 px (the default model), batch 64
    .venv/bin/python bench/speed.py --sizes 64,128,224
    .venv/bin/python bench/speed.py --smoke         # seconds: CI keeps it from rotting

Both sides run the same batch size, thread count and input, under
`torch.inference_mode` with channels_last; the backbone is torchvision's model up to the
deepest pyramid stage (what `PyramidEmbedder` extracts), so the ratio is the cost of the
pyramid, the per-level heads and normalisation. `embed(files)` adds PNG decoding and
resizing (a thread pool) to show the end-to-end rate from disk, and the ingest column
runs `ImageIndex.ingest` on the same files into Milvus Lite (HNSW): reading, hashing,
decoding, embedding and writing, against embedding the files alone.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._machine import describe  # noqa: E402
from embedder import Embedder, EmbedderConfig, Hierarchy, PyramidEmbedder  # noqa: E402
from embedder.backbones import backbone_spec, build_backbone  # noqa: E402
from embedder.fashion_mnist import CLASS_PATHS, LEVEL_NAMES  # noqa: E402
from milvus_store import ImageIndex, IngestItem  # noqa: E402
from torchvision.models.feature_extraction import create_feature_extractor  # noqa: E402


def rate(fn, images: int, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return images / best


def measure(backbone: str, size: int, batch: int, batches: int, repeats: int, folder: Path) -> dict:
    hierarchy = Hierarchy.from_paths(CLASS_PATHS, LEVEL_NAMES)
    config = EmbedderConfig.for_hierarchy(hierarchy, dim=64, backbone=backbone, image_size=size)
    embedder = Embedder(PyramidEmbedder(config), hierarchy, "bench", batch_size=batch)
    spec = backbone_spec(backbone)
    bare = create_feature_extractor(build_backbone(backbone), {spec.stages[-1]: "out"}).eval()
    bare = bare.to(memory_format=torch.channels_last)
    n = batch * batches
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(n, 3, size, size, generator=generator) * 255).to(torch.uint8)

    def backbone_pass():
        with torch.inference_mode():
            for start in range(0, n, batch):
                x = images[start : start + batch].float().div_(255).contiguous(memory_format=torch.channels_last)
                bare(x)

    files = []
    for i in range(n):
        path = folder / f"{size}-{i}.png"
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(path)
        files.append(path)
    items = [IngestItem(path, CLASS_PATHS[i % len(CLASS_PATHS)]) for i, path in enumerate(files)]
    with ImageIndex.open(embedder, str(folder / f"ingest-{size}.db"), "bench") as index:
        # skip_existing=False: every repeat decodes, embeds and writes all files again (an upsert)
        ingest_img_s = rate(lambda: index.ingest(items, batch_size=batch, skip_existing=False), n, repeats)
    return {
        "size": size,
        "backbone_img_s": rate(backbone_pass, n, repeats),
        "embed_tensors_img_s": rate(lambda: embedder.embed(images), n, repeats),
        "embed_files_img_s": rate(lambda: embedder.embed(files), n, repeats),
        "ingest_img_s": ingest_img_s,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--sizes", default="64")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="one small batch at 64 px")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.batch, args.batches, args.repeats = "64", 8, 1, 1
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(args.backbone, int(s), args.batch, args.batches, args.repeats, Path(tmp))
                for s in args.sizes.split(",")]
    command = "python bench/speed.py" + (" --smoke" if args.smoke else f" --sizes {args.sizes}")
    print(f"# embedding throughput, {args.backbone}, batch {args.batch}, {torch.get_num_threads()} threads\n\n"
          f"machine: {describe(('torch', 'torchvision', 'numpy'))}\ncommand: {command}\n")
    print("| input px | bare backbone img/s | Embedder (tensors) img/s | ratio | Embedder (PNG files) img/s "
          "| ingest to Milvus Lite img/s | ingest / embed files |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['backbone_img_s']:.0f} | {r['embed_tensors_img_s']:.0f} | "
              f"{r['embed_tensors_img_s'] / r['backbone_img_s']:.2f} | {r['embed_files_img_s']:.0f} | "
              f"{r['ingest_img_s']:.0f} | {r['ingest_img_s'] / r['embed_files_img_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
