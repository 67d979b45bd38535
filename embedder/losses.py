"""Losses as small modules, combined by weight in `HierarchicalLoss`.

Labels are an ``(n, levels)`` integer array of per-level category codes, coarsest first.

>>> x = torch.tensor([[0.0, 0.0], [0.6, 0.8], [3.0, 4.0]])
>>> ContrastiveLoss(margin=2.0)(x, torch.tensor([0, 0, 1]))   # pos d=1; negs d=5 (0), d=4.4 (0)
tensor(1.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import keyed_by_level
from .errors import ConfigError
from .model import PyramidOutput


class ContrastiveLoss(nn.Module):
    """Contrastive loss over every pair in the batch, on Euclidean distance.

    Positive pairs (same label) cost ``d**2``; negative pairs cost
    ``max(0, margin - d)**2``. Each kind is averaged on its own, negatives over the
    pairs still inside the margin (pairs already pushed out teach nothing), so a batch
    with many easy negatives does not drown the positives.
    """

    def __init__(self, margin: float = 1.0):
        super().__init__()
        if margin <= 0:
            raise ConfigError(f"margin must be positive, got {margin}")
        self.margin = margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if embeddings.shape[0] != labels.shape[0]:
            raise ConfigError(f"{embeddings.shape[0]} embeddings but {labels.shape[0]} labels")
        dist = torch.cdist(embeddings, embeddings).clamp_min(0)
        n = embeddings.shape[0]
        upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=embeddings.device), diagonal=1)
        same = labels.view(-1, 1) == labels.view(1, -1)
        pos = dist[same & upper].pow(2)
        neg = F.relu(self.margin - dist[~same & upper]).pow(2)
        neg = neg[neg > 0]
        zero = embeddings.sum() * 0.0  # keeps the graph when a kind of pair is absent
        return (pos.mean() if pos.numel() else zero) + (neg.mean() if neg.numel() else zero)


class LevelCrossEntropy(nn.Module):
    """Softmax cross-entropy of one level's logits against that level's codes."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)


PerLevel = Mapping[str, float] | Sequence[float]


@dataclass(frozen=True, eq=False)
class LossWeights:
    """Weights of the loss parts; zero switches a part off.

    `contrastive`: on the image vector with leaf labels. `level_contrastive[level]`: on
    that level's vector with its labels (pyramid mode). `softmax[level]`: that level's
    cross-entropy (in flat mode only the leaf level has a classifier). Per-level weights
    are keyed by level name (a level left out weighs 0); a sequence, one weight per level
    coarsest first, is the older form and still accepted. A classifier whose softmax weight
    is zero still learns for prediction when `HierarchicalLoss` is given the model's
    classifiers: on detached vectors, so it never moves them.

    >>> LossWeights(softmax={"category": 0.05, "item": 1.0}).by_level("softmax", ("department", "category", "item"))
    {'department': 0.0, 'category': 0.05, 'item': 1.0}
    """

    contrastive: float = 1.0
    level_contrastive: PerLevel = ()
    softmax: PerLevel = ()

    def by_level(self, part: str, level_names: Sequence[str]) -> dict[str, float]:
        """`part`'s weights as ``{level: weight}`` for these levels ({} when the part is unset)."""
        values = getattr(self, part)
        if not values:
            return {}
        if isinstance(values, Mapping):
            return keyed_by_level(values, level_names, f"{part} weights", 0.0)
        if len(values) != len(level_names):
            raise ConfigError(f"{part} weights need one value per level ({len(level_names)}), got {tuple(values)}")
        return dict(zip(level_names, (float(v) for v in values)))

    def _comparable(self) -> tuple:
        def key(values):
            return tuple(sorted(values.items())) if isinstance(values, Mapping) else tuple(values)

        return self.contrastive, key(self.level_contrastive), key(self.softmax)

    def __eq__(self, other) -> bool:
        return isinstance(other, LossWeights) and self._comparable() == other._comparable()

    def __hash__(self) -> int:
        return hash(self._comparable())

    def to_dict(self) -> dict:
        def out(values):
            return dict(values) if isinstance(values, Mapping) else list(values)

        return {"contrastive": self.contrastive, "level_contrastive": out(self.level_contrastive),
                "softmax": out(self.softmax)}


class HierarchicalLoss(nn.Module):
    """Weighted sum of the contrastive and per-level softmax parts; returns (total, parts).

    `pair_loss` computes the contrastive parts (default ``ContrastiveLoss(margin)``);
    training across processes passes it wrapped in `embedder.distributed.GlobalBatchLoss`.
    """

    def __init__(self, level_names: Sequence[str], weights: LossWeights, margin: float = 1.0,
                 classify: Callable[[dict, torch.Tensor], dict] | None = None, *,
                 pair_loss: nn.Module | None = None):
        super().__init__()
        self.level_names = tuple(level_names)
        self.weights = weights
        self.level_contrastive = weights.by_level("level_contrastive", self.level_names)
        self.softmax = weights.by_level("softmax", self.level_names)
        self.contrastive = pair_loss if pair_loss is not None else ContrastiveLoss(margin)
        self.cross_entropy = LevelCrossEntropy()
        # the model's `classify` (its classifiers are the model's, not registered here)
        self._classify = classify

    def forward(self, output: PyramidOutput, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        parts: dict[str, torch.Tensor] = {}
        w = self.weights
        if w.contrastive:
            parts["contrastive"] = w.contrastive * self.contrastive(output.concat, labels[:, -1])
        for i, name in enumerate(self.level_names):
            weight = self.level_contrastive.get(name)
            if weight and name in output.levels:
                parts[f"contrastive_{name}"] = weight * self.contrastive(output.levels[name], labels[:, i])
        for i, name in enumerate(self.level_names):
            weight = self.softmax.get(name)
            if weight and name in output.logits:
                parts[f"softmax_{name}"] = weight * self.cross_entropy(output.logits[name], labels[:, i])
        if not parts:
            raise ConfigError("every loss weight is zero for this model: nothing to train")
        if self._classify is not None:
            parts.update(self._probes(output, labels, self.softmax))
        total = torch.stack(list(parts.values())).sum()
        return total, {k: float(v.detach()) for k, v in parts.items()}

    def _probes(self, output: PyramidOutput, labels: torch.Tensor, softmax: Mapping[str, float]) -> dict:
        """Cross-entropy of the classifiers without a softmax weight, on detached vectors."""
        unweighted = [i for i, name in enumerate(self.level_names)
                      if name in output.logits and not softmax.get(name)]
        if not unweighted:
            return {}
        logits = self._classify({k: v.detach() for k, v in output.levels.items()}, output.concat.detach())
        return {f"probe_{self.level_names[i]}": self.cross_entropy(logits[self.level_names[i]], labels[:, i])
                for i in unweighted}
