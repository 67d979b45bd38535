"""``timm:NAME`` backbones: any timm model that offers ``features_only``.

Stages, channels and strides come from timm's ``feature_info``; the input normalisation
from the model's pretrained config. A hierarchical model (ConvNets, Swin...) gives its
stages of growing stride: a hierarchy of L levels takes the L deepest. A plain model whose
stages all share one stride (a ViT) gets ViTDet's simple feature pyramid (Li et al.,
"Exploring Plain Vision Transformer Backbones for Object Detection", ECCV 2022) on its last
map: twice its stride by max-pooling, the stride itself, and half and a quarter of it by
transposed convolutions; L levels take the L coarsest of these. A model with a fixed input
size (ViTs) is built for the model's ``image_size`` (timm resamples pretrained position
embeddings to it), which keeps it exportable to ONNX.

Weights (never a silent random start): None, random; a file, a state dict of the whole timm
model (timm's ``pretrained_cfg_overlay=dict(file=...)`` loads it, as timm's own scripts do);
``imagenet``, the model's default pretrained tag from the Hugging Face cache or torch's hub
cache on disk, else timm's download; any failure is `WeightsNotFoundError`.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .backbones import Body
from .errors import ConfigError, WeightsNotFoundError

INSTALL_HINT = "pip install 'hiervec[timm]'"


def _timm():
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - the extra is installed by `make venv`
        raise ConfigError(f"timm backbones need timm: {INSTALL_HINT}") from exc
    return timm


def check_timm_name(name: str) -> None:
    timm = _timm()
    if not name or not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.75) if name else []
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ConfigError(f"unknown timm model {name!r} (timm {timm.__version__}){hint}")


class TimmFeatures(nn.Module):
    """A timm ``features_only`` model as a body: ``{stage: NCHW map}`` for its `stages`."""

    def __init__(self, model: nn.Module, stages: tuple[str, ...], take: tuple[int, ...]):
        super().__init__()
        self.model = model
        self.stages = stages
        self.take = take  # indices into the model's outputs, one per stage
        self.channels_last = str(getattr(model, "output_fmt", "NCHW")) in ("NHWC", "Format.NHWC")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = self.model(x)
        if self.channels_last:
            maps = [m.permute(0, 3, 1, 2) for m in maps]
        return {stage: maps[i] for stage, i in zip(self.stages, self.take)}


class SimplePyramid(nn.Module):
    """ViTDet's simple feature pyramid on a plain backbone's last map (stride `stride`)."""

    SCALES = (4, 2, 1, 0.5)  # upsampling factor of each output, shallow to deep

    def __init__(self, model: nn.Module, channels: int, stride: int, depth: int):
        super().__init__()
        if depth > len(self.SCALES):
            raise ConfigError(f"a plain backbone's simple pyramid has {len(self.SCALES)} maps, {depth} levels asked")
        self.model = model
        self.scales = self.SCALES[-depth:]
        self.stages = tuple(f"stride{int(stride / s)}" for s in self.scales)
        self.strides = tuple(int(stride / s) for s in self.scales)
        ops = {}
        for stage, scale in zip(self.stages, self.scales):
            if scale == 4:
                ops[stage] = nn.Sequential(nn.ConvTranspose2d(channels, channels, 2, 2), nn.GELU(),
                                           nn.ConvTranspose2d(channels, channels, 2, 2))
            elif scale == 2:
                ops[stage] = nn.ConvTranspose2d(channels, channels, 2, 2)
            elif scale == 1:
                ops[stage] = nn.Identity()
            else:
                ops[stage] = nn.MaxPool2d(2, ceil_mode=True)
        self.ops = nn.ModuleDict(ops)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        last = self.model(x)[-1]
        return {stage: op(last) for stage, op in self.ops.items()}


def build_timm_body(name: str, weights: str | os.PathLike | None, depth: int, image_size: int) -> Body:
    timm = _timm()
    check_timm_name(name)
    config = timm.models.get_pretrained_cfg(name)
    kwargs = {"features_only": True}
    if config is not None and getattr(config, "fixed_input_size", False):
        kwargs["img_size"] = image_size  # ViTs: built for the one size hiervec feeds them
    model = _create(timm, name, weights, kwargs, config)
    info = model.feature_info
    reductions, channels = list(info.reduction()), list(info.channels())
    cfg = getattr(model, "pretrained_cfg", None) or (config.to_dict() if config is not None else {})
    mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    if len(set(reductions)) == 1:
        pyramid = SimplePyramid(model, channels[-1], reductions[-1], depth)
        return Body(pyramid, pyramid.stages, pyramid.strides, mean, std)
    if depth > len(reductions):
        raise ConfigError(f"timm:{name} has {len(reductions)} feature stages, {depth} levels asked")
    take = tuple(range(len(reductions) - depth, len(reductions)))
    stages = tuple(info.module_name()[i] for i in take)
    return Body(TimmFeatures(model, stages, take), stages, tuple(reductions[i] for i in take), mean, std)


def _create(timm, name: str, weights: str | os.PathLike | None, kwargs: dict, config) -> nn.Module:
    def create(**extra):
        try:
            return timm.create_model(name, **kwargs, **extra)
        except TypeError as exc:
            raise ConfigError(f"timm:{name} cannot be built with {sorted(kwargs)}: {exc}") from exc
        except RuntimeError as exc:
            if "features_only" in str(exc):
                raise ConfigError(f"timm:{name} does not offer features_only: {exc}") from exc
            raise

    if weights is None:
        return create(pretrained=False)
    classifier = getattr(config, "classifier", None) or ()
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    text = str(weights)
    if text == "imagenet":
        local = _cached_weights(config)
        if local is not None:
            return _from_file(create, name, local, classifiers)
        try:
            return create(pretrained=True)
        except ConfigError:
            raise
        except Exception as exc:  # hub errors: OSError, HTTP errors, LocalEntryNotFoundError...
            raise WeightsNotFoundError(
                f"cannot download timm:{name}'s pretrained weights ({exc.__class__.__name__}: {exc}) and they "
                f"are not in the Hugging Face cache; pass weights=PATH, a state dict of the timm model"
            ) from exc
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"weights {text!r} for timm:{name} are neither 'imagenet' nor an existing file")
    return _from_file(create, name, path, classifiers)


class _LoadReport(logging.Handler):
    """timm loads a features model's weights leniently (its classifier is dropped) and only logs the
    keys it missed; this keeps those lines so that a file that does not fit is an error."""

    def __init__(self, classifiers: tuple[str, ...]):
        super().__init__(logging.INFO)
        self.classifiers = tuple(f"{name}." for name in classifiers)  # dropped on purpose: not a problem
        self.problems: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for kind in ("Missing keys", "Unexpected keys"):
            if message.startswith(kind + " ("):
                keys = message[len(kind) + 2:].split(")", 1)[0].split(", ")
                keys = [key for key in keys if not key.startswith(self.classifiers)]
                if keys:
                    more = f" and {len(keys) - 6} more" if len(keys) > 6 else ""
                    self.problems.append(f"{kind.lower()}: {', '.join(keys[:6])}{more}")


@contextlib.contextmanager
def _load_report(classifiers: tuple[str, ...]):
    logger = logging.getLogger("timm.models._builder")
    report, level, propagate = _LoadReport(classifiers), logger.level, logger.propagate
    logger.addHandler(report)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield report
    finally:
        logger.removeHandler(report)
        logger.setLevel(level)
        logger.propagate = propagate


def _from_file(create, name: str, path: Path, classifiers: tuple[str, ...]) -> nn.Module:
    try:
        with _load_report(classifiers) as report:
            model = create(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    except ConfigError:
        raise
    except Exception as exc:  # unreadable file, mis-shaped tensors
        raise WeightsNotFoundError(f"cannot load {path} into timm:{name}: {exc.__class__.__name__}: {exc}") from exc
    if report.problems:
        raise WeightsNotFoundError(f"{path} does not fit timm:{name} (a state dict of the whole timm model is "
                                   f"expected): {'; '.join(report.problems)}")
    return model


def _cached_weights(config) -> Path | None:
    """The default pretrained file of a model (its timm pretrained `config`) already on disk: the
    Hugging Face cache, then torch's hub."""
    if config is None:
        return None
    if getattr(config, "hf_hub_id", None):
        from huggingface_hub import try_to_load_from_cache

        repo = config.hf_hub_id.split("@")[0]
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    if getattr(config, "url", None):
        local = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(config.url)
        if local.is_file():
            return local
    return None
