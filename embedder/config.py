"""`EmbedderConfig`: everything needed to rebuild a `PyramidEmbedder` from a checkpoint."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from hiervec_core.names import DEFAULT_BACKBONE

from .backbones import check_backbone
from .errors import ConfigError
from .train_config import DEFAULT_DIM, DEFAULT_MODE
from .hierarchy import MAX_LEVELS, MIN_LEVELS, Hierarchy, validate_level_names

Mode = Literal["pyramid", "flat"]
Pooling = Literal["avg", "gem"]


IMAGE = "image"  # the key of the flat model's one head (the image vector)

def keyed_by_level(values: Mapping[str, float], level_names: Sequence[str], what: str,
                   default: float) -> dict[str, float]:
    """Per-level values given by level name as ``{level: value}`` for every level (`default` where left
    out); a name the model does not have is refused, naming its levels."""
    unknown = sorted(set(values) - set(level_names))
    if unknown:
        raise ConfigError(f"{what} name levels the model does not have: {unknown} (its levels: "
                          f"{', '.join(level_names)})")
    return {name: float(values.get(name, default)) for name in level_names}


@dataclass(frozen=True)
class EmbedderConfig:
    """The model's shape. Build one for a hierarchy with `for_hierarchy`.

    `level_dims[i]` is the size of level ``i``'s vector (coarsest first); the image
    vector is their concatenation, each level scaled by `level_weights[i]` (default: all
    equal) and the whole divided to unit length, so a level's share of the squared
    distance is ``w_i**2 / sum(w**2)``. In ``flat`` mode one vector of ``sum(level_dims)``
    comes from the deepest backbone map, the baseline the method improves on.
    """

    level_names: tuple[str, ...]
    num_classes: tuple[int, ...]
    level_dims: tuple[int, ...]
    backbone: str = DEFAULT_BACKBONE
    fpn_channels: int = 128
    image_size: int = 64
    mode: Mode = DEFAULT_MODE
    pooling: Pooling = "avg"
    classifier_scale: float = 16.0
    level_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("level_names", "num_classes", "level_dims"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.level_weights is not None:
            object.__setattr__(self, "level_weights", tuple(float(w) for w in self.level_weights))
        validate_level_names(self.level_names)
        depth = len(self.level_names)
        if not MIN_LEVELS <= depth <= MAX_LEVELS:
            raise ConfigError(f"{MIN_LEVELS} to {MAX_LEVELS} levels are supported, got {depth}")
        for name in ("num_classes", "level_dims"):
            values = getattr(self, name)
            if len(values) != depth or any(not isinstance(v, int) or v < 1 for v in values):
                raise ConfigError(f"{name} must hold {depth} positive integers, got {values}")
        check_backbone(self.backbone)
        if self.mode not in ("pyramid", "flat"):
            raise ConfigError(f"mode must be 'pyramid' or 'flat', got {self.mode!r}")
        if self.pooling not in ("avg", "gem"):
            raise ConfigError(f"pooling must be 'avg' or 'gem', got {self.pooling!r}")
        if self.fpn_channels < 1:
            raise ConfigError(f"fpn_channels must be positive, got {self.fpn_channels}")
        if self.image_size < 32:
            raise ConfigError(f"image_size must be at least 32 px, got {self.image_size}")
        if self.level_weights is not None:
            if self.mode == "flat":
                raise ConfigError("level_weights apply to the pyramid's level vectors; a flat model has none")
            if len(self.level_weights) != depth or min(self.level_weights) <= 0:
                raise ConfigError(f"level_weights must hold {depth} positive numbers, got {self.level_weights}")
        if self.classifier_scale <= 0:
            raise ConfigError(f"classifier_scale must be positive, got {self.classifier_scale}")

    @classmethod
    def for_hierarchy(cls, hierarchy: Hierarchy, *, dim: int | tuple[int, ...] = DEFAULT_DIM, **kwargs) -> EmbedderConfig:
        """A config for `hierarchy`; `dim` is one size for every level or one per level."""
        dims = (dim,) * hierarchy.depth if isinstance(dim, int) else tuple(dim)
        return cls(hierarchy.level_names, hierarchy.num_classes, dims, **kwargs)

    @property
    def depth(self) -> int:
        return len(self.level_names)

    @property
    def dim(self) -> int:
        """Size of the image (concatenated) vector."""
        return sum(self.level_dims)

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("level_names", "num_classes", "level_dims", "level_weights"):
            data[key] = None if data[key] is None else list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict) -> EmbedderConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown EmbedderConfig fields: {sorted(unknown)}")
        return cls(**data)
