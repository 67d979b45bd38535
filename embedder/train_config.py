"""`TrainConfig`: how to train, and the defaults `hiervec train` shows.

Imports neither torch nor torchvision (only numpy), so the CLI reads its options' defaults
and choices from here without loading torch; `embedder.training` runs it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from hiervec_core.names import (
    BACKBONE_LR_SCALE, HEAD_INIT, HEAD_INITS, LEAF_SOFTMAX_MIN_IMAGES, PATIENCE, PROBE_EPOCHS, VAL_MAX,
)

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

    from .config import EmbedderConfig
    from .losses import LossWeights

# `hiervec train`'s model options (EmbedderConfig.for_hierarchy's defaults) and how long a
# torchrun process waits for the others (embedder.distributed.process_group).
DEFAULT_DIM = 64
DEFAULT_MODE = "pyramid"
MODES = ("pyramid", "flat")
DIST_TIMEOUT_S = 1800.0
DEFAULT_WEIGHTS = "imagenet"

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


# How the pretrained backbone is fine-tuned: at `BACKBONE_LR_SCALE` times the new layers'
# rate, after `PROBE_EPOCHS` epochs in which it is frozen and only the new layers (FPN,
# heads, classifiers) learn on its features (linear probe, then fine-tune: Kumar et al.,
# ICLR 2022). On openclipart's validation split (1,648 training images, 49 categories,
# 128 px) the full rate without a probe validated better (score 0.637 against 0.603 with a
# tenth of the rate after one probe epoch): what had made training worse than the untrained
# backbone there was too few steps (24 in all), not the rate. So both stay options, off by
# default; BENCHMARKS.md ("Learning from real catalogues") has the runs. Early stopping:
# `PATIENCE` epochs without a better validation score. The three values live in
# hiervec_core.names, where the CLI reads them without importing torch.

# An epoch is one pass over the training images, but at least this many steps: a small
# catalogue (a few hundred images: ten steps a pass) gets enough updates between two validations.
MIN_STEPS_PER_EPOCH = 50
# The default number of epochs gives at least this many steps in all (3 to 20 epochs).
MIN_TOTAL_STEPS = 500
DEFAULT_EPOCHS = (3, 20)


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

    epochs: int | None = None  # default: from the data (`schedule`)
    steps_per_epoch: int | None = None  # default: one pass, at least MIN_STEPS_PER_EPOCH (`schedule`)
    classes_per_batch: int = 8
    per_class: int = 4
    lr: float = 1e-3
    backbone_lr_scale: float = BACKBONE_LR_SCALE
    probe_epochs: int = PROBE_EPOCHS
    head_init: str = HEAD_INIT
    patience: int | None = PATIENCE
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
    val_max: int = VAL_MAX
    checkpoint_every: int | None = None  # steps; None: at the end of every epoch only

    def __post_init__(self) -> None:
        for name in ("classes_per_batch", "per_class", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("epochs", "patience", "checkpoint_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (or None for the default), got {getattr(self, name)}")
        if self.val_max < 2:
            raise ConfigError(f"val_max must be at least 2, got {self.val_max}")
        if self.probe_epochs < 0:
            raise ConfigError(f"probe_epochs must be 0 or more, got {self.probe_epochs}")
        if not (math.isfinite(self.backbone_lr_scale) and 0 <= self.backbone_lr_scale <= 1):
            raise ConfigError(f"backbone_lr_scale must be in [0, 1], got {self.backbone_lr_scale}")
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
        if self.head_init not in HEAD_INITS:
            raise ConfigError(f"head_init must be one of {', '.join(HEAD_INITS)}, got {self.head_init!r}")
        if self.batch_norm not in BATCH_NORM_CHOICES:
            raise ConfigError(f"batch_norm must be one of {', '.join(BATCH_NORM_CHOICES)}, got {self.batch_norm!r}")

    def schedule(self, train_images: int, world_size: int = 1) -> tuple[int, int]:
        """(steps per epoch, epochs) for this many training images: the configured values, else the
        defaults from the data (see `describe_schedule`)."""
        one_pass = max(1, train_images // (self.batch_size * world_size))
        steps = self.steps_per_epoch or max(one_pass, MIN_STEPS_PER_EPOCH)
        low, high = DEFAULT_EPOCHS
        epochs = self.epochs or min(high, max(low, math.ceil(MIN_TOTAL_STEPS / steps)))
        return steps, epochs

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
        from .losses import LossWeights  # torch's: imported when training starts

        if self.loss is not None:
            return self.loss
        if config.mode == "flat":
            return LossWeights(contrastive=1.0)
        leaf = self.leaf_softmax if self.leaf_softmax is not None else default_leaf_softmax(leaf_labels)
        return LossWeights(contrastive=1.0, softmax={name: DEFAULT_SOFTMAX for name in config.level_names[:-1]}
                           | {config.level_names[-1]: leaf})

    def to_dict(self) -> dict:
        data = asdict(self)
        data["loss"] = self.loss.to_dict() if self.loss else None
        return data
