"""`PyramidEmbedder`: backbone -> feature pyramid -> per-level pooled FC vectors -> concatenation.

Level-to-map mapping (the method's claim): a hierarchy of L levels takes the L deepest
backbone stages into torchvision's `FeaturePyramidNetwork`. Level 0 (the coarsest
category) reads the deepest, most semantic pyramid map (stride 32); each finer level
reads the next shallower, higher-resolution map (stride 16, 8, ...). `level_maps` records
the mapping.

Each level's map is pooled, sent through its own `Linear` and L2-normalised. The image
vector is the concatenation of the level vectors, each times its weight
(`EmbedderConfig.level_weights`, all equal by default), divided by the weights' norm:
unit length, so L2, inner-product and cosine search rank alike, and its squared
distance is the weighted mean of the per-level squared distances.

>>> config = EmbedderConfig(("dept", "cat", "item"), (3, 6, 10), (32, 32, 64), backbone="resnet18")
>>> out = PyramidEmbedder(config)(torch.rand(2, 3, 64, 64))
>>> [tuple(v.shape) for v in out.levels], tuple(out.concat.shape)
([(2, 32), (2, 32), (2, 64)], (2, 128))
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops import FeaturePyramidNetwork

from .backbones import IMAGENET_MEAN, IMAGENET_STD, backbone_spec, build_backbone
from .config import EmbedderConfig


class PyramidOutput(NamedTuple):
    levels: tuple[torch.Tensor, ...]  # one (n, d_i) unit vector per level, coarsest first; () when flat
    concat: torch.Tensor  # (n, sum d_i), unit length
    logits: tuple[torch.Tensor | None, ...]  # per level; None where the mode has no classifier


class GeM(nn.Module):
    """Generalised-mean pooling with a learned exponent (p=1 is average pooling)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


class AvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


class CosineClassifier(nn.Module):
    """Softmax logits as scaled cosines: ``scale * <x, w_c / |w_c|>`` for unit vectors x.

    A plain linear layer on unit vectors can only produce logits in [-|w|, |w|] and learns
    slowly; the fixed scale lets the softmax train at the pace of the metric loss.
    """

    def __init__(self, dim: int, num_classes: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * 0.01)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(x, F.normalize(self.weight, dim=1))


def _pool(kind: str) -> nn.Module:
    return GeM() if kind == "gem" else AvgPool()


class PyramidEmbedder(nn.Module):
    """The method's model; see the module docstring. Input: float images in [0, 1], (n, 3, H, W)."""

    def __init__(self, config: EmbedderConfig, *, backbone_weights: str | None = None):
        super().__init__()
        self.config = config
        spec = backbone_spec(config.backbone)
        taken = 1 if config.mode == "flat" else config.depth
        if taken > len(spec.stages):
            raise ValueError(f"{spec.name} has {len(spec.stages)} stages, {taken} levels asked")
        self.stages = spec.stages[-taken:]  # shallow to deep
        self.strides = spec.strides[-taken:]
        self.body = create_feature_extractor(
            build_backbone(config.backbone, backbone_weights), return_nodes={s: s for s in self.stages}
        )
        self.stage_channels = self._dry_run_channels()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

        weights = config.level_weights or (1.0,) * config.depth
        norm = math.sqrt(sum(w * w for w in weights))
        self.level_weights = tuple(w / norm for w in weights)
        if config.mode == "pyramid":
            self.fpn = FeaturePyramidNetwork(list(self.stage_channels), config.fpn_channels)
            self.pools = nn.ModuleList(_pool(config.pooling) for _ in range(config.depth))
            self.heads = nn.ModuleList(nn.Linear(config.fpn_channels, d) for d in config.level_dims)
            self.classifiers = nn.ModuleList(
                CosineClassifier(d, n, config.classifier_scale)
                for d, n in zip(config.level_dims, config.num_classes)
            )
        else:
            self.pools = nn.ModuleList([_pool(config.pooling)])
            self.heads = nn.ModuleList([nn.Linear(self.stage_channels[-1], config.dim)])
            self.classifiers = nn.ModuleList(
                [CosineClassifier(config.dim, config.num_classes[-1], config.classifier_scale)]
            )

    def _dry_run_channels(self) -> tuple[int, ...]:
        was_training = self.body.training
        self.body.eval()
        with torch.no_grad():
            size = max(64, 2 * self.strides[-1])
            maps = self.body(torch.zeros(1, 3, size, size))
        self.body.train(was_training)
        return tuple(maps[s].shape[1] for s in self.stages)

    @property
    def level_maps(self) -> dict[str, tuple[str, int]]:
        """``{level_name: (backbone stage, stride)}``: coarsest level <- deepest map."""
        if self.config.mode == "flat":
            return {}
        return {
            level: (self.stages[-1 - i], self.strides[-1 - i])
            for i, level in enumerate(self.config.level_names)
        }

    def pyramid(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The pyramid maps in level order: element 0 is the deepest (coarsest level)."""
        feats = self.body((images - self.mean) / self.std)
        maps = self.fpn(OrderedDict((s, feats[s]) for s in self.stages))
        return [maps[s] for s in reversed(self.stages)]

    def vectors(self, images: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """(level vectors, image vector) without the classifiers: what retrieval needs."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (n, 3, H, W), got {tuple(images.shape)}")
        if self.config.mode == "flat":
            deepest = self.body((images - self.mean) / self.std)[self.stages[-1]]
            return (), F.normalize(self.heads[0](self.pools[0](deepest)), dim=1)
        levels = tuple(
            F.normalize(head(pool(fmap)), dim=1)
            for fmap, pool, head in zip(self.pyramid(images), self.pools, self.heads)
        )
        return levels, torch.cat([w * v for w, v in zip(self.level_weights, levels)], dim=1)

    def forward(self, images: torch.Tensor) -> PyramidOutput:
        levels, concat = self.vectors(images)
        if self.config.mode == "flat":
            logits = (None,) * (self.config.depth - 1) + (self.classifiers[0](concat),)
            return PyramidOutput((), concat, logits)
        logits = tuple(clf(v) for clf, v in zip(self.classifiers, levels))
        return PyramidOutput(levels, concat, logits)
