"""The untrained backbone as an embedder: the baseline every trained model must beat.

Its image vector is the backbone's deepest feature map (ImageNet weights by default),
globally average-pooled and L2-normalised: what a plain reverse-image-search pipeline
does with no training. `BackboneEmbedder` satisfies `hiervec_app.ImageEmbedder`, so
``hiervec eval DATA --baseline imagenet`` measures it through the same protocol as a
trained checkpoint; training logs its score on the validation split before the first step.

>>> embedder = BackboneEmbedder(level_names=("department", "category"), image_size=64)  # doctest: +SKIP
>>> embedder.embed(torch.zeros(2, 3, 64, 64, dtype=torch.uint8)).concat.shape           # doctest: +SKIP
(2, 1280)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from hiervec_core.vectors import LevelVectors

from .backbones import build_body
from .data import decode_image, image_to_tensor, load_images
from .errors import ConfigError, ImageDecodeError
from .hierarchy import validate_level_names


def pooled_features(body: nn.Module, stage: str, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                    batch_size: int = 128, *, normalize: bool = True) -> np.ndarray:
    """``(n, C)`` float32 vectors: `body`'s map `stage` of uint8 `images`, average-pooled, in eval mode;
    unit length unless `normalize` is False."""
    was_training = body.training
    body.eval()
    device = mean.device
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device).float().div_(255)
            pooled = body((x - mean) / std)[stage].float().mean((2, 3))
            out.append((torch.nn.functional.normalize(pooled, dim=1) if normalize else pooled).cpu().numpy())
    body.train(was_training)
    channels = 0 if not out else out[0].shape[1]
    return np.concatenate(out) if out else np.empty((0, channels), dtype=np.float32)


class BackboneEmbedder:
    """A backbone with no new layers: pooled deepest features as the image vector, no level vectors.

    `level_names` name the collection's category fields (the data's levels); the vectors do
    not depend on them. `fingerprint` names the backbone, its weights and the input size.
    """

    def __init__(self, *, level_names: Sequence[str], image_size: int, backbone: str = "mobilenet_v2",
                 weights: str = "imagenet", batch_size: int = 64):
        validate_level_names(tuple(level_names))
        if image_size < 32:
            raise ConfigError(f"image_size must be at least 32 px, got {image_size}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        body = build_body(backbone, weights, 1, image_size)
        self.stage = body.stages[-1]
        self.body = body.module
        self.body.eval()
        self.mean = torch.tensor(body.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(body.std).view(1, 3, 1, 1)
        self.level_names = tuple(level_names)
        self.level_dims: tuple[int, ...] = ()
        self.image_size = image_size
        self.batch_size = batch_size
        with torch.no_grad():
            self.dim = int(self.body(torch.zeros(1, 3, image_size, image_size))[self.stage].shape[1])
        digest = hashlib.sha256(f"{backbone}|{weights}|{image_size}|avg".encode())
        for value in self.body.state_dict().values():
            digest.update(value.detach().cpu().numpy().tobytes())
        self.fingerprint = f"baseline-{digest.hexdigest()[:12]}"

    def prepare(self, image) -> torch.Tensor:
        """Decode and resize one image: a ``(3, s, s)`` uint8 tensor, or `ImageDecodeError`."""
        return image_to_tensor(decode_image(image), self.image_size)

    def embed(self, images) -> LevelVectors:
        """Vectors of prepared uint8 tensors, a uint8 batch tensor, or decodable images."""
        if isinstance(images, torch.Tensor):
            batch = images
        elif images and all(isinstance(x, torch.Tensor) for x in images):
            batch = torch.stack(list(images))
        else:
            batch, _, failures = load_images(list(images), self.image_size)
            if failures:
                raise ImageDecodeError(failures[0].source, failures[0].reason)
        concat = pooled_features(self.body, self.stage, batch, self.mean, self.std, self.batch_size)
        return LevelVectors({}, concat)
