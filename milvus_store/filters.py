"""Hierarchy filters built from structured input, never from pasted user strings.

>>> f = (under("clothing/tops") & ~Eq("item", "clothing/tops/coat")) & Meta("colour", "==", "red")
>>> fields = field_names(("department", "category", "item"))
>>> render(f, fields, templates=True)
('((category == {p0} and not (item == {p1})) and meta["colour"] == {p2})', {'p0': 'clothing/tops', 'p1': 'clothing/tops/coat', 'p2': 'red'})
>>> render(f, fields, templates=False)[0]
'((category == "clothing/tops" and not (item == "clothing/tops/coat")) and meta["colour"] == "red")'

Level fields hold the category's path from the root, so a subtree is one equality on
one field. Values travel as templated ``filter_params`` on Milvus servers; Milvus Lite
has no templates, so there every value goes through `quote_literal`, the one quoting
function.

With a partition key (`FieldNames.partition_key`), Milvus prunes partitions only for
``==``/``in`` on the key field itself. A category path implies its ancestors, so every
condition on a deeper level also states the ancestor it implies on the key's level: the
rows it matches are the same, and Milvus searches one partition instead of all.

>>> keyed = field_names(("department", "category", "item"), partition_key="department")
>>> render(under("clothing/tops") | In("item", ("shoes/boots/ankle", "clothing/tops/shirt")), keyed, templates=False)[0]
'((department == "clothing" and category == "clothing/tops") or (department in ["clothing", "shoes"] and item in ["shoes/boots/ankle", "clothing/tops/shirt"]))'
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from .errors import FilterError, UnknownLevelError
from .spec import SEPARATOR, FieldNames, field_names  # noqa: F401  (field_names: doctest)

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
META_OPERATORS = ("==", "!=", "<", "<=", ">", ">=", "in")


def quote_literal(value) -> str:
    """A Milvus expression literal for a str, int, float, bool or a list of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise FilterError(f"filter values must be finite numbers, got {value!r}")
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(_ESCAPES.get(ch, ch) for ch in value) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(quote_literal(v) for v in value) + "]"
    raise FilterError(f"filter values must be strings, numbers, booleans or lists of them, got {value!r}")


class _Values:
    """Collects values: placeholders plus params (templates), or quoted literals."""

    def __init__(self, templates: bool):
        self.templates = templates
        self.params: dict[str, object] = {}

    def add(self, value) -> str:
        quoted = quote_literal(value)  # validates the type either way
        if not self.templates:
            return quoted
        name = f"p{len(self.params)}"
        self.params[name] = list(value) if isinstance(value, tuple) else value
        return "{" + name + "}"


class Filter:
    """A node of a filter tree; combine with ``&``, ``|`` and ``~``."""

    def __and__(self, other: Filter) -> Filter:
        return And((self, other))

    def __or__(self, other: Filter) -> Filter:
        return Or((self, other))

    def __invert__(self) -> Filter:
        return Not(self)

    def _render(self, fields: FieldNames, values: _Values) -> str:
        raise NotImplementedError


def _level_field(fields: FieldNames, level: str) -> str:
    if level not in fields.levels:
        raise UnknownLevelError(f"unknown level {level!r} in filter; levels are {', '.join(fields.levels)}")
    return fields.levels[level]


def _keyed(fields: FieldNames, level: str, paths: Sequence[str], condition: str, values: _Values) -> str:
    """`condition` on `level`, with the partition key's implied value(s) in front when `level` is deeper."""
    key = fields.partition_key
    levels = list(fields.levels)
    if not key or levels.index(level) <= levels.index(key):
        return condition
    depth = levels.index(key) + 1
    ancestors = list(dict.fromkeys(SEPARATOR.join(path.split(SEPARATOR)[:depth]) for path in paths))
    implied = (f"{fields.levels[key]} == {values.add(ancestors[0])}" if len(ancestors) == 1
               else f"{fields.levels[key]} in {values.add(sorted(ancestors))}")
    return f"({implied} and {condition})"


def _category(value, level: str) -> str:
    if not isinstance(value, str) or not value:
        raise FilterError(f"a category at level {level!r} must be a non-empty path string, got {value!r}")
    return value


@dataclass(frozen=True)
class Eq(Filter):
    """The category at `level` is `value` (a path from the root, e.g. ``clothing/tops``)."""

    level: str
    value: str

    def _render(self, fields, values):
        field = _level_field(fields, self.level)
        value = _category(self.value, self.level)
        return _keyed(fields, self.level, [value], f"{field} == {values.add(value)}", values)


@dataclass(frozen=True)
class In(Filter):
    """The category at `level` is one of `values`."""

    level: str
    values: tuple[str, ...]

    def _render(self, fields, values):
        items = [_category(v, self.level) for v in self.values]
        if not items:
            raise FilterError(f"'in' filter at level {self.level!r} needs at least one value")
        field = _level_field(fields, self.level)
        return _keyed(fields, self.level, items, f"{field} in {values.add(list(items))}", values)


@dataclass(frozen=True)
class Under(Filter):
    """Inside the subtree of a category path prefix (``clothing/tops``): equality at its level."""

    path: str

    def _render(self, fields, values):
        names = self.path.split(SEPARATOR) if isinstance(self.path, str) else []
        if not names or any(not n.strip() for n in names):
            raise FilterError(f"subtree path {self.path!r} must be names separated by {SEPARATOR!r}")
        levels = list(fields.levels)
        if len(names) > len(levels):
            raise FilterError(f"subtree path {self.path!r} has {len(names)} names but there are {len(levels)} levels")
        return Eq(levels[len(names) - 1], self.path)._render(fields, values)


@dataclass(frozen=True)
class Predicted(Filter):
    """Records whose category path was predicted (``Predicted(True)``) or given (``Predicted(False)``)."""

    value: bool = True

    def _render(self, fields, values):
        if not isinstance(self.value, bool):
            raise FilterError(f"Predicted takes True or False, got {self.value!r}")
        return f"{fields.predicted} == {'true' if self.value else 'false'}"


@dataclass(frozen=True)
class Confident(Filter):
    """Records whose category at `level` has at least probability `minimum` (given paths have 1)."""

    level: str
    minimum: float

    def _render(self, fields, values):
        _level_field(fields, self.level)  # names an unknown level like every level filter
        if isinstance(self.minimum, bool) or not isinstance(self.minimum, (int, float)) or not 0 <= self.minimum <= 1:
            raise FilterError(f"a minimum confidence must be a number in [0, 1], got {self.minimum!r}")
        return f"{fields.confidence[self.level]} >= {float(self.minimum)!r}"


@dataclass(frozen=True)
class Ids(Filter):
    """The record's id is one of `values`; ``~Ids((query_id,))`` leaves a stored query out of its own hits."""

    values: tuple[str, ...]

    def _render(self, fields, values):
        if not self.values or not all(isinstance(v, str) and v for v in self.values):
            raise FilterError(f"an id filter needs one or more non-empty id strings, got {self.values!r}")
        return f"{fields.id} in {values.add(list(self.values))}"


@dataclass(frozen=True)
class Meta(Filter):
    """A condition on a key of the ``meta`` JSON field: ``Meta("price", "<", 20)``."""

    key: str
    op: str
    value: object

    def _render(self, fields, values):
        if self.op not in META_OPERATORS:
            raise FilterError(f"meta operator must be one of {META_OPERATORS}, got {self.op!r}")
        if not isinstance(self.key, str) or not self.key:
            raise FilterError(f"meta key must be a non-empty string, got {self.key!r}")
        # Keys cannot be templated; they go through the same quoting function.
        key = f"{fields.meta}[{quote_literal(self.key)}]"
        if self.op == "in":
            if not isinstance(self.value, (list, tuple)) or not self.value:
                raise FilterError(f"meta 'in' needs a non-empty list of values, got {self.value!r}")
            # Milvus takes `in` on fields only, not on JSON keys: spell it as equalities.
            return "(" + " or ".join(f"{key} == {values.add(v)}" for v in self.value) + ")"
        return f"{key} {self.op} {values.add(self.value)}"


@dataclass(frozen=True)
class Not(Filter):
    part: Filter

    def _render(self, fields, values):
        return f"not ({self.part._render(fields, values)})"


@dataclass(frozen=True)
class And(Filter):
    parts: tuple[Filter, ...]

    def _render(self, fields, values):
        return "(" + " and ".join(p._render(fields, values) for p in self.parts) + ")"


@dataclass(frozen=True)
class Or(Filter):
    parts: tuple[Filter, ...]

    def _render(self, fields, values):
        return "(" + " or ".join(p._render(fields, values) for p in self.parts) + ")"


def under(path: str) -> Filter:
    return Under(path)


WhereInput = Filter | Mapping[str, str | Sequence[str]] | None


def as_filter(where: WhereInput) -> Filter | None:
    """A `Filter` from a Filter, None, or a mapping ``{level: path | [paths]}`` (all must hold)."""
    if where is None or isinstance(where, Filter):
        return where
    if not isinstance(where, Mapping):
        raise FilterError(f"where must be a Filter or a mapping of level to category, got {type(where).__name__}")
    parts: list[Filter] = []
    for level, value in where.items():
        parts.append(Eq(level, value) if isinstance(value, str) else In(level, tuple(value)))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else And(tuple(parts))


def both(first: WhereInput, second: WhereInput) -> Filter | None:
    """Both conditions (either may be None, a Filter or a mapping)."""
    first, second = as_filter(first), as_filter(second)
    if first is None or second is None:
        return first if second is None else second
    return first & second


def render(where: WhereInput, fields: FieldNames, *, templates: bool) -> tuple[str, dict]:
    """``(expression, filter_params)``; with ``templates=False`` params is empty and values are literals."""
    node = as_filter(where)
    if node is None:
        return "", {}
    values = _Values(templates)
    return node._render(fields, values), values.params


def resolve_category(level: str, value: str, known: Collection[str]) -> str:
    """`value` as a known category path at `level`: a path from the root, or a name unique at that level."""
    if value in known:
        return value
    if SEPARATOR not in value:
        matches = sorted(path for path in known if path.rsplit(SEPARATOR, 1)[-1] == value)
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise FilterError(f"category {value!r} is ambiguous at level {level!r}: it could be {', '.join(matches)}")
    sample = ", ".join(sorted(known)[:8]) + (", ..." if len(known) > 8 else "")
    raise FilterError(f"unknown category {value!r} at level {level!r}; known: {sample or 'none'}")


def category_filter(
    where: Sequence[tuple[str, str]], under_path: str | None, known: Mapping[str, Collection[str]]
) -> Filter | None:
    """One filter from ``(level, category)`` pairs and a subtree path, checked against `known`.

    `known` maps each level, coarsest first, to its category paths. Several pairs on one
    level mean any of them; different levels and the subtree must all hold.

    >>> known = {"gender": {"men", "women"}, "kind": {"women/dresses", "men/shirts"}}
    >>> category_filter([("kind", "dresses")], "women", known)
    And(parts=(Eq(level='kind', value='women/dresses'), Under(path='women')))
    """
    by_level: dict[str, list[str]] = {}
    for level, value in where:
        if level not in known:
            raise UnknownLevelError(f"unknown level {level!r} in where; levels are {', '.join(known)}")
        by_level.setdefault(level, []).append(resolve_category(level, value, known[level]))
    parts: list[Filter] = [Eq(level, values[0]) if len(values) == 1 else In(level, tuple(values))
                           for level, values in by_level.items()]
    if under_path is not None:
        path = under_path.strip(SEPARATOR)
        levels = list(known)
        depth = path.count(SEPARATOR) + 1
        if not path or depth > len(levels):
            raise FilterError(f"under {under_path!r} is not a category path of at most {len(levels)} levels")
        if path not in known[levels[depth - 1]]:
            raise FilterError(f"unknown category {path!r} for under (level {levels[depth - 1]!r})")
        parts.append(Under(path))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else And(tuple(parts))
