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

Per-level parts (pools, heads, classifiers) and outputs (level vectors, logits) are keyed
by level name. A flat model (the baseline) has one head, `IMAGE`, on the deepest map and
one classifier, for the finest level, reading the image vector: its outputs have no level
vectors and logits for that level only.

>>> config = EmbedderConfig(("dept", "cat", "item"), (3, 6, 10), (32, 32, 64), backbone="resnet18")
>>> out = PyramidEmbedder(config)(torch.rand(2, 3, 64, 64))
>>> {level: tuple(v.shape) for level, v in out.levels.items()}, tuple(out.concat.shape)
({'dept': (2, 32), 'cat': (2, 32), 'item': (2, 64)}, (2, 128))
>>> {level: tuple(v.shape) for level, v in out.logits.items()}
{'dept': (2, 3), 'cat': (2, 6), 'item': (2, 10)}
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from .backbones import build_body
from .config import IMAGE, EmbedderConfig
from .errors import ConfigError


class PyramidOutput(NamedTuple):
    levels: dict[str, torch.Tensor]  # level -> (n, d_i) unit vectors, coarsest first; empty when flat
    concat: torch.Tensor  # (n, sum d_i), unit length
    logits: dict[str, torch.Tensor]  # level -> (n, classes) for each level with a classifier


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
        body = build_body(config.backbone, backbone_weights, 1 if config.mode == "flat" else config.depth,
                          config.image_size)
        self.stages, self.strides = body.stages, body.strides  # shallow to deep
        self.body = body.module
        self.stage_channels = self._dry_run_channels()
        self.register_buffer("mean", torch.tensor(body.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(body.std).view(1, 3, 1, 1), persistent=False)

        weights = config.level_weights or (1.0,) * config.depth
        norm = math.sqrt(sum(w * w for w in weights))
        self.level_weights = tuple(w / norm for w in weights)
        names = config.level_names
        if config.mode == "pyramid":
            self.fpn = FeaturePyramidNetwork(list(self.stage_channels), config.fpn_channels)
            self.pools = nn.ModuleDict({name: _pool(config.pooling) for name in names})
            self.heads = nn.ModuleDict({name: nn.Linear(config.fpn_channels, d)
                                        for name, d in zip(names, config.level_dims)})
            self.classifiers = nn.ModuleDict({name: CosineClassifier(d, n, config.classifier_scale)
                                              for name, d, n in zip(names, config.level_dims, config.num_classes)})
        else:
            self.pools = nn.ModuleDict({IMAGE: _pool(config.pooling)})
            self.heads = nn.ModuleDict({IMAGE: nn.Linear(self.stage_channels[-1], config.dim)})
            self.classifiers = nn.ModuleDict(
                {names[-1]: CosineClassifier(config.dim, config.num_classes[-1], config.classifier_scale)})

    def _dry_run_channels(self) -> tuple[int, ...]:
        was_training = self.body.training
        self.body.eval()
        with torch.no_grad():
            size = self.config.image_size  # a timm ViT takes no other
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

    def vectors(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(level vectors, image vector) without the classifiers: what retrieval needs."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ConfigError(f"expected images of shape (n, 3, H, W), got {tuple(images.shape)}")
        if self.config.mode == "flat":
            deepest = self.body((images - self.mean) / self.std)[self.stages[-1]]
            return {}, F.normalize(self.heads[IMAGE](self.pools[IMAGE](deepest)), dim=1)
        levels = {
            name: F.normalize(self.heads[name](self.pools[name](fmap)), dim=1)
            for name, fmap in zip(self.config.level_names, self.pyramid(images))
        }
        return levels, torch.cat([w * v for w, v in zip(self.level_weights, levels.values())], dim=1)

    def classify(self, levels: dict[str, torch.Tensor], concat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of every level with a classifier, from the vectors it reads (its level's; the image
        vector for a flat model): also from vectors read back from a collection."""
        flat = self.config.mode == "flat"
        return {name: classifier(concat if flat else levels[name]) for name, classifier in self.classifiers.items()}

    def forward(self, images: torch.Tensor) -> PyramidOutput:
        levels, concat = self.vectors(images)
        return PyramidOutput(levels, concat, self.classify(levels, concat))

    @torch.no_grad()
    def start_from_backbone(self, pooled: torch.Tensor, labels: torch.Tensor | None = None) -> int:
        """Set the new layers so that the model starts as its backbone: every level vector is the
        backbone's average-pooled deepest map projected on its top singular directions (the
        principal components about the origin: uncentred, as the backbone's cosine is), and each
        classifier's class weights are the mean vector of the class (weight imprinting, Qi et al.,
        CVPR 2018). Training then starts from the untrained backbone's search, not from random
        projections of it. `pooled`: ``(n, C)`` pooled deepest features of training images (the
        body in eval mode, not normalised); `labels`: their ``(n, depth)`` label rows, or None.

        Pyramid: the deepest lateral 1x1 convolution holds the components, the other laterals
        are zero (each finer map starts as the upsampled deepest map, their own features are
        learnt), the 3x3 convolutions are identities and each head keeps its first components.
        Exact for average pooling; GeM pooling has no linear start (`ConfigError`).
        Returns the number of components taken from the data.
        """
        if self.config.pooling != "avg":
            raise ConfigError(f"the backbone start needs average pooling (got {self.config.pooling!r}): "
                              f"GeM does not commute with the linear layers")
        channels = self.stage_channels[-1]
        if pooled.ndim != 2 or pooled.shape[1] != channels or len(pooled) < 2:
            raise ConfigError(f"expected (n >= 2, {channels}) pooled features, got {tuple(pooled.shape)}")
        pooled = pooled.double()
        width = self.config.fpn_channels if self.config.mode == "pyramid" else self.config.dim
        _, _, vh = torch.linalg.svd(pooled, full_matrices=False)
        taken = min(width, vh.shape[0])
        components = torch.zeros(width, channels, dtype=torch.float64)
        components[:taken] = vh[:taken]
        shift = torch.zeros(width, dtype=torch.float64)
        if self.config.mode == "flat":
            _set(self.heads[IMAGE], components, shift)
        else:
            inner = [block[0] for block in self.fpn.inner_blocks]
            for conv in inner[:-1]:
                _set(conv, torch.zeros_like(conv.weight), torch.zeros_like(conv.bias))
            _set(inner[-1], components.view(width, channels, 1, 1), shift)
            for block in self.fpn.layer_blocks:
                identity = torch.zeros_like(block[0].weight)
                identity[:, :, 1, 1] = torch.eye(width)
                _set(block[0], identity, torch.zeros_like(block[0].bias))
            for head in self.heads.values():
                _set(head, torch.eye(head.out_features, width), torch.zeros(head.out_features))
        if labels is not None:
            coords = (pooled @ components.T).float()
            for name, classifier in self.classifiers.items():
                column = self.config.level_names.index(name)
                vectors = F.normalize(coords if self.config.mode == "flat" else self.heads[name](coords), dim=1)
                for label in torch.unique(labels[:, column]).tolist():
                    if 0 <= label < classifier.weight.shape[0]:
                        classifier.weight[label] = F.normalize(vectors[labels[:, column] == label].mean(0), dim=0)
        return taken


def _set(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    layer.weight.copy_(weight.to(layer.weight))
    layer.bias.copy_(bias.to(layer.bias))
