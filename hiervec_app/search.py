"""`SearchRequest`: one search, built by every face (CLI, HTTP API, library) and consumed once.

A request says what to search with (query vectors, or the ids of stored images) and how:
k, a category filter (``where`` pairs and an ``under`` subtree, checked against the known
categories), one level's vector or a fusion of every level's (RRF or weighted), grouping,
which stored images qualify (predicted or given categories, label confidence) and
routing by the query's predicted category. `ImageIndex.search` runs it; the service's
micro-batcher uses it as its batching key (requests compare without their vectors).

>>> request = SearchRequest(k=5, where=(("item", "shirt"),), predicted="exclude")
>>> known = {"department": {"clothing"}, "category": {"clothing/tops"}, "item": {"clothing/tops/shirt"}}
>>> request.to_filter(known)
And(parts=(Eq(level='item', value='clothing/tops/shirt'), Predicted(value=False)))
>>> SearchRequest(k=5, level_weights={"category": 2, "item": 1}).fusion
'weighted'
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from hiervec_core.names import FUSIONS, MAX_TOPK, PREDICTED_CHOICES
from hiervec_core.vectors import LevelVectors

from milvus_store import FilterError, Hit, LevelVectorMissingError, QueryError, UnknownLevelError
from milvus_store.filters import Confident, Filter, Ids, Predicted, Under, both, category_filter
from milvus_store.spec import SEPARATOR


@dataclass(frozen=True)
class Route:
    """How one query was routed: its predicted path, and the subtree searched (None: everywhere)."""

    prediction: Any  # .path, .probabilities
    level: str
    min_confidence: float
    within: str | None  # the predicted category at `level` when confident enough

    @property
    def routed(self) -> bool:
        return self.within is not None

    def to_dict(self) -> dict:
        return {"level": self.level, "min_confidence": self.min_confidence, "routed": self.routed,
                "within": self.within, "predicted_path": self.prediction.path,
                "probabilities": dict(self.prediction.probabilities)}


@dataclass(frozen=True)
class SearchResult:
    """One query's hits, how it was routed (with `auto`), and the stored id it searched with."""

    hits: list[Hit]
    route: Route | None = None
    query_id: str | None = None


@dataclass(frozen=True)
class SearchRequest:
    """What to search with and how; see the module docstring. Invalid values raise `QueryError`
    here, before anything is searched; levels are checked against a collection by `check`."""

    k: int = 10
    level: str | None = None  # search this level's vector instead of the image vector
    where: tuple[tuple[str, str], ...] = ()  # (level, category path or a name unique at that level)
    under: str | None = None  # only inside this subtree
    filter: Filter | None = None  # any further structured filter (library callers)
    fusion: str | None = None  # "rrf" or "weighted": search every level's vector, fuse the rankings
    level_weights: tuple[tuple[str, float], ...] = ()  # weighted fusion: the levels searched and their weights
    group_by: str | None = None
    group_size: int = 1
    predicted: str = "include"  # stored images with a predicted category: include, exclude or only
    min_label_confidence: float | None = None  # stored images whose finest-level probability is at least this
    auto: str | None = None  # route each query to its predicted category at this level ...
    min_confidence: float = 0.5  # ... when the prediction's probability there is at least this
    ids: tuple[str, ...] = ()  # search with these stored images' vectors
    exclude_self: bool = True  # a stored query image is not its own hit
    vectors: LevelVectors | None = field(default=None, compare=False, repr=False)  # search with these

    def __post_init__(self) -> None:
        if isinstance(self.level_weights, Mapping):
            object.__setattr__(self, "level_weights", tuple(self.level_weights.items()))
        object.__setattr__(self, "where", tuple(tuple(pair) for pair in self.where))
        object.__setattr__(self, "ids", tuple(self.ids))
        if self.level_weights and self.fusion is None:
            object.__setattr__(self, "fusion", "weighted")
        if not isinstance(self.k, int) or not 1 <= self.k <= MAX_TOPK:
            raise QueryError(f"k must be in [1, {MAX_TOPK}], got {self.k!r}; use HierStore.search_iter for more hits")
        if self.group_size < 1:
            raise QueryError(f"group_size must be positive, got {self.group_size}")
        if self.group_by is not None and self.k * self.group_size > MAX_TOPK:  # Milvus gathers them at once
            raise QueryError(f"k x group_size must be at most {MAX_TOPK} hits, got {self.k} x {self.group_size} = "
                             f"{self.k * self.group_size}")
        if self.predicted not in PREDICTED_CHOICES:
            raise QueryError(f"predicted must be one of {', '.join(PREDICTED_CHOICES)}, got {self.predicted!r}")
        for name in ("min_confidence", "min_label_confidence"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise QueryError(f"{name} must be in [0, 1], got {value}")
        if self.fusion is not None and self.fusion not in FUSIONS:
            raise QueryError(f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if self.level_weights and self.fusion != "weighted":
            raise QueryError(f"level_weights are for weighted fusion, not {self.fusion!r}")
        for level, weight in self.level_weights:
            if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
                raise QueryError(f"the weight of level {level!r} must be a positive number, got {weight!r}")
        if self.fusion is not None and (self.level is not None or self.group_by is not None):
            raise QueryError("fusion searches every level's vector at once: it takes neither level nor group_by")
        if self.ids and self.vectors is not None:
            raise QueryError("search with stored ids or with query vectors, not both")

    # -- checks against a collection ---------------------------------------------------------
    def check(self, level_names: Sequence[str], *, vector_levels: Sequence[str]) -> None:
        """Every level this request names exists; level searches and fusion need those levels' own
        vectors (`vector_levels`: the levels whose vectors the collection keeps)."""
        names = ", ".join(level_names)
        named = [("level", self.level), ("group_by", self.group_by), ("auto", self.auto),
                 *(("level_weights", level) for level, _ in self.level_weights)]
        for argument, level in named:
            if level is not None and level not in level_names:
                raise UnknownLevelError(f"unknown level {level!r} for {argument}; levels are {names}")
        needed = [self.level] if self.level is not None else []
        if self.fusion is not None:
            needed = list(self.fused_levels(level_names))
        missing = [level for level in needed if level not in vector_levels]
        if missing:
            what = "fuse" if self.fusion else "search at"
            kept = ", ".join(vector_levels) or "none: it keeps only the image vector"
            raise LevelVectorMissingError(
                f"cannot {what} level {missing[0]!r}: the collection keeps no vector of that level's own (level "
                f"vectors kept: {kept}); search with the image vector (category filters still work), or use a "
                f"collection created with vector_levels including {missing[0]!r}")

    @property
    def needs_categories(self) -> bool:
        """Whether `to_filter` needs the known categories (to resolve `where` and `under`)."""
        return bool(self.where) or self.under is not None

    def fused_levels(self, level_names: Sequence[str]) -> tuple[str, ...]:
        """The levels a fused search searches: those weighted, else all of them."""
        return tuple(level for level, _ in self.level_weights) or tuple(level_names)

    # -- what to search -------------------------------------------------------------------------
    def to_filter(self, known: Mapping[str, Collection[str]] | None = None, *, query_id: str | None = None,
                  route: Route | None = None) -> Filter | None:
        """The filter of one query: categories (checked against `known`, level -> category paths,
        coarsest first), `filter`, the predicted/confidence conditions, the routed subtree, and
        the query's own stored id left out."""
        where = None
        if self.needs_categories:
            if known is None:
                raise QueryError("where/under need the known categories of each level to be checked against")
            where = category_filter(self.where, self.under, known)
        where = both(where, self.filter)
        where = both(where, {"exclude": Predicted(False), "only": Predicted(True)}.get(self.predicted))
        if self.min_label_confidence is not None:
            if not known:
                raise QueryError("min_label_confidence needs the level names (known categories)")
            where = both(where, Confident(list(known)[-1], self.min_label_confidence))
        if route is not None and route.within is not None:
            where = both(where, Under(route.within))
        if query_id is not None and self.exclude_self:
            where = both(where, ~Ids((query_id,)))  # so a grouped search still fills the query's own group
        return where

    def route(self, prediction) -> Route:
        """Where one query with this `prediction` (``.path``, ``.probabilities``) searches under `auto`."""
        if self.auto is None:
            raise QueryError("route needs auto: the level to route at")
        depth = prediction.path.count(SEPARATOR) + 1
        names = list(prediction.probabilities)
        position = names.index(self.auto) + 1 if self.auto in names else depth
        confident = prediction.probabilities.get(self.auto, 0.0) >= self.min_confidence
        within = SEPARATOR.join(prediction.path.split(SEPARATOR)[:position]) if confident else None
        return Route(prediction, self.auto, self.min_confidence, within)

    def with_vectors(self, vectors: LevelVectors) -> SearchRequest:
        return replace(self, vectors=vectors, ids=())

    def describe(self) -> dict:
        """The request's parameters as JSON-ready data (for responses and reports)."""
        return {"k": self.k, "level": self.level, "where": [f"{lv}={v}" for lv, v in self.where],
                "under": self.under, "fusion": self.fusion, "level_weights": dict(self.level_weights) or None,
                "group_by": self.group_by, "group_size": self.group_size, "predicted": self.predicted,
                "min_label_confidence": self.min_label_confidence, "auto": self.auto,
                "min_confidence": self.min_confidence if self.auto else None}


def parse_where(values: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``LEVEL=CATEGORY`` texts (as a CLI or a form gives them) as ``(level, category)`` pairs."""
    pairs = []
    for value in values:
        level, sep, category = value.partition("=")
        if not sep or not level.strip() or not category:
            raise FilterError(f"where must be LEVEL=CATEGORY, got {value!r}")
        pairs.append((level.strip(), category))
    return tuple(pairs)


def parse_level_weights(text: str | None) -> tuple[tuple[str, float], ...]:
    """``category=1,item=2`` as ``(("category", 1.0), ("item", 2.0))``; None or empty: no weights."""
    weights = []
    for part in (text or "").split(",") if text else ():
        level, sep, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = None
        if not sep or not level.strip() or weight is None:
            raise QueryError(f"level weights must be LEVEL=WEIGHT,..., got {part!r}")
        weights.append((level.strip(), weight))
    return tuple(weights)
