"""`CollectionSpec` and the one function that names every field of a collection.

Layout (one collection per catalogue): ``id`` VARCHAR primary key, ``uri`` VARCHAR,
``meta`` JSON, one VARCHAR per category level named after the level (the category's path
from the root, INVERTED index), ``predicted`` BOOL (the path was predicted by the model,
not given) with one FLOAT ``conf_<level>`` per level (its probability; 1 for given
paths), ``vec`` for the image (concatenated) vector and one FLOAT_VECTOR ``vec_<level>``
per level that keeps its own vector (`CollectionSpec.vector_levels`: all by default; a
stock Milvus server takes 4 vector fields per collection, Milvus 2.3 one). `LAYOUT`
numbers this layout; collections record theirs.

>>> spec = CollectionSpec(("dept", "cat", "item"), 24, (8, 8, 8), vector_levels=("item",), partition_key="dept")
>>> list(spec.vector_dims()), spec.fields.partition_key
(['vec', 'vec_item'], 'dept')
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

from hiervec_core.names import LITE_INDEXES, SERVER_INDEXES, level_name_problem

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
PROPERTY_MOVE = "hiervec.move"  # a category move under way (`milvus_store.moves`): {"from", "to"}, "" when none
PROPERTY_MODEL = "hiervec.model"  # where the model that fills the collection lives (written at ingest)
# The same model relative to $HIERVEC_MODEL_ROOT, when it lies under it: another machine with the models
# under its own root finds it there.
PROPERTY_MODEL_RELATIVE = "hiervec.model_relative"
# What the collection and its fields hold, as JSON ({"collection": ..., "fields": {name: ...}}): the
# descriptions again, for Milvus Lite, which drops collection and field descriptions.
PROPERTY_ABOUT = "hiervec.about"
LAYOUT = 2  # 1: before predicted paths (no predicted / conf_<level> fields)
MAX_VECTOR_FIELDS = 10  # the most any Milvus server can be configured to take (proxy.maxVectorFieldNum)
STOCK_VECTOR_FIELDS = 4  # what a Milvus 2.4/2.5 server takes unless configured
VECTOR_FIELD_SETTING = "proxy.maxVectorFieldNum"
DEFAULT_NUM_PARTITIONS = 16  # Milvus's own default for a partition key


@dataclass(frozen=True)
class FieldNames:
    id: str
    uri: str
    meta: str
    vector: str
    levels: dict[str, str]  # level name -> VARCHAR field
    level_vectors: dict[str, str]  # level name -> FLOAT_VECTOR field, for the levels that keep one
    predicted: str  # BOOL: the category path was predicted, not given
    confidence: dict[str, str]  # level name -> FLOAT field: the path's probability at that level
    partition_key: str | None = None  # the level whose field is the partition key, if any

    @property
    def scalars(self) -> list[str]:
        return [self.uri, self.meta, *self.levels.values(), self.predicted, *self.confidence.values()]


def field_names(level_names: Sequence[str], *, level_vectors: bool | Sequence[str] = True,
                partition_key: str | None = None) -> FieldNames:
    """Every field name of a collection for these levels; nothing else spells them.

    `level_vectors`: True for every level's vector field, False for none, or the levels that keep one.
    """
    kept = level_names if level_vectors is True else () if level_vectors is False else level_vectors
    return FieldNames(
        id="id",
        uri="uri",
        meta="meta",
        vector="vec",
        levels={name: name for name in level_names},
        level_vectors={name: f"vec_{name}" for name in level_names if name in kept},
        predicted="predicted",
        confidence={name: f"conf_{name}" for name in level_names},
        partition_key=partition_key or None,
    )


@dataclass(frozen=True)
class CollectionSpec:
    """Levels, vector sizes, metric and index of a collection.

    `level_dims` (the model's level vector sizes) empty means a flat model: only the image vector.
    `vector_levels`: the levels that keep a vector field of their own (None: all of them; ``()``:
    the image vector only, for servers that take one vector field or few). The image vector
    concatenates positive multiples of the unit level vectors, so a level without a field
    still has its vector, read back from the image vector (`HierStore.embeddings`); what it
    cannot do is a nearest-neighbour search on that level alone.
    `partition_key`: the level whose field Milvus hashes into `num_partitions` partitions
    (``""``: none). `index`, `vector_levels`, `partition_key` and `num_partitions` None mean:
    the target's default when creating, whatever is stored when opening.
    Distances are Milvus's: squared Euclidean for L2.
    """

    level_names: tuple[str, ...]
    dim: int
    level_dims: tuple[int, ...] = ()
    metric: str = "L2"
    index: str | None = None
    layout: int = LAYOUT
    vector_levels: tuple[str, ...] | None = None
    partition_key: str | None = None
    num_partitions: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "level_names", tuple(self.level_names))
        object.__setattr__(self, "level_dims", tuple(int(d) for d in self.level_dims))
        if not self.level_names:
            raise StoreError("a collection needs at least one category level")
        for name in self.level_names:
            problem = level_name_problem(name)
            if problem:
                raise StoreError(problem)
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
        if self.vector_levels is not None:
            object.__setattr__(self, "vector_levels", tuple(self.vector_levels))
            unknown = [n for n in self.vector_levels if n not in self.level_names]
            if unknown or len(set(self.vector_levels)) != len(self.vector_levels):
                raise StoreError(f"vector_levels must be distinct levels of {self.level_names}, got {self.vector_levels}")
            if self.vector_levels and not self.level_dims:
                raise StoreError(f"vector_levels {self.vector_levels}: a flat model has no level vectors to keep")
            # Coarsest first, whatever order they were named in: one layout has one spelling.
            object.__setattr__(self, "vector_levels", tuple(n for n in self.level_names if n in self.vector_levels))
        if self.partition_key not in (None, "") and self.partition_key not in self.level_names:
            raise StoreError(f"partition_key must be one of the levels {self.level_names} (or '' for none), "
                             f"got {self.partition_key!r}")
        if self.num_partitions is not None and (isinstance(self.num_partitions, bool)
                                                or not isinstance(self.num_partitions, int)
                                                or not 1 <= self.num_partitions <= 1024):
            raise StoreError(f"num_partitions must be an integer in [1, 1024], got {self.num_partitions!r}")

    @property
    def kept_vector_levels(self) -> tuple[str, ...]:
        """The levels with a vector field of their own."""
        if not self.level_dims:
            return ()
        return self.level_names if self.vector_levels is None else self.vector_levels

    @property
    def fields(self) -> FieldNames:
        return field_names(self.level_names, level_vectors=self.kept_vector_levels,
                           partition_key=self.partition_key)

    @property
    def vector_field_count(self) -> int:
        return 1 + len(self.kept_vector_levels)

    def level_dim(self, level: str) -> int:
        return self.level_dims[self.level_names.index(level)]

    @property
    def depth(self) -> int:
        return len(self.level_names)

    def vector_dims(self) -> dict[str, int]:
        """Vector field -> size."""
        fields = self.fields
        dims = {fields.vector: self.dim}
        dims.update({field: self.level_dim(name) for name, field in fields.level_vectors.items()})
        return dims

    def with_index(self, index: str) -> CollectionSpec:
        return replace(self, index=index)

    def resolved(self, *, index: str, partition_key: str) -> CollectionSpec:
        """This spec with every choice left to the target made: what a new collection records."""
        key = self.partition_key if self.partition_key is not None else partition_key
        return replace(self, index=self.index or index, vector_levels=self.kept_vector_levels, partition_key=key,
                       num_partitions=(self.num_partitions or DEFAULT_NUM_PARTITIONS) if key else None)

    def to_json(self) -> str:
        data = asdict(self)
        data["level_names"], data["level_dims"] = list(self.level_names), list(self.level_dims)
        if self.vector_levels is not None:
            data["vector_levels"] = list(self.vector_levels)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CollectionSpec:
        """A recorded spec; collections recorded before layouts were chosen kept every level's vector
        and had no partition key."""
        data = json.loads(text)
        levels = tuple(data["level_names"])
        return cls(levels, data["dim"], tuple(data["level_dims"]), data["metric"], data["index"],
                   data.get("layout", 1),
                   vector_levels=data.get("vector_levels"),
                   partition_key=data.get("partition_key", ""), num_partitions=data.get("num_partitions"))


def check_index(index: str, *, lite: bool) -> None:
    offered = LITE_INDEXES if lite else SERVER_INDEXES
    if index not in offered:
        target = "Milvus Lite" if lite else "a Milvus server"
        hint = " (Lite accepts it but fails when loading it; use a Milvus server)" if lite and index in SERVER_INDEXES else ""
        raise UnsupportedIndexError(f"index {index!r} is not offered on {target}{hint}; choose one of {offered}")


def index_build_params(index: str, dim: int) -> dict:
    """The build parameters hiervec gives `index` on a `dim`-wide field (FLAT and DISKANN take none)."""
    if index == "HNSW":
        return {"M": 16, "efConstruction": 200}
    if index in ("IVF_FLAT", "IVF_SQ8"):
        return {"nlist": IVF_NLIST}
    if index == "IVF_PQ":
        m = max(d for d in range(1, max(1, dim // 4) + 1) if dim % d == 0)
        return {"nlist": IVF_NLIST, "m": m, "nbits": 8}
    if index in ("FLAT", "DISKANN"):
        return {}
    raise UnsupportedIndexError(f"index must be one of {SERVER_INDEXES}, got {index!r}")


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
