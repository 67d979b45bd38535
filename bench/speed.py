"""Embedding throughput: `Embedder.embed` against the bare backbone's forward pass and the CPU's peak.

    .venv/bin/python bench/speed.py                 # 64 px (the default model), batch 64
    .venv/bin/python bench/speed.py --sizes 64,128,224 --checkpoint runs/demo/fashion.pt
    .venv/bin/python bench/speed.py --smoke         # seconds: CI keeps it from rotting

Both sides run the same batch size, thread count and input, under
`torch.inference_mode` with channels_last; the backbone is torchvision's model up to the
deepest pyramid stage (what `PyramidEmbedder` extracts), so the ratio is the cost of the
pyramid, the per-level heads and normalisation. `embed(files)` adds PNG decoding and
resizing (a thread pool) to show the end-to-end rate from disk, and the ingest column
runs `ImageIndex.ingest` on the same files into Milvus Lite (HNSW): reading, hashing,
decoding, embedding and writing, against embedding the files alone.

FLOPs are counted by `torch.utils.flop_counter` (a multiply-add is 2 FLOPs) for one
image's forward pass; the CPU's peak is the best rate of a large float32 matrix product
on all threads, what any convolution could hope for. (A nominal peak from the clock in
/proc/cpuinfo came out below the measured one here: the cores boost above it.)

The faster path is `Embedder(optimize=True)` (`hiervec ingest/eval/serve --optimize`): the
model traced, frozen and handed to oneDNN. With `--checkpoint`, its effect on retrieval
is measured on the first `--eval-images` Fashion-MNIST test images: exact leave-one-out
leaf R@1 and consistency@10 per level from eager and optimized vectors.
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
from embedder.metrics import agreement, consistency_at_k, exact_neighbours, recall_at_k  # noqa: E402
from embedder.fashion_mnist import CLASS_PATHS, LEVEL_NAMES  # noqa: E402
from hiervec_core.names import RUNTIMES  # noqa: E402
from hiervec_app import ImageIndex, IngestItem  # noqa: E402
from torchvision.models.feature_extraction import create_feature_extractor  # noqa: E402


def rate(fn, images: int, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return images / best


def measure(backbone: str, size: int, batch: int, batches: int, repeats: int, folder: Path,
            runtimes: tuple[str, ...]) -> dict:
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
    fast = Embedder(embedder.model, hierarchy, "bench", batch_size=batch, optimize=True)
    eager = embedder.embed(images)
    by_runtime = {}
    for runtime in runtimes:  # the same images, files, batch and threads through each runtime
        other = Embedder(embedder.model, hierarchy, "bench", batch_size=batch, runtime=runtime)
        with ImageIndex.open(other, str(folder / f"ingest-{size}-{runtime}.db"), "bench") as index:
            runtime_ingest = rate(lambda: index.ingest(items, batch_size=batch, skip_existing=False), n, repeats)
        by_runtime[runtime] = {"img_s": rate(lambda: other.embed(images), n, repeats),
                               "files_img_s": rate(lambda: other.embed(files), n, repeats),
                               "ingest_img_s": runtime_ingest,
                               "max_abs_diff": float(np.abs(other.embed(images).concat - eager.concat).max())}
    return {
        "runtimes": by_runtime,
        "size": size,
        "backbone_gflop": forward_flops(bare, size) / 1e9,
        "embedder_gflop": forward_flops(embedder.model, size) / 1e9,
        "backbone_img_s": rate(backbone_pass, n, repeats),
        "embed_tensors_img_s": rate(lambda: embedder.embed(images), n, repeats),
        "optimized_img_s": rate(lambda: fast.embed(images), n, repeats),
        "embed_files_img_s": rate(lambda: embedder.embed(files), n, repeats),
        "ingest_img_s": ingest_img_s,
    }


def forward_flops(model: torch.nn.Module, size: int) -> float:
    """FLOPs of one image's forward pass (a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.rand(1, 3, size, size))
    model.train(was_training)
    return float(counter.get_total_flops())


def gemm_peak(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 FLOP/s of an n x n matrix product on all threads."""
    a, b = torch.rand(n, n), torch.rand(n, n)
    return rate(lambda: a @ b, 2 * n**3, repeats)


def retrieval_effect(checkpoint: str | None, images: int, smoke: bool, runtimes: tuple[str, ...]) -> dict | None:
    """Exact leave-one-out leaf R@1 and consistency@10 per level: eager against optimized vectors and
    every runtime's."""
    from embedder import fashion_mnist

    if checkpoint:
        model = Embedder.from_checkpoint(checkpoint)
    elif smoke:  # no trained model in CI: ImageNet features still rank, enough to compare the two paths
        hierarchy = Hierarchy.from_paths(CLASS_PATHS, LEVEL_NAMES)
        config = EmbedderConfig.for_hierarchy(hierarchy, dim=8, image_size=32)
        model = Embedder(PyramidEmbedder(config, backbone_weights="imagenet"), hierarchy, "smoke")
    else:
        return None
    paths = {"eager": model, "optimized": Embedder(model.model, model.hierarchy, model.fingerprint, optimize=True)}
    paths |= {runtime: Embedder(model.model, model.hierarchy, model.fingerprint, runtime=runtime)
              for runtime in runtimes if runtime != "torch"}
    gray, classes = fashion_mnist.load("test")
    batch = torch.from_numpy(np.array(gray[:images]))[:, None].expand(-1, 3, -1, -1).contiguous()
    labels = model.hierarchy.encode_many([CLASS_PATHS[c] for c in classes[:images]])
    out = {"images": images, "checkpoint": checkpoint or "(untrained, ImageNet backbone)"}
    vectors = {}
    for name, embedder in paths.items():
        vectors[name] = embedder.embed(batch).concat
        same = agreement(labels, exact_neighbours(vectors[name], 10))
        out[name] = {"recall@1": recall_at_k(same, 1),
                     **{f"consistency@10/{lv}": consistency_at_k(same, 10, i) for i, lv in enumerate(LEVEL_NAMES)},
                     "max_abs_diff": float(np.abs(vectors[name] - vectors["eager"]).max())}
    out["paths"] = list(paths)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--sizes", default="64")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint", help="a trained model: measure the optimized path's effect on retrieval")
    parser.add_argument("--eval-images", type=int, default=5000)
    parser.add_argument("--smoke", action="store_true", help="one small batch at 64 px")
    parser.add_argument("--runtime", default="all",
                        help="comma-separated runtimes to measure beside eager torch, or all (those installed)")
    args = parser.parse_args(argv)
    from embedder.runtimes import installed

    wanted = RUNTIMES if args.runtime == "all" else tuple(args.runtime.split(","))
    runtimes = tuple(r for r in wanted if r == "torch" or installed(r))
    if args.smoke:
        args.sizes, args.batch, args.batches, args.repeats, args.eval_images = "64", 8, 1, 1, 200
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(args.backbone, int(s), args.batch, args.batches, args.repeats, Path(tmp), runtimes)
                for s in args.sizes.split(",")]
    peak = gemm_peak(512 if args.smoke else 2048)
    effect = retrieval_effect(args.checkpoint, args.eval_images, args.smoke, runtimes)
    command = "python bench/speed.py" + (" --smoke" if args.smoke else f" --sizes {args.sizes}") + (
        f" --checkpoint {args.checkpoint}" if args.checkpoint else "") + (
        f" --runtime {args.runtime}" if args.runtime != "all" else "")
    print(f"# embedding throughput, {args.backbone}, batch {args.batch}, {torch.get_num_threads()} threads\n\n"
          f"machine: {describe(('torch', 'torchvision', 'numpy'))}\ncommand: {command}\n")
    print("| input px | bare backbone img/s | Embedder (tensors) img/s | ratio | Embedder (PNG files) img/s "
          "| ingest to Milvus Lite img/s | ingest / embed files |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['backbone_img_s']:.0f} | {r['embed_tensors_img_s']:.0f} | "
              f"{r['embed_tensors_img_s'] / r['backbone_img_s']:.2f} | {r['embed_files_img_s']:.0f} | "
              f"{r['ingest_img_s']:.0f} | {r['ingest_img_s'] / r['embed_files_img_s']:.2f} |")
    print(f"\nagainst the CPU's peak: a float32 matrix product runs at {peak / 1e9:.1f} GFLOP/s\n")
    print("| input px | backbone GFLOP/img | Embedder GFLOP/img | backbone GFLOP/s | share of matmul peak "
          "| Embedder GFLOP/s | share of matmul peak | optimized Embedder img/s | optimized / eager |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        bb = r["backbone_gflop"] * r["backbone_img_s"]
        em = r["embedder_gflop"] * r["embed_tensors_img_s"]
        print(f"| {r['size']} | {r['backbone_gflop']:.3f} | {r['embedder_gflop']:.3f} | {bb:.1f} | {bb * 1e9 / peak:.2f} "
              f"| {em:.1f} | {em * 1e9 / peak:.2f} | {r['optimized_img_s']:.0f} | "
              f"{r['optimized_img_s'] / r['embed_tensors_img_s']:.2f} |")
    print(f"\nruntimes (the vector part through each; {torch.get_num_threads()} threads, batch {args.batch}, "
          f"the same images): img/s, against eager torch, and the largest difference of a vector component\n")
    print("| input px | runtime | img/s | / eager | Embedder GFLOP/s | share of matmul peak | max abs difference "
          "| PNG files img/s | ingest img/s | ingest / files |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for runtime, m in r["runtimes"].items():
            flops = r["embedder_gflop"] * m["img_s"]
            print(f"| {r['size']} | {runtime} | {m['img_s']:.0f} | {m['img_s'] / r['embed_tensors_img_s']:.2f} | "
                  f"{flops:.1f} | {flops * 1e9 / peak:.2f} | {m['max_abs_diff']:.1e} | {m['files_img_s']:.0f} | "
                  f"{m['ingest_img_s']:.0f} | {m['ingest_img_s'] / m['files_img_s']:.2f} |")
    if effect:
        print(f"\neach path on retrieval: {effect['images']} Fashion-MNIST test images, exact leave-one-out, "
              f"model {effect['checkpoint']}\n")
        keys = list(effect["eager"])
        print("| path | " + " | ".join(keys) + " |")
        print("|---|" + "---|" * len(keys))
        for name in effect["paths"]:
            print(f"| {name} | " + " | ".join(f"{effect[name][k]:.2e}" if k == "max_abs_diff" else
                                              f"{effect[name][k]:.4f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
