"""The training loop: class-balanced batches, contrastive + per-level softmax, AdamW, cosine schedule.

Every epoch is validated (leaf R@1, MAP@R, consistency@10 per level on a held-out split)
and checkpointed; `resume=True` continues from the checkpoint at `out`. It runs on any
torch device, with mixed precision on request, and across processes under `torchrun`
(DistributedDataParallel; see `embedder.distributed`): batch sizes are per process, the
contrastive loss sees every process's batch, and only rank 0 logs, validates and writes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms import v2

from hiervec_core.names import HEAD_INIT_SAMPLE

from . import distributed
from .checkpoint import Checkpoint, load_checkpoint, restore_weights, save_checkpoint
from .prediction import calibrate
from .config import EmbedderConfig
from .data import Failure
from .devices import Precision
from .errors import CheckpointError, ConfigError, DataError, DistributedError
from .hierarchy import Hierarchy
from .inference import forward_batches
from .losses import ContrastiveLoss, HierarchicalLoss
from .metrics import agreement, exact_neighbours, others_in_category, retrieval_report
from .baseline import pooled_features
from .model import PyramidEmbedder
from .streaming import Batch, BalancedBatchSampler, training_loader
from .train_config import (  # noqa: F401  (the training module's names before the config had a module of its own)
    BATCH_NORM_CHOICES, DEFAULT_EPOCHS, DEFAULT_SOFTMAX, LEAF_SOFTMAX, MIN_STEPS_PER_EPOCH, MIN_TOTAL_STEPS, TrainConfig,
    default_leaf_softmax,
)

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    checkpoint: Checkpoint | None  # None on the ranks other than 0 of a multi-process run
    history: list[dict] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)  # files that failed to decode (this process's)


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
    return _leave_one_out(forward_batches(model, images, batch_size).concat, labels, model.config.level_names)


def _leave_one_out(vectors: np.ndarray, labels: np.ndarray, level_names: Sequence[str]) -> dict[str, float]:
    r = others_in_category(labels)
    k = min(len(vectors) - 1, max(10, int(r.max())))
    same = agreement(labels, exact_neighbours(vectors, k))
    return retrieval_report(same, level_names, r=r)


def _augmenter(size: int) -> v2.Transform:
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.85, 1.15), antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    )


def describe_schedule(tc: TrainConfig, train_images: int, world_size: int = 1) -> str:
    """Why `TrainConfig.schedule` chose its numbers, for the first lines of a training log."""
    steps, epochs = tc.schedule(train_images, world_size)
    one_pass = max(1, train_images // (tc.batch_size * world_size))
    why_steps = ("as set" if tc.steps_per_epoch else
                 f"one pass over {train_images} images" if steps == one_pass else
                 f"a pass is {one_pass} steps; at least {MIN_STEPS_PER_EPOCH} between validations")
    why_epochs = "as set" if tc.epochs else f"at least {MIN_TOTAL_STEPS} steps in all, {DEFAULT_EPOCHS[0]} to {DEFAULT_EPOCHS[1]} epochs"
    return f"steps: {why_steps}; epochs: {why_epochs}"


def parameter_groups(model: PyramidEmbedder, lr: float, backbone_lr_scale: float) -> list[dict]:
    """The optimizer's two groups: the new layers at `lr`, the pretrained backbone at ``lr * backbone_lr_scale``."""
    backbone = {id(p) for p in model.body.parameters()}
    new = [p for p in model.parameters() if id(p) not in backbone]
    return [{"params": new, "lr": lr, "name": "new layers"},
            {"params": list(model.body.parameters()), "lr": lr * backbone_lr_scale, "name": "backbone"}]


def _schedule(total_steps: int, warmup_fraction: float, start: int = 0) -> Callable[[int], float]:
    """The learning-rate factor of each step: 0 before `start`, then a linear warm-up over
    `warmup_fraction` of the steps left and a cosine decay to 0 at `total_steps`."""
    span = max(1, total_steps - start)
    warmup = max(1, int(span * warmup_fraction))

    def factor(step: int) -> float:
        if step < start:
            return 0.0
        step -= start
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, span - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def backbone_score(model: PyramidEmbedder, images: torch.Tensor, labels: np.ndarray) -> float:
    """`selection_score` of the model's backbone alone (its deepest map, pooled): the untrained
    baseline, measured like every epoch. Call it before training changes the backbone."""
    vectors = pooled_features(model.body, model.stages[-1], images, model.mean, model.std)
    return selection_score(_leave_one_out(vectors, labels, model.config.level_names), model.config.level_names)


def start_from_backbone(model: PyramidEmbedder, images, labels: np.ndarray, seed: int) -> int:
    """`PyramidEmbedder.start_from_backbone` on a seeded sample of at most `HEAD_INIT_SAMPLE` of the
    training `images` (a tensor or an `ImageFiles` listing, decoded here): the model then starts
    as its backbone searches. Returns the number of images it read (files that fail to decode are
    left out here and reported by the training loop, which meets them too)."""
    chosen = np.arange(len(labels))
    if len(chosen) > HEAD_INIT_SAMPLE:
        chosen = np.sort(np.random.default_rng([seed, 1]).choice(chosen, HEAD_INIT_SAMPLE, replace=False))
    sample, sample_labels = images[chosen], labels[chosen]
    if not isinstance(sample, torch.Tensor):
        sample, kept, _ = sample.decode()
        sample_labels = sample_labels[kept]
    raw = pooled_features(model.body, model.stages[-1], sample, model.mean, model.std, normalize=False)
    model.start_from_backbone(torch.from_numpy(raw), torch.from_numpy(sample_labels))
    return len(sample_labels)


def _validation_sample(images, labels: np.ndarray, val_idx: np.ndarray, tc: TrainConfig,
                       failures: list[Failure]) -> tuple[torch.Tensor, np.ndarray]:
    """The held-out images to validate on, decoded: a seeded sample of at most `tc.val_max` of them."""
    if len(val_idx) > tc.val_max:
        val_idx = np.sort(np.random.default_rng(tc.seed).choice(val_idx, tc.val_max, replace=False))
    chosen = images[val_idx]
    if isinstance(chosen, torch.Tensor):
        return chosen, labels[val_idx]
    decoded, kept, failed = chosen.decode()
    failures.extend(failed)
    return decoded, labels[val_idx][kept]


def _whole_batch(loaded: Batch, batch_idx: np.ndarray, leaf_labels: np.ndarray,
                 distributed_run: bool) -> tuple[torch.Tensor, np.ndarray]:
    """The loaded images and their indices, each failed image's place taken by another image of its class
    in the batch: the batch keeps its size and its balance (every process of a run needs equal batches)."""
    if len(loaded.positions) == len(batch_idx):
        return loaded.images, batch_idx
    kept = loaded.positions.numpy()
    rows, indices = list(range(len(kept))), list(batch_idx[kept])
    for position in sorted(set(range(len(batch_idx))) - set(kept.tolist())):
        twin = next((row for row, p in enumerate(kept) if leaf_labels[batch_idx[p]] == leaf_labels[batch_idx[position]]),
                    None)
        if twin is None and distributed_run:
            raise DataError(f"every image of one class in a batch failed to decode "
                            f"({'; '.join(f'{f.source}: {f.reason}' for f in loaded.failures[:3])}); "
                            f"processes of a run need equal batches: remove the broken files and train again")
        if twin is not None:
            rows.append(twin)
            indices.append(batch_idx[kept[twin]])
    if not rows:
        raise DataError("every image of a batch failed to decode: "
                        + "; ".join(f"{f.source}: {f.reason}" for f in loaded.failures[:3]))
    return loaded.images[rows], np.asarray(indices)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


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
    validation: tuple[torch.Tensor, np.ndarray] | None = None,
    workers: int = 0,
) -> TrainResult:
    """Train on uint8 ``(n, 3, S, S)`` `images` (S = ``config.image_size``) with ``(n, depth)`` `labels`.

    `images` is a tensor, or an `embedder.streaming.ImageFiles` listing that is decoded batch
    by batch in `workers` loader processes (0: in this thread): memory then does not grow
    with the catalogue. A file that fails to decode is left out of its batch (its place
    taken by another image of its class) and reported in the result; training goes on.

    Validates before the first step (epoch 0: the pretrained start) and after every epoch,
    on `validation` (uint8 images, labels) when given, else on `val_fraction` of `images`;
    writes a checkpoint to `out` after every epoch holding the **best** epoch so far by
    `selection_score` (epoch 0 included: training never hands back weights that validate
    worse than its start), stops after `patience` epochs without a better one, and returns
    the final checkpoint. `device`: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; `amp`:
    mixed precision (see `embedder.devices.Precision`). In a process group of several
    processes (torchrun), every process passes the same data and trains with DDP; rank 0
    logs, validates and writes `out`, and the other ranks return ``checkpoint=None``.
    """
    context = distributed.current()
    device = distributed.process_device(context, device)
    log = (log or logger.info) if context.is_main else (lambda line: None)
    labels = np.asarray(labels, dtype=np.int64)
    _check_inputs(images, labels, hierarchy, config)
    if validation is not None:
        validation = (validation[0], np.asarray(validation[1], dtype=np.int64))
        _check_inputs(*validation, hierarchy, config)
    distributed.check_same_on_every_rank("the training data (images, CRC-32 of the labels)",
                                         [len(images), zlib.crc32(np.ascontiguousarray(labels).tobytes())], device)
    tc = train_config
    run_started = time.perf_counter()
    precision = Precision.for_device(device, amp)
    batch_norm = tc.resolved_batch_norm(context.world_size, device)
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)

    failures: list[Failure] = []
    if validation is None:
        train_idx, val_idx = split_validation(labels[:, -1], tc.val_fraction, tc.seed)
        if not context.is_main:  # rank 0 alone validates: the others decode nothing for it
            val_idx = val_idx[:0]
        val_images, val_labels = _validation_sample(images, labels, val_idx, tc, failures)
    else:
        train_idx, (val_images, val_labels) = np.arange(len(images)), validation
    steps, epochs = tc.schedule(len(train_idx), context.world_size)
    # The recipe that keeps what a pretrained backbone knows; a backbone from random weights
    # has nothing to keep and learns at the full rate from the first step.
    pretrained = backbone_weights is not None
    backbone_lr_scale = tc.backbone_lr_scale if pretrained else 1.0
    probe_epochs = min(tc.probe_epochs, epochs) if pretrained else 0
    restoring = resume and Path(out).is_file()  # else a fresh run: --resume before the first checkpoint
    model = PyramidEmbedder(config, backbone_weights=None if restoring else backbone_weights)
    if batch_norm == "sync":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    weights = tc.loss_weights(config, labels[train_idx, -1])
    pair_loss = distributed.GlobalBatchLoss(ContrastiveLoss(tc.margin)) if context.enabled else None
    criterion = HierarchicalLoss(config.level_names, weights, tc.margin, model.classify, pair_loss=pair_loss)
    optimizer = torch.optim.AdamW(parameter_groups(model, tc.lr, backbone_lr_scale), lr=tc.lr,
                                  weight_decay=tc.weight_decay)
    probe_steps = probe_epochs * steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [
        _schedule(epochs * steps, tc.warmup_fraction),  # the new layers
        _schedule(epochs * steps, tc.warmup_fraction, start=probe_steps),  # the backbone, after the linear probe
    ])
    scaler = precision.grad_scaler()
    start_epoch, history, resume_state, partial = 0, [], None, None
    if restoring:
        start_epoch, history, rng, saved = _restore(Path(out), model, optimizer, scheduler, scaler, config, hierarchy,
                                                    tc)
        resume_state = saved.get("resume_weights")
        if saved.get("step"):
            partial = {key: saved[key] for key in ("step", "seen", "sums")}
        log(f"resuming {out} after epoch {start_epoch}" + (f", step {partial['step']}" if partial else ""))
    distributed.check_same_on_every_rank(f"the epoch to resume {out} from (resume needs out on a filesystem "
                                         f"every process sees)", [start_epoch], device)
    if context.enabled:
        log(f"distributed: {context.world_size} processes on {device.type}, {tc.batch_size} images per process "
            f"and step ({tc.batch_size * context.world_size} in all), batch norm {batch_norm}")
    log(f"schedule: {epochs} epochs of {steps} steps ({describe_schedule(tc, len(train_idx), context.world_size)}); "
        f"lr {tc.lr:g} for the new layers, {tc.lr * backbone_lr_scale:g} for the backbone"
        + (f" after {probe_epochs} epoch(s) of linear probe (backbone frozen)" if probe_epochs else "")
        + ("" if pretrained else " (random initial weights: no linear probe, the backbone at the full rate)")
        + (f"; early stop after {tc.patience} epochs without a better validation score" if tc.patience else ""))
    log(f"loss weights: contrastive {weights.contrastive}, softmax per level "
        f"{weights.by_level('softmax', config.level_names) or 'none'}"
        + (f", contrastive per level {weights.by_level('level_contrastive', config.level_names)}"
           if weights.level_contrastive else ""))
    if device.type != "cpu" or precision.dtype is not None:
        log(f"device {device}, {precision}")

    augment = _augmenter(config.image_size) if tc.augment else None
    train_images, train_labels = images[train_idx], labels[train_idx]
    if pretrained and not restoring and tc.head_init == "backbone" and context.is_main:  # DDP hands rank 0's weights on
        if config.pooling != "avg":
            log(f"the new layers start random: the backbone start needs average pooling, not {config.pooling}")
        else:
            read = start_from_backbone(model, train_images, train_labels, tc.seed)
            log(f"the new layers start as the backbone: its principal components on {read} training images, "
                f"classifiers at their classes' mean vectors")
    if workers:
        log(f"loader: {workers} worker processes decode and augment the batches")
    validate = context.is_main and len(val_labels) > 1
    selection = BestEpoch.from_history(history, model, resume_state)
    if validate and start_epoch == 0:
        record = {"epoch": 0, **selection.validate(model, val_images, val_labels, 0, log)}
        if backbone_weights is not None:
            record["backbone/score"] = backbone_score(model, val_images, val_labels)
            log(f"the untrained backbone (its pooled features, no new layers) scores {record['backbone/score']:.4f} "
                f"on the same validation images: the baseline training must beat")
        history.append(record)
    def train_state(batch_rng: dict) -> dict:
        return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "rng": batch_rng, "torch_rng": torch.get_rng_state(), "train_config": tc.to_dict(),
                "loss_weights": weights.to_dict(), "world_size": context.world_size, "batch_norm": batch_norm,
                "schedule": {"epochs": epochs, "steps_per_epoch": steps}}

    def save(completed_epochs: int, state: dict, *, stopped_early: bool) -> Checkpoint:
        return save_checkpoint(out, model, hierarchy, epoch=completed_epochs, metrics=selection.metrics,
                               history=history, train_state=state, state_dict=selection.state,
                               selection=selection.summary(history, stopped_early=stopped_early))

    checkpoint = None
    net, probing = model, None
    for epoch in range(start_epoch, epochs):
        with _peer_failures(context, epoch):  # a collective anywhere in the epoch can find a peer gone
            if probing != (epoch < probe_epochs or backbone_lr_scale == 0):
                probing = epoch < probe_epochs or backbone_lr_scale == 0
                for parameter in model.body.parameters():
                    parameter.requires_grad_(not probing)
                if context.enabled:  # DDP reduces the parameters that need gradients when it is built
                    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
            model.train()
            if probing:
                model.body.eval()  # the frozen backbone keeps its running statistics
            elif batch_norm == "frozen":
                _freeze_batch_norm(model)
            started, seen, sums, skip = time.perf_counter(), 0, {}, 0
            if partial is not None:  # resumed in the middle of this epoch: its first steps are done
                skip, seen, sums, partial = partial["step"], partial["seen"], dict(partial["sums"]), None
                log(f"resuming epoch {epoch + 1} at step {skip + 1}/{steps}")
            epoch_rng = rng.bit_generator.state  # a checkpoint inside this epoch draws its batches again from here
            # each rank its own augmentations, the same whatever worker draws a sample or where a run resumes
            sampler = BalancedBatchSampler(train_labels[:, -1], tc.classes_per_batch, tc.per_class, steps, rng,
                                           rank=context.rank, world_size=context.world_size, skip=skip,
                                           seed=tc.seed * 1_000_003 + epoch * context.world_size + context.rank)
            batches = training_loader(train_images, sampler, augment, workers=workers, pin_memory=device.type == "cuda")
            for step, (batch_idx, loaded) in enumerate(batches, start=skip + 1):
                failures.extend(loaded.failures)
                batch, batch_idx = _whole_batch(loaded, np.asarray(batch_idx), train_labels[:, -1], context.enabled)
                batch = batch.to(device, non_blocking=True)
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
                    log(f"epoch {epoch + 1}/{epochs} step {step}/{steps} {shown} {rate:.0f} img/s"
                        + (" (linear probe)" if probing else ""))
                if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < steps:
                    if context.is_main:  # the best validated weights, and what resume needs to go on from this step
                        save(epoch, {**train_state(epoch_rng), "step": step, "seen": seen, "sums": sums,
                                     "resume_weights": None if selection.state is None else _cpu_state(model)},
                             stopped_early=False)
                    distributed.barrier()
            sums = distributed.mean_across_ranks(sums, device)
            record = {"epoch": epoch + 1, **{k: v / steps for k, v in sums.items()}}
            record["img_per_s"] = seen / (time.perf_counter() - started)
            if validate:
                record.update(selection.validate(model, val_images, val_labels, epoch + 1, log))
            record["elapsed_s"] = time.perf_counter() - run_started  # since this run (or resume) started
            history.append(record)
            stop = validate and tc.patience is not None and epoch + 1 - selection.epoch >= tc.patience
            if context.is_main:
                # the last epoch's weights, where the file's own are an earlier, better epoch's: what resume continues
                checkpoint = save(epoch + 1, {**train_state(rng.bit_generator.state), "step": 0,
                                              "resume_weights": None if selection.is_current else _cpu_state(model)},
                                  stopped_early=bool(stop))
            distributed.barrier()  # no rank runs ahead of the checkpoint it could be resumed from
            if distributed.broadcast_from_main(float(stop), device):
                log(f"stopping early after epoch {epoch + 1}: no better validation score since epoch {selection.epoch} "
                    f"(patience {tc.patience})")
                break
    if not context.is_main:
        return TrainResult(None, history, failures)
    if checkpoint is None:  # resumed a run that had already finished
        return TrainResult(load_checkpoint(out), history, failures)
    if selection.state is not None:
        model.load_state_dict(selection.state)  # hand back (and calibrate) the best epoch
    if validate:
        log(selection.verdict(history))
        calibration = calibrate(validation_logits(model, val_images), val_labels, config.level_names)
        log("calibration (temperature per level, ECE before -> after): " + ", ".join(
            f"{name} T={t:.2f} {calibration['ece_before'][name]:.3f} -> {calibration['ece_after'][name]:.3f}"
            for name, t in calibration["temperatures"].items() if name in calibration["ece_before"]))
        checkpoint = save_checkpoint(out, model, hierarchy, epoch=checkpoint.epoch, metrics=checkpoint.metrics,
                                     history=history, train_state=checkpoint.train_state, calibration=calibration,
                                     selection=checkpoint.selection)
    return TrainResult(checkpoint, history, failures)


def selection_score(metrics: dict[str, float], level_names: Sequence[str]) -> float:
    """The one validation number that picks the best epoch: the mean of leaf R@1 and consistency@10 at
    every level. It covers every level, so an epoch that trades the categories for the leaf (or
    the leaf for the categories) does not win."""
    parts = [metrics["recall@1"], *(metrics[f"consistency@10/{name}"] for name in level_names)]
    return float(np.mean(parts))


SELECTION_CRITERION = "mean of leaf recall@1 and consistency@10 at every level (validation split)"


class BestEpoch:
    """The best epoch so far by `selection_score`, and its weights (None while the model itself is the best)."""

    def __init__(self, level_names: Sequence[str], epoch: int = -1, score: float = -math.inf,
                 metrics: dict | None = None, state: dict | None = None):
        self.level_names = tuple(level_names)
        self.epoch, self.score, self.metrics, self.state = epoch, score, metrics or {}, state
        self.is_current = True

    @classmethod
    def from_history(cls, history: list[dict], model: PyramidEmbedder, resumed: dict | None) -> BestEpoch:
        """After a resume: the best validated epoch of `history`, whose weights are in `model` unless
        `resumed` (the checkpoint's `resume_weights`) says the model has moved on since."""
        best = cls(model.config.level_names)
        scored = [r for r in history if "val/score" in r]
        if scored:
            top = max(scored, key=lambda r: r["val/score"])  # the first of equal scores, as in training
            best.epoch, best.score = top["epoch"], top["val/score"]
            best.metrics = {k: v for k, v in top.items() if k.startswith("val/")}
            best.state = _cpu_state(model)  # the file's weights are the best epoch's
        if resumed is not None:  # training had moved on from the best epoch: continue from where it was
            best.is_current = False
            model.load_state_dict(resumed)
        return best

    def validate(self, model: PyramidEmbedder, images: torch.Tensor, labels: np.ndarray, epoch: int,
                 log: Callable[[str], None]) -> dict[str, float]:
        """Validate `model` after `epoch` (0: before training), keep it if it is the best: its ``val/`` record."""
        metrics = evaluate(model, images, labels)
        score = selection_score(metrics, self.level_names)
        record = {f"val/{k}": v for k, v in metrics.items()} | {"val/score": score}
        self.is_current = score > self.score
        if self.is_current:  # a copy: the model trains on from here
            self.epoch, self.score, self.metrics, self.state = epoch, score, record, _cpu_state(model)
        log(f"epoch {epoch}{' (the pretrained start)' if epoch == 0 else ''} validation "
            + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f" score {score:.4f}"
            + (" (best)" if self.is_current else f" (best: epoch {self.epoch}, {self.score:.4f})"))
        return record

    def summary(self, history: list[dict], *, stopped_early: bool) -> dict | None:
        """What the checkpoint records of the choice."""
        if self.epoch < 0:
            return None
        start = next((r for r in history if r["epoch"] == 0), {})
        return {"criterion": SELECTION_CRITERION, "best_epoch": self.epoch, "best_score": self.score,
                "start_score": start.get("val/score"), "backbone_score": start.get("backbone/score"),
                "beats_start": self.epoch > 0, "stopped_early": stopped_early}

    def verdict(self, history: list[dict]) -> str:
        """One plain line: which epoch the checkpoint holds, and whether training beat its start."""
        start = next((r for r in history if r["epoch"] == 0), None)
        if self.epoch == 0:
            line = (f"no epoch beat the pretrained start (validation score {self.score:.4f} at epoch 0): "
                    f"the checkpoint holds the start's weights")
        else:
            line = f"the checkpoint holds epoch {self.epoch} (validation score {self.score:.4f}"
            line += f"; the pretrained start scored {start['val/score']:.4f})" if start else ")"
        backbone = (start or {}).get("backbone/score")
        if backbone is not None and backbone >= self.score:
            line += (f"; the untrained backbone scores {backbone:.4f} here, as well or better: check your catalogue "
                     f"with `hiervec eval DATA --baseline imagenet` before you ingest")
        return line


# How gloo and NCCL word a collective that failed because a peer is gone or silent (torch
# raises these as plain RuntimeErrors, not always as torch.distributed.DistError).
_PEER_LOST = ("timeout", "timed out", "closed", "reset by peer", "broken pipe", "connection refused", "nccl error")


def _lost_a_peer(exc: RuntimeError) -> bool:
    return isinstance(exc, torch.distributed.DistError) or any(w in str(exc).lower() for w in _PEER_LOST)


@contextlib.contextmanager
def _peer_failures(context: distributed.DistributedContext, epoch: int) -> Iterator[None]:
    """A collective that failed because another rank is gone or silent, as the DistributedError that says so.

    Anywhere in the epoch: the steps' gradients and loss gathers, but also the epoch's end (its mean, the barrier
    after the checkpoint, the early-stop broadcast), where a rank that stopped answering late in the epoch is seen.
    """
    try:
        yield
    except RuntimeError as exc:
        if not (context.enabled and _lost_a_peer(exc)):
            raise
        raise DistributedError(f"rank {context.rank}: another of the {context.world_size} processes died or "
                               f"stopped answering in epoch {epoch + 1} ({' '.join(str(exc).split())[:300]}); "
                               f"train again with resume=True to continue from the last checkpoint") from exc


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


# What a resumed run may set anew: when to stop and how often to save, not what is learnt.
RESUME_MAY_CHANGE = ("epochs", "patience", "checkpoint_every", "log_every", "val_max")


def _restore(path, model, optimizer, scheduler, scaler, config, hierarchy,
             tc) -> tuple[int, list, np.random.Generator, dict]:
    """Load a checkpoint to resume from: (completed epochs, history, batch RNG, its train state: the
    weights to go on from where the file's own are an earlier, better epoch's, and the step reached
    in the epoch after those completed)."""
    checkpoint = load_checkpoint(path)
    if checkpoint.config != config or checkpoint.hierarchy != hierarchy:
        raise CheckpointError(f"cannot resume {path}: it was trained with another model config or hierarchy")
    if checkpoint.train_state is None:
        raise CheckpointError(f"cannot resume {path}: it holds no optimizer state")
    # fields added since the checkpoint was written count at their defaults
    saved_tc = TrainConfig().to_dict() | checkpoint.train_state["train_config"]
    free = {key: saved_tc[key] for key in RESUME_MAY_CHANGE}
    if saved_tc != tc.to_dict() | free:
        raise CheckpointError(f"cannot resume {path}: it was trained with another TrainConfig ({saved_tc})")
    restore_weights(model, checkpoint, path)
    try:
        optimizer.load_state_dict(checkpoint.train_state["optimizer"])
    except ValueError as exc:  # e.g. one parameter group: written before the backbone had its own rate
        raise CheckpointError(f"cannot resume {path}: its optimizer state does not fit this version's "
                              f"({exc}); train it again with resume=False") from exc
    scheduler.load_state_dict(checkpoint.train_state["scheduler"])
    if checkpoint.train_state.get("scaler"):
        scaler.load_state_dict(checkpoint.train_state["scaler"])
    torch.set_rng_state(checkpoint.train_state["torch_rng"])
    rng = np.random.default_rng()
    rng.bit_generator.state = checkpoint.train_state["rng"]
    return checkpoint.epoch, list(checkpoint.history), rng, checkpoint.train_state

