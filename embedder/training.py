"""The training loop: class-balanced batches, contrastive + per-level softmax, AdamW, cosine schedule.

Every epoch is validated (leaf R@1, MAP@R, consistency@10 per level on a held-out split)
and checkpointed; `resume=True` continues from the checkpoint at `out`. It runs on any
torch device, with mixed precision on request, and across processes under `torchrun`
(DistributedDataParallel; see `embedder.distributed`): batch sizes are per process, the
contrastive loss sees every process's batch, and only rank 0 logs, validates and writes.
"""

from __future__ import annotations

import logging
import math
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms import v2

from hiervec_core.names import LEAF_SOFTMAX_MIN_IMAGES

from . import distributed
from .checkpoint import Checkpoint, load_checkpoint, restore_weights, save_checkpoint
from .prediction import calibrate
from .config import EmbedderConfig
from .data import balanced_batches
from .devices import Precision
from .errors import CheckpointError, ConfigError, DistributedError
from .hierarchy import Hierarchy
from .inference import forward_batches
from .losses import ContrastiveLoss, HierarchicalLoss, LossWeights
from .metrics import agreement, exact_neighbours, others_in_category, retrieval_report
from .model import PyramidEmbedder

logger = logging.getLogger(__name__)


# Weight of each coarser level's softmax against the contrastive term. Weight 1 (the
# first default) let the classifiers swamp the leaf: on product-level data, unseen
# products' R@1 fell from 0.54 (no softmax) to 0.37; 0.25 gave 0.47, 0.1 gave 0.64 and
# 0.05 gave 0.69 while keeping the categories (bench/quality.py, validation split; the
# search is in BENCHMARKS.md).
DEFAULT_SOFTMAX = 0.05

# The leaf's softmax weight where the leaves are well-populated classes (the median leaf
# label has at least `LEAF_SOFTMAX_MIN_IMAGES` training images). On class-level
# Fashion-MNIST (about 1,000 images per leaf) weight 1 lifted leaf R@1 from 0.846 to 0.864
# on the validation split (two seeds); where the leaves are products with a few photos each, a softmax
# over them barely learns and cost unseen products' R@1 (0.07 for flat + softmax with
# weight 1, against 0.53 without), so there the leaf gets none (BENCHMARKS.md).
LEAF_SOFTMAX = 1.0

# How batch norm trains: `batch` (each process's own batch statistics, as one process
# always did), `sync` (SyncBatchNorm: statistics of the global batch; CUDA only in torch),
# `frozen` (the layers in eval mode: the backbone's running statistics). `auto` keeps
# `batch` for one process and makes several processes train as one process on the
# global batch would: `sync` on CUDA, `frozen` on CPUs, where SyncBatchNorm does not run.
BATCH_NORM_CHOICES = ("auto", "batch", "sync", "frozen")


def default_leaf_softmax(leaf_labels: np.ndarray) -> float:
    """`LEAF_SOFTMAX` when the median leaf label has `LEAF_SOFTMAX_MIN_IMAGES` images or more, else 0."""
    counts = np.bincount(np.asarray(leaf_labels, dtype=np.int64))
    counts = counts[counts > 0]
    if len(counts) == 0:
        raise ConfigError("no leaf labels to choose the leaf softmax weight from")
    return LEAF_SOFTMAX if float(np.median(counts)) >= LEAF_SOFTMAX_MIN_IMAGES else 0.0


@dataclass(frozen=True)
class TrainConfig:
    """How to train. `loss` defaults by mode: pyramid = contrastive on the image vector with
    leaf labels + softmax at every coarser level with weight `DEFAULT_SOFTMAX`, and at the
    leaf with weight `leaf_softmax` (None: `default_leaf_softmax` of the training labels,
    on for well-populated leaf classes, off for product-like leaves); flat = contrastive on
    leaf labels only. Classifiers without a softmax weight still learn, on detached
    vectors, for prediction. BENCHMARKS.md has the search that chose these defaults."""

    epochs: int = 3
    steps_per_epoch: int | None = None  # default: one pass over the training split
    classes_per_batch: int = 8
    per_class: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    margin: float = 1.0
    loss: LossWeights | None = None
    leaf_softmax: float | None = None
    seed: int = 0
    val_fraction: float = 0.1
    augment: bool = True
    log_every: int = 25
    batch_norm: str = "auto"

    def __post_init__(self) -> None:
        positive = ("epochs", "classes_per_batch", "per_class", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.per_class < 2:
            raise ConfigError(f"per_class must be at least 2 so batches hold positive pairs, got {self.per_class}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ConfigError(f"steps_per_epoch must be positive, got {self.steps_per_epoch}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.lr <= 0 or self.margin <= 0:
            raise ConfigError(f"lr and margin must be positive, got {self.lr} and {self.margin}")
        if self.leaf_softmax is not None and not (math.isfinite(self.leaf_softmax) and self.leaf_softmax >= 0):
            raise ConfigError(f"leaf_softmax must be a finite weight >= 0, got {self.leaf_softmax}")
        if self.batch_norm not in BATCH_NORM_CHOICES:
            raise ConfigError(f"batch_norm must be one of {', '.join(BATCH_NORM_CHOICES)}, got {self.batch_norm!r}")

    @property
    def batch_size(self) -> int:
        """Images per step in one process (the global batch is this times the number of processes)."""
        return self.classes_per_batch * self.per_class

    def resolved_batch_norm(self, world_size: int, device: torch.device) -> str:
        """`batch_norm` with `auto` decided for this world size and device."""
        if self.batch_norm == "auto":
            if world_size == 1:
                return "batch"
            return "sync" if device.type == "cuda" else "frozen"
        if self.batch_norm == "sync" and world_size > 1 and device.type != "cuda":
            raise ConfigError(f"batch_norm 'sync' needs CUDA: torch's SyncBatchNorm does not run on {device.type}; "
                              f"use 'frozen' (or 'batch' for per-process statistics)")
        return self.batch_norm

    def loss_weights(self, config: EmbedderConfig, leaf_labels: np.ndarray) -> LossWeights:
        """The loss weights to train `config` on training images with these leaf labels."""
        if self.loss is not None:
            return self.loss
        if config.mode == "flat":
            return LossWeights(contrastive=1.0)
        leaf = self.leaf_softmax if self.leaf_softmax is not None else default_leaf_softmax(leaf_labels)
        return LossWeights(contrastive=1.0, softmax=(DEFAULT_SOFTMAX,) * (config.depth - 1) + (leaf,))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["loss"] = self.loss.to_dict() if self.loss else None
        return data


@dataclass
class TrainResult:
    checkpoint: Checkpoint | None  # None on the ranks other than 0 of a multi-process run
    history: list[dict] = field(default_factory=list)


def split_validation(leaf_labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, val) index arrays: `fraction` of each leaf class, at least 2 per class."""
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for label in np.unique(leaf_labels):
        members = rng.permutation(np.flatnonzero(leaf_labels == label))
        take = 0 if fraction == 0 else max(2, round(fraction * len(members)))
        take = min(take, len(members) - 2)  # keep training pairs too
        val_idx.append(members[: max(take, 0)])
        train_idx.append(members[max(take, 0) :])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def evaluate(model: PyramidEmbedder, images: torch.Tensor, labels: np.ndarray, batch_size: int = 128) -> dict[str, float]:
    """Exact leave-one-out retrieval metrics of `model` on uint8 `images` with `labels`."""
    concat = forward_batches(model, images, batch_size).concat
    r = others_in_category(labels)
    k = min(len(images) - 1, max(10, int(r.max())))
    same = agreement(labels, exact_neighbours(concat, k))
    return retrieval_report(same, model.config.level_names, r=r)


def _augmenter(size: int) -> v2.Transform:
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.85, 1.15), antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    )


def _schedule(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train(
    images: torch.Tensor,
    labels: np.ndarray,
    hierarchy: Hierarchy,
    config: EmbedderConfig,
    train_config: TrainConfig = TrainConfig(),
    *,
    out: str | os.PathLike,
    backbone_weights: str | os.PathLike | None = None,
    resume: bool = False,
    log: Callable[[str], None] | None = None,
    device: str | torch.device | None = "auto",
    amp: bool = False,
) -> TrainResult:
    """Train on uint8 ``(n, 3, S, S)`` `images` (S = ``config.image_size``) with ``(n, depth)`` `labels`.

    Writes a checkpoint to `out` after every epoch and returns the last one. `device`:
    ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; `amp`: mixed precision (see
    `embedder.devices.Precision`). In a process group of several processes (torchrun),
    every process passes the same data and trains with DDP; rank 0 logs, validates and
    writes `out`, and the other ranks return ``checkpoint=None``.
    """
    context = distributed.current()
    device = distributed.process_device(context, device)
    log = (log or logger.info) if context.is_main else (lambda line: None)
    labels = np.asarray(labels, dtype=np.int64)
    _check_inputs(images, labels, hierarchy, config)
    distributed.check_same_on_every_rank("the training data (images, CRC-32 of the labels)",
                                         [len(images), zlib.crc32(np.ascontiguousarray(labels).tobytes())], device)
    tc = train_config
    run_started = time.perf_counter()
    precision = Precision.for_device(device, amp)
    batch_norm = tc.resolved_batch_norm(context.world_size, device)
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)

    train_idx, val_idx = split_validation(labels[:, -1], tc.val_fraction, tc.seed)
    steps = tc.steps_per_epoch or max(1, len(train_idx) // (tc.batch_size * context.world_size))
    model = PyramidEmbedder(config, backbone_weights=None if resume else backbone_weights)
    if batch_norm == "sync":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    weights = tc.loss_weights(config, labels[train_idx, -1])
    pair_loss = distributed.GlobalBatchLoss(ContrastiveLoss(tc.margin)) if context.enabled else None
    criterion = HierarchicalLoss(config.level_names, weights, tc.margin, model.classify, pair_loss=pair_loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(tc.epochs * steps, tc.warmup_fraction))
    scaler = precision.grad_scaler()
    start_epoch, history = 0, []
    if resume and Path(out).is_file():
        start_epoch, history, rng = _restore(Path(out), model, optimizer, scheduler, config, hierarchy, tc)
        log(f"resuming {out} after epoch {start_epoch}")
    distributed.check_same_on_every_rank(f"the epoch to resume {out} from (resume needs --out on a filesystem "
                                         f"every process sees)", [start_epoch], device)
    net = model
    if context.enabled:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        log(f"distributed: {context.world_size} processes on {device.type}, {tc.batch_size} images per process "
            f"and step ({tc.batch_size * context.world_size} in all), batch norm {batch_norm}")
    log(f"loss weights: contrastive {weights.contrastive}, softmax per level {list(weights.softmax)}"
        + (f", contrastive per level {list(weights.level_contrastive)}" if weights.level_contrastive else ""))
    if device.type != "cpu" or precision.dtype is not None:
        log(f"device {device}, {precision}")

    augment = _augmenter(config.image_size) if tc.augment else None
    train_images, train_labels = images[train_idx], labels[train_idx]
    val_images, val_labels = images[val_idx], labels[val_idx]
    validate = context.is_main and len(val_idx) > 1
    checkpoint = None
    for epoch in range(start_epoch, tc.epochs):
        model.train()
        if batch_norm == "frozen":
            _freeze_batch_norm(model)
        if context.enabled:  # each rank its own augmentations, reproducibly, whatever epoch a run resumes at
            torch.manual_seed(tc.seed * 1_000_003 + epoch * context.world_size + context.rank)
        started, seen, sums = time.perf_counter(), 0, {}
        batches = balanced_batches(train_labels[:, -1], tc.classes_per_batch, tc.per_class, steps, rng,
                                   rank=context.rank, world_size=context.world_size)
        try:
            for step, batch_idx in enumerate(batches, start=1):
                batch = train_images[batch_idx].to(device).float().div_(255)
                if augment is not None:
                    batch = torch.stack([augment(img) for img in batch])
                with precision.autocast():
                    loss, parts = criterion(net(batch), torch.from_numpy(train_labels[batch_idx]).to(device))
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                seen += len(batch_idx) * context.world_size
                for key, value in {"loss": float(loss.detach()), **parts}.items():
                    sums[key] = sums.get(key, 0.0) + value
                if step % tc.log_every == 0 or step == steps:
                    rate = seen / (time.perf_counter() - started)
                    shown = " ".join(f"{k} {v / step:.4f}"
                                     for k, v in distributed.mean_across_ranks(sums, device).items())
                    log(f"epoch {epoch + 1}/{tc.epochs} step {step}/{steps} {shown} {rate:.0f} img/s")
        except RuntimeError as exc:
            if not (context.enabled and _lost_a_peer(exc)):
                raise
            raise DistributedError(f"rank {context.rank}: another of the {context.world_size} processes died or "
                                   f"stopped answering in epoch {epoch + 1} ({' '.join(str(exc).split())[:300]}); "
                                   f"train again with --resume to continue from the last checkpoint") from exc
        sums = distributed.mean_across_ranks(sums, device)
        record = {"epoch": epoch + 1, **{k: v / steps for k, v in sums.items()}}
        record["img_per_s"] = seen / (time.perf_counter() - started)
        if validate:
            metrics = evaluate(model, val_images, val_labels)
            record.update({f"val/{k}": v for k, v in metrics.items()})
            log(f"epoch {epoch + 1} validation " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        record["elapsed_s"] = time.perf_counter() - run_started  # since this run (or resume) started
        history.append(record)
        if context.is_main:
            state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "train_config": tc.to_dict(),
                "loss_weights": weights.to_dict(),
                "world_size": context.world_size,
                "batch_norm": batch_norm,
            }
            metrics_only = {k: v for k, v in record.items() if k.startswith("val/")}
            checkpoint = save_checkpoint(
                out, model, hierarchy, epoch=epoch + 1, metrics=metrics_only, history=history, train_state=state
            )
        distributed.barrier()  # no rank runs ahead of the checkpoint it could be resumed from
    if not context.is_main:
        return TrainResult(None, history)
    if checkpoint is None:  # resumed a run that had already finished
        checkpoint = load_checkpoint(out)
    elif len(val_idx) > 1:
        calibration = calibrate(validation_logits(model, val_images), val_labels, config.level_names)
        log("calibration (temperature per level, ECE before -> after): " + ", ".join(
            f"{name} T={t:.2f} {calibration['ece_before'][name]:.3f} -> {calibration['ece_after'][name]:.3f}"
            for name, t in zip(config.level_names, calibration["temperatures"]) if name in calibration["ece_before"]))
        checkpoint = save_checkpoint(out, model, hierarchy, epoch=checkpoint.epoch, metrics=checkpoint.metrics,
                                     history=history, train_state=checkpoint.train_state, calibration=calibration)
    return TrainResult(checkpoint, history)


# How gloo and NCCL word a collective that failed because a peer is gone or silent (torch
# raises these as plain RuntimeErrors, not always as torch.distributed.DistError).
_PEER_LOST = ("timeout", "timed out", "closed", "reset by peer", "broken pipe", "connection refused", "nccl error")


def _lost_a_peer(exc: RuntimeError) -> bool:
    return isinstance(exc, torch.distributed.DistError) or any(w in str(exc).lower() for w in _PEER_LOST)


def _freeze_batch_norm(model: nn.Module) -> None:
    """Batch-norm layers in eval mode: they normalise with their running statistics and keep them."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def validation_logits(model: PyramidEmbedder, images: torch.Tensor, batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Classifier logits of uint8 `images` in eval mode, on the CPU: ``{level: (n, C)}`` for the levels with one."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in model.classifiers}
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            out = model(images[start : start + batch_size].to(device).float().div_(255))
            for level, logits in out.logits.items():
                parts[level].append(logits.float().cpu())
    model.train(was_training)
    return {level: torch.cat(p) for level, p in parts.items() if p}


def _check_inputs(images: torch.Tensor, labels: np.ndarray, hierarchy: Hierarchy, config: EmbedderConfig) -> None:
    size = config.image_size
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
        raise ConfigError(f"images must be uint8 (n, 3, {size}, {size}), got {images.dtype} {tuple(images.shape)}")
    if labels.shape != (len(images), hierarchy.depth):
        raise ConfigError(f"labels must have shape ({len(images)}, {hierarchy.depth}), got {labels.shape}")
    if config.level_names != hierarchy.level_names or config.num_classes != hierarchy.num_classes:
        raise ConfigError(
            f"config levels {config.level_names} with classes {config.num_classes} do not match the "
            f"hierarchy's {hierarchy.level_names} with {hierarchy.num_classes}"
        )


def _restore(path, model, optimizer, scheduler, config, hierarchy, tc) -> tuple[int, list, np.random.Generator]:
    checkpoint = load_checkpoint(path)
    if checkpoint.config != config or checkpoint.hierarchy != hierarchy:
        raise CheckpointError(f"cannot resume {path}: it was trained with another model config or hierarchy")
    if checkpoint.train_state is None:
        raise CheckpointError(f"cannot resume {path}: it holds no optimizer state")
    # fields added since the checkpoint was written count at their defaults
    saved_tc = TrainConfig().to_dict() | checkpoint.train_state["train_config"]
    if saved_tc != tc.to_dict() | {"epochs": saved_tc["epochs"]}:
        raise CheckpointError(f"cannot resume {path}: it was trained with another TrainConfig ({saved_tc})")
    restore_weights(model, checkpoint, path)
    optimizer.load_state_dict(checkpoint.train_state["optimizer"])
    scheduler.load_state_dict(checkpoint.train_state["scheduler"])
    torch.set_rng_state(checkpoint.train_state["torch_rng"])
    rng = np.random.default_rng()
    rng.bit_generator.state = checkpoint.train_state["rng"]
    return checkpoint.epoch, list(checkpoint.history), rng

