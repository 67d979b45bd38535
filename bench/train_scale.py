"""Training on 1 vs N processes (torchrun + DDP): images/s and time to a validation R@1.

    .venv/bin/python bench/train_scale.py                       # CPU: 1 and 2 processes, Fashion-MNIST
    .venv/bin/python bench/train_scale.py --device cuda --amp --processes 1,2,4,8
    .venv/bin/python bench/train_scale.py --smoke               # seconds: CI keeps it from rotting
    .venv/bin/python bench/train_scale.py --stages [--device cuda]   # which of loader and model step bounds training
    .venv/bin/python bench/train_scale.py --memory 2000,20000,200000 # peak RSS against the listing's size

``--stages``: per input size (64, 224), on photo-sized files generated on disk (JPEG,
`--source-side` px): the loader alone (`--workers` processes decoding, resizing and
augmenting class-balanced batches, images/s), the model step alone (forward, backward
and AdamW on synthetic tensors already on the device) and training end to end
(`embedder.train` over the listing with the same loader). The slowest of the first two
bounds the third.

``--memory``: for each listing size, small image files are generated on disk and
``hiervec train`` runs a few steps over them in a process of its own; its peak RSS, and
that over the smallest listing per extra listed image, show what grows with the catalogue
(the listing: paths and labels) and what does not (decoded images).

Every run trains the same model on the same data with the same *global* batch
(`--classes` leaf classes x `--per-class` images per step, split evenly over the
processes), the same steps and seeds, through the CLI exactly as a user starts it: one
process with `hiervec train`, N with `torchrun --standalone --nproc-per-node N`. Batch norm
is the one a multi-process run uses on that device (`frozen` on CPUs, `sync` on CUDA) in
every row, so the rows compute the same updates up to the random augmentations (each
process draws its own) and differ in how the work is spread; with `--no-augment` they
compute the same updates and their validation R@1 agrees. The ratio of images/s is the
speed-up, or on a machine with fewer cores than processes, the overhead of DDP.

Columns: training images/s (global, from the checkpoint's history, validation excluded),
the ratio to one process, wall time of the whole command (start-up and decoding
included), leaf R@1 on the validation split after each epoch, and the time at which a run
first reached `--target` (default: one process's final R@1 minus 0.01).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._machine import describe  # noqa: E402
from embedder import load_checkpoint  # noqa: E402
from embedder.fashion_mnist import LEVEL_NAMES, export_folder_tree  # noqa: E402


def synthetic_tree(root: Path, per_leaf: int = 12, size: int = 32) -> Path:
    """Four colour classes in three levels: seconds to train, for --smoke."""
    rng = np.random.default_rng(0)
    leaves = {"clothing/tops/shirt": (220, 30, 30), "clothing/tops/coat": (200, 60, 40),
              "clothing/bottoms/trouser": (30, 30, 220), "footwear/boots/boot": (30, 200, 30)}
    for leaf, colour in leaves.items():
        (root / leaf).mkdir(parents=True, exist_ok=True)
        for i in range(per_leaf):
            pixels = np.clip(np.array(colour) + rng.integers(0, 60, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / leaf / f"{i}.png")
    return root


def command(processes: int, data: Path, out: Path, args: argparse.Namespace) -> list[str]:
    per_process = args.classes // processes
    train = ["-m", "cli.main", "train", str(data), "--out", str(out), "--levels", ",".join(LEVEL_NAMES),
             "--epochs", str(args.epochs), "--classes-per-batch", str(per_process), "--per-class", str(args.per_class),
             "--batch-norm", "sync" if args.device.startswith("cuda") else "frozen", "--device", args.device,
             "--seed", str(args.seed), "--json", *args.train_args]
    if args.amp:
        train.append("--amp")
    if processes == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), *train]


def run(processes: int, data: Path, folder: Path, args: argparse.Namespace) -> dict:
    out = folder / f"{processes}.pt"
    out.unlink(missing_ok=True)
    env = os.environ | {"GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    started = time.perf_counter()
    done = subprocess.run(command(processes, data, out, args), cwd=ROOT, env=env, text=True, capture_output=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{processes} process(es) failed:\n{done.stderr[-4000:]}")
    summary = json.loads(done.stdout)
    history = [h for h in load_checkpoint(out).history if "img_per_s" in h]  # trained epochs (epoch 0 trains nothing)
    return {"processes": processes, "wall_s": wall, "summary": summary,
            "img_per_s": float(np.mean([h["img_per_s"] for h in history])),
            "recall": [h.get("val/recall@1") for h in history], "elapsed": [h["elapsed_s"] for h in history]}


def table(rows: list[dict], target: float, args: argparse.Namespace) -> str:
    base = rows[0]["img_per_s"]
    lines = ["| processes | device | global batch | training img/s | ratio to 1 process | wall s | "
             "val R@1 per epoch | first reached R@1 >= %.3f |" % target, "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        reached = next((f"epoch {i + 1}, {t:.0f} s" for i, (r, t) in enumerate(zip(row["recall"], row["elapsed"]))
                        if r is not None and r >= target), "not reached")
        recall = ", ".join("-" if r is None else f"{r:.4f}" for r in row["recall"])
        lines.append(f"| {row['processes']} | {args.device}{' amp' if args.amp else ''} | "
                     f"{args.classes * args.per_class} | {row['img_per_s']:.0f} | {row['img_per_s'] / base:.2f} | "
                     f"{row['wall_s']:.0f} | {recall} | {reached} |")
    return "\n".join(lines)


def photo_tree(root: Path, count: int, side: int, leaves: int = 8, variants: int = 64) -> Path:
    """`count` noisy JPEG photos of `side` px in `leaves` 3-level categories (decoding costs what photos cost).
    `variants` distinct photos are encoded once and written as many times as needed: 200,000 files in seconds."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
    encoded = []
    for i in range(min(variants, count)):
        pixels = np.roll(base, i * 7, axis=1) // 2 + rng.integers(0, 128, (side, side, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    for leaf in range(leaves):
        (root / f"d{leaf % 2}" / f"c{leaf % 4}" / f"i{leaf}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        leaf = i % leaves
        (root / f"d{leaf % 2}" / f"c{leaf % 4}" / f"i{leaf}" / f"{i:07d}.jpg").write_bytes(encoded[i % len(encoded)])
    return root


def stage_rates(data: Path, size: int, args: argparse.Namespace) -> dict:
    """Images/s of the loader alone, the model step alone and training end to end, at `size` px."""
    import torch

    from embedder import EmbedderConfig, Hierarchy, TrainConfig, read_source, train
    from embedder.devices import resolve_device
    from embedder.model import PyramidEmbedder
    from embedder.streaming import BalancedBatchSampler, ImageFiles, training_loader
    from embedder.training import _augmenter

    items = read_source(data).items
    hierarchy = Hierarchy.from_paths([i.category for i in items], LEVEL_NAMES)
    labels = hierarchy.encode_many([i.category for i in items])
    files = ImageFiles([i.path for i in items], size)
    batch = args.classes * args.per_class
    sampler = BalancedBatchSampler(labels[:, -1], args.classes, args.per_class, args.steps, np.random.default_rng(0))
    started = time.perf_counter()
    loaded = sum(len(b.images) for _, b in training_loader(files, sampler, _augmenter(size), workers=args.workers))
    loader = loaded / (time.perf_counter() - started)

    device = resolve_device(args.device)
    config = EmbedderConfig.for_hierarchy(hierarchy, dim=64, image_size=size)
    model = PyramidEmbedder(config, backbone_weights="imagenet").to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, size, size, device=device)
    for step in range(args.steps + 2):  # two warm-up steps
        if step == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        out = model(x)
        loss = out.concat.square().sum() + sum(v.logsumexp(1).sum() for v in out.logits.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_rate = batch * args.steps / (time.perf_counter() - started)

    with tempfile.TemporaryDirectory() as tmp:
        tc = TrainConfig(epochs=1, steps_per_epoch=args.steps, classes_per_batch=args.classes,
                         per_class=args.per_class, val_fraction=0.0, patience=None)
        result = train(files, labels, hierarchy, config, tc, out=Path(tmp) / "m.pt", backbone_weights="imagenet",
                       device=args.device, workers=args.workers, log=lambda line: None)
    end_to_end = result.history[-1]["img_per_s"]
    return {"size": size, "loader": loader, "step": step_rate, "end_to_end": end_to_end}


def stages(args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory(prefix="hiervec-stages-") as tmp:
        data = photo_tree(Path(tmp) / "photos", args.photos, args.source_side)
        rows = [stage_rates(data, size, args) for size in args.sizes]
    lines = [f"| input px | loader alone, {args.workers} workers (img/s) | model step alone (img/s) | "
             f"end to end (img/s) | bound by |", "|---|---|---|---|---|"]
    for row in rows:
        bound = "loader" if row["loader"] < row["step"] else "model step"
        lines.append(f"| {row['size']} | {row['loader']:.1f} | {row['step']:.1f} | {row['end_to_end']:.1f} | {bound} |")
    return "\n".join(lines)


def peak_rss(data: Path, folder: Path, args: argparse.Namespace) -> float:
    """Peak RSS (MiB) of `hiervec train` over `data` for a few steps, in a process of its own."""
    code = ("import resource, sys; from cli.main import cli\n"
            "try:\n    cli(sys.argv[1:])\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code, "train", str(data), "--out", str(folder / "m.pt"),
                           "--levels", ",".join(LEVEL_NAMES), "--epochs", "1", "--steps-per-epoch", str(args.steps),
                           "--image-size", "64", "--val-max", "200", "--workers", str(args.workers), "--json"],
                          cwd=ROOT, text=True, capture_output=True)
    if done.returncode != 0:
        raise SystemExit(f"training over {data} failed:\n{done.stderr[-3000:]}")
    return float(done.stderr.strip().splitlines()[-1])


def memory(args: argparse.Namespace) -> str:
    rows = []
    with tempfile.TemporaryDirectory(prefix="hiervec-memory-") as tmp:
        for count in args.memory:
            data = photo_tree(Path(tmp) / f"files-{count}", count, 32)
            rows.append((count, peak_rss(data, Path(tmp), args)))
    base_count, base = rows[0]
    lines = ["| listed images | peak RSS (MiB) | extra RSS per extra listed image (KiB) | decoded size at 64 px (MiB) |",
             "|---|---|---|---|"]
    for count, rss in rows:
        per = "-" if count == base_count else f"{(rss - base) * 1024 / (count - base_count):.2f}"
        lines.append(f"| {count} | {rss:.0f} | {per} | {count * 3 * 64 * 64 / 2**20:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", default="1,2", help="Comma-separated process counts; the first is the base.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--images", type=int, default=5000, help="Fashion-MNIST training images.")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--classes", type=int, default=8, help="Leaf classes in the global batch.")
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-augment", action="store_true",
                        help="Train without augmentation: every row then computes the same updates, so R@1 agrees "
                             "across rows and the time to the target measures speed alone.")
    parser.add_argument("--target", type=float, default=None)
    parser.add_argument("--data", type=Path, default=None, help="A labelled folder tree instead of Fashion-MNIST.")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "train_scale")
    parser.add_argument("--smoke", action="store_true", help="A tiny synthetic run of every code path.")
    parser.add_argument("--stages", action="store_true", help="Loader alone, model step alone, end to end.")
    parser.add_argument("--sizes", default="64,224", help="--stages: input sizes")
    parser.add_argument("--photos", type=int, default=400, help="--stages: generated photos")
    parser.add_argument("--source-side", type=int, default=500, help="--stages: side of the generated photos (px)")
    parser.add_argument("--steps", type=int, default=20, help="--stages and --memory: steps measured")
    parser.add_argument("--workers", type=int, default=2, help="--stages and --memory: loader processes")
    parser.add_argument("--memory", default=None, help="Comma-separated listing sizes: peak RSS of training")
    args = parser.parse_args(argv)
    if args.stages or args.memory:
        args.sizes = [int(s) for s in args.sizes.split(",")]
        if args.smoke:
            args.sizes, args.photos, args.source_side, args.steps, args.classes, args.per_class = [32], 32, 48, 2, 4, 2
        print(f"machine: {describe(('torch', 'torchvision'))}")
        print(f"command: python bench/train_scale.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
        if args.stages:
            print("# the input pipeline against the model step\n")
            print(stages(args))
        if args.memory:
            args.memory = [int(c) for c in args.memory.split(",")]
            print("\n# peak memory of training against the listing's size\n")
            print(memory(args))
        return 0
    args.train_args = ["--no-augment"] if args.no_augment else []
    processes = [int(p) for p in args.processes.split(",")]
    if any(args.classes % p for p in processes):
        parser.error(f"--classes {args.classes} must split evenly over every process count in {processes}")
    with tempfile.TemporaryDirectory(prefix="hiervec-train-scale-") as tmp:
        folder = Path(tmp) if args.smoke else args.out
        folder.mkdir(parents=True, exist_ok=True)
        if args.smoke:
            data = synthetic_tree(folder / "images")
            args.epochs, args.classes, args.per_class = 2, 4, 2
            args.train_args += ["--backbone", "mobilenet_v2", "--weights", "none", "--image-size", "32", "--dim", "8",
                               "--steps-per-epoch", "3", "--val-fraction", "0.25"]
        elif args.data is not None:
            data = args.data
        else:
            data = folder / f"fashion-mnist-train-{args.images}"
            export_folder_tree(data, split="train", limit=args.images)
        rows = [run(p, data, folder, args) for p in processes]
    finals = [r["recall"][-1] for r in rows]
    target = args.target if args.target is not None else (finals[0] or 0.0) - 0.01
    print("# training on 1 vs N processes (torchrun + DDP), the same global batch and steps\n")
    print(f"machine: {describe(('torch', 'torchvision'))}")
    print(f"command: python bench/train_scale.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"data: {data.name}, {rows[0]['summary']['images']} images, {args.epochs} epoch(s); every row: "
          f"{' '.join(command(1, Path('DATA'), Path('OUT'), args)[2:])}\n")
    print(table(rows, target, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
