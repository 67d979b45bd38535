"""`CollectionSpec` and the one function that names every field of a collection.

Layout (one collection per catalogue): ``id`` VARCHAR primary key, ``uri`` VARCHAR,
``meta`` JSON, one VARCHAR per category level named after the level (the category's path
from the root, INVERTED index), ``predicted`` BOOL (the path was predicted by the model,
not given) with one FLOAT ``conf_<level>`` per level (its probability; 1 for given
paths), one FLOAT_VECTOR ``vec_<level>`` per level and ``vec`` for the image
(concatenated) vector. `LAYOUT` numbers this layout; collections record theirs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

from hiervec_core.names import LITE_INDEXES, SERVER_INDEXES

from .errors import StoreError, UnsupportedIndexError

METRICS = ("L2", "IP", "COSINE")
ID_MAX_LENGTH = 512
URI_MAX_LENGTH = 4096
CATEGORY_MAX_LENGTH = 2048
META_MAX_BYTES = 65_536  # Milvus's default limit on one JSON field value
META_MAX_DEPTH = 32  # objects and lists inside one another; deeper is refused, not recursed into
SEPARATOR = "/"
PROPERTY_SPEC = "hiervec.spec"
PROPERTY_FINGERPRINT = "hiervec.fingerprint"
PROPERTY_MODEL = "hiervec.model"  # where the model that fills the collection lives (written at ingest)
LAYOUT = 2  # 1: before predicted paths (no predicted / conf_<level> fields)
_RESERVED = ("id", "uri", "meta", "vec", "predicted")
_LEVEL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


@dataclass(frozen=True)
class FieldNames:
    id: str
    uri: str
    meta: str
    vector: str
    levels: dict[str, str]  # level name -> VARCHAR field
    level_vectors: dict[str, str]  # level name -> FLOAT_VECTOR field (empty without per-level vectors)
    predicted: str  # BOOL: the category path was predicted, not given
    confidence: dict[str, str]  # level name -> FLOAT field: the path's probability at that level

    @property
    def scalars(self) -> list[str]:
        return [self.uri, self.meta, *self.levels.values(), self.predicted, *self.confidence.values()]


def field_names(level_names: Sequence[str], *, level_vectors: bool = True) -> FieldNames:
    """Every field name of a collection for these levels; nothing else spells them."""
    return FieldNames(
        id="id",
        uri="uri",
        meta="meta",
        vector="vec",
        levels={name: name for name in level_names},
        level_vectors={name: f"vec_{name}" for name in level_names} if level_vectors else {},
        predicted="predicted",
        confidence={name: f"conf_{name}" for name in level_names},
    )


@dataclass(frozen=True)
class CollectionSpec:
    """Levels, vector sizes, metric and index of a collection.

    `level_dims` empty means the collection holds only the image vector (a flat model).
    `index` None means: the target's default when creating, whatever is stored when opening.
    Distances are Milvus's: squared Euclidean for L2.
    """

    level_names: tuple[str, ...]
    dim: int
    level_dims: tuple[int, ...] = ()
    metric: str = "L2"
    index: str | None = None
    layout: int = LAYOUT

    def __post_init__(self) -> None:
        object.__setattr__(self, "level_names", tuple(self.level_names))
        object.__setattr__(self, "level_dims", tuple(int(d) for d in self.level_dims))
        if not self.level_names:
            raise StoreError("a collection needs at least one category level")
        for name in self.level_names:
            if (not isinstance(name, str) or not _LEVEL_NAME.match(name) or name in _RESERVED
                    or name.startswith(("vec_", "conf_"))):
                raise StoreError(
                    f"level name {name!r} must be an identifier that is not one of {_RESERVED} "
                    f"and does not start with 'vec_' or 'conf_'"
                )
        if len(set(self.level_names)) != len(self.level_names):
            raise StoreError(f"level names must be distinct, got {self.level_names}")
        if not isinstance(self.dim, int) or self.dim < 1:
            raise StoreError(f"dim must be a positive integer, got {self.dim!r}")
        if self.level_dims and (len(self.level_dims) != len(self.level_names) or min(self.level_dims) < 1):
            raise StoreError(
                f"level_dims must hold one positive size per level ({len(self.level_names)}), got {self.level_dims}"
            )
        if self.metric not in METRICS:
            raise StoreError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.index is not None and self.index not in SERVER_INDEXES:
            raise UnsupportedIndexError(f"index must be one of {SERVER_INDEXES}, got {self.index!r}")

    @property
    def fields(self) -> FieldNames:
        return field_names(self.level_names, level_vectors=bool(self.level_dims))

    @property
    def depth(self) -> int:
        return len(self.level_names)

    def vector_dims(self) -> dict[str, int]:
        """Vector field -> size."""
        fields = self.fields
        dims = {fields.vector: self.dim}
        dims.update({fields.level_vectors[n]: d for n, d in zip(self.level_names, self.level_dims)})
        return dims

    def with_index(self, index: str) -> CollectionSpec:
        return replace(self, index=index)

    def to_json(self) -> str:
        data = asdict(self)
        data["level_names"], data["level_dims"] = list(self.level_names), list(self.level_dims)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CollectionSpec:
        data = json.loads(text)
        return cls(tuple(data["level_names"]), data["dim"], tuple(data["level_dims"]), data["metric"], data["index"],
                   data.get("layout", 1))


def check_index(index: str, *, lite: bool) -> None:
    offered = LITE_INDEXES if lite else SERVER_INDEXES
    if index not in offered:
        target = "Milvus Lite" if lite else "a Milvus server"
        hint = " (Lite accepts it but fails when loading it; use a Milvus server)" if lite and index in SERVER_INDEXES else ""
        raise UnsupportedIndexError(f"index {index!r} is not offered on {target}{hint}; choose one of {offered}")


def index_build_params(index: str, dim: int) -> dict:
    if index == "HNSW":
        return {"M": 16, "efConstruction": 200}
    if index in ("IVF_FLAT", "IVF_SQ8"):
        return {"nlist": IVF_NLIST}
    if index == "IVF_PQ":
        m = max(d for d in range(1, max(1, dim // 4) + 1) if dim % d == 0)
        return {"nlist": IVF_NLIST, "m": m, "nbits": 8}
    return {}


MAX_EF = 32768
IVF_NLIST = 1024


def index_search_params(index: str, k: int, share: float = 1.0) -> dict:
    """Search breadth for top-`k` when a `share` (0, 1] of the rows passes the filter.

    A filtered graph or IVF search drops the rows that fail the filter after visiting
    them, so its breadth must grow as the share shrinks. Measured on Milvus Lite at
    100,000 vectors (BENCHMARKS.md): with 2% of rows passing, HNSW recall@10 is 0.59 at
    ef=64 and 0.995 at ef=2048; IVF_FLAT's is 0.75 at nprobe=32 and 1.0 at nprobe=128.
    """
    share = min(1.0, max(share, 1e-6))
    if index == "HNSW":
        base = max(64, k)
        return {"ef": int(min(MAX_EF, max(base, base / share)))}
    if index.startswith("IVF"):
        return {"nprobe": int(min(IVF_NLIST, max(32, 3.2 / share)))}
    if index == "DISKANN":
        base = max(100, k)
        return {"search_list": int(min(MAX_EF, max(base, base / share)))}
    return {}
