"""Training on 1 vs N processes (torchrun + DDP): images/s and time to a validation R@1.

    .venv/bin/python bench/train_scale.py                       # CPU: 1 and 2 processes, Fashion-MNIST
    .venv/bin/python bench/train_scale.py --device cuda --amp --processes 1,2,4,8
    .venv/bin/python bench/train_scale.py --smoke               # seconds: CI keeps it from rotting

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
    history = load_checkpoint(out).history
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
    args = parser.parse_args(argv)
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
            args.train_args += ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--dim", "8",
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
