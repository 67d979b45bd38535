"""A category tree with a fixed number of levels, built from category paths.

A category is identified by its path from the root, so ``men/accessories`` and
``women/accessories`` are two categories of the second level. Level ``i`` of an image is
the prefix of its path with ``i + 1`` names; codes index each level's sorted vocabulary.

>>> h = Hierarchy.from_paths(["clothing/tops/t-shirt", "footwear/boots/ankle-boot"],
...                          level_names=("department", "category", "item"))
>>> h.encode("clothing/tops/t-shirt")
(0, 0, 0)
>>> h.decode((1, 1, 1))
'footwear/boots/ankle-boot'
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from hiervec_core.names import level_name_problem

from .errors import HierarchyError

SEPARATOR = "/"
MIN_LEVELS, MAX_LEVELS = 2, 5
_RESERVED_LEVEL_NAMES = frozenset(dir(nn.ModuleDict))  # `keys`, `items`, `train`, ...: not a part's name

PathLike = str | Sequence[str]


def split_path(path: PathLike) -> tuple[str, ...]:
    """Split a category path into names, rejecting empty, padded or separator-bearing names."""
    if isinstance(path, str):
        names = tuple(path.split(SEPARATOR))
    else:
        names = tuple(path)
        for name in names:
            if not isinstance(name, str):
                raise HierarchyError(f"category names must be strings, got {name!r} in {path!r}")
            if SEPARATOR in name:
                raise HierarchyError(
                    f"category name {name!r} in {path!r} contains the separator {SEPARATOR!r}"
                )
    for name in names:
        if not name.strip():
            raise HierarchyError(f"empty or whitespace-only category name in path {path!r}")
        if name != name.strip():
            raise HierarchyError(
                f"category name {name!r} in path {path!r} has leading or trailing whitespace"
            )
    return names


def join_path(names: Iterable[str]) -> str:
    return SEPARATOR.join(names)


@dataclass(frozen=True)
class Hierarchy:
    """Level names and, per level, the sorted category paths present at that level.

    Build it with `from_paths`; `parents[i][j]` is the code at level ``i - 1`` of the
    parent of category ``j`` at level ``i`` (``parents[0]`` is empty).
    """

    level_names: tuple[str, ...]
    vocabularies: tuple[tuple[str, ...], ...]
    parents: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)
    _index: tuple[dict[str, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        validate_level_names(self.level_names)
        if len(self.vocabularies) != len(self.level_names):
            raise HierarchyError(
                f"expected one vocabulary per level ({len(self.level_names)}), "
                f"got {len(self.vocabularies)}"
            )
        index = tuple({path: code for code, path in enumerate(vocab)} for vocab in self.vocabularies)
        parents: list[tuple[int, ...]] = [()]
        for level in range(1, self.depth):
            codes = []
            for path in self.vocabularies[level]:
                parent = join_path(split_path(path)[:-1])
                if parent not in index[level - 1]:
                    raise HierarchyError(f"category {path!r} has no parent {parent!r} at level {level - 1}")
                codes.append(index[level - 1][parent])
            parents.append(tuple(codes))
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "parents", tuple(parents))

    @classmethod
    def from_paths(
        cls,
        paths: Iterable[PathLike],
        level_names: Sequence[str] | None = None,
        *,
        pad: bool = False,
    ) -> Hierarchy:
        """Build the tree from leaf paths (duplicates are fine).

        Without `level_names` the depth is the longest path's and levels are named
        ``level1``, ``level2``, ... A path shorter than the depth is rejected unless
        `pad` is true, which repeats its leaf down to the full depth.
        """
        split = [(path, split_path(path)) for path in paths]
        if not split:
            raise HierarchyError("no category paths given")
        depth = len(level_names) if level_names is not None else max(len(names) for _, names in split)
        names_of_levels = tuple(level_names) if level_names is not None else tuple(
            f"level{i + 1}" for i in range(depth)
        )
        vocabularies: list[set[str]] = [set() for _ in range(depth)]
        for path, names in split:
            names = cls._fit_depth(path, names, depth, pad)
            for level in range(depth):
                vocabularies[level].add(join_path(names[: level + 1]))
        return cls(names_of_levels, tuple(tuple(sorted(v)) for v in vocabularies))

    @staticmethod
    def _fit_depth(path: PathLike, names: tuple[str, ...], depth: int, pad: bool) -> tuple[str, ...]:
        if len(names) > depth or (len(names) < depth and not pad):
            raise HierarchyError(
                f"category path {path!r} has {len(names)} levels, expected {depth}"
                + ("" if pad or len(names) > depth else " (pass pad=True to repeat its leaf)")
            )
        return names + (names[-1],) * (depth - len(names))

    # -- shape ---------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self.level_names)

    @property
    def num_classes(self) -> tuple[int, ...]:
        return tuple(len(vocab) for vocab in self.vocabularies)

    @property
    def leaves(self) -> tuple[str, ...]:
        return self.vocabularies[-1]

    def level_index(self, level: str | int) -> int:
        if isinstance(level, int) and not isinstance(level, bool):
            if not 0 <= level < self.depth:
                raise HierarchyError(f"level index must be in [0, {self.depth}), got {level}")
            return level
        if level not in self.level_names:
            raise HierarchyError(f"unknown level {level!r}; levels are {', '.join(self.level_names)}")
        return self.level_names.index(level)

    # -- codes ---------------------------------------------------------------------------
    def normalize(self, path: PathLike, *, pad: bool = False) -> str:
        """The full leaf path as a string, checked against the tree."""
        names = self._fit_depth(path, split_path(path), self.depth, pad)
        leaf = join_path(names)
        if leaf not in self._index[-1]:
            raise HierarchyError(f"unknown category {leaf!r}")
        return leaf

    def encode(self, path: PathLike, *, pad: bool = False) -> tuple[int, ...]:
        """Codes of every level of a leaf path, coarsest first."""
        names = split_path(self.normalize(path, pad=pad))
        return tuple(self._index[level][join_path(names[: level + 1])] for level in range(self.depth))

    def encode_many(self, paths: Iterable[PathLike], *, pad: bool = False) -> np.ndarray:
        """An ``(n, depth)`` int64 label array, one row per path."""
        rows = [self.encode(path, pad=pad) for path in paths]
        return np.asarray(rows, dtype=np.int64).reshape(len(rows), self.depth)

    def decode(self, codes: Sequence[int]) -> str:
        """The leaf path of a code tuple; the codes must agree with the tree."""
        if len(codes) != self.depth:
            raise HierarchyError(f"expected {self.depth} codes, got {len(codes)}: {tuple(codes)}")
        for level, code in enumerate(codes):
            if not 0 <= int(code) < len(self.vocabularies[level]):
                raise HierarchyError(f"code {code} out of range at level {self.level_names[level]!r}")
            if level and self.parents[level][int(code)] != int(codes[level - 1]):
                raise HierarchyError(f"codes {tuple(codes)} do not form a path of the tree")
        return self.vocabularies[-1][int(codes[-1])]

    def prefixes(self, path: PathLike) -> dict[str, str]:
        """The category of each level for a leaf path: ``{level_name: path prefix}``."""
        names = split_path(self.normalize(path))
        return {name: join_path(names[: i + 1]) for i, name in enumerate(self.level_names)}

    def level_of(self, prefix: PathLike) -> tuple[str, str]:
        """Which level a category path prefix lives on: ``("category", "clothing/tops")``."""
        names = split_path(prefix)
        if len(names) > self.depth:
            raise HierarchyError(f"category path {prefix!r} is deeper than the {self.depth} levels")
        level = len(names) - 1
        value = join_path(names)
        if value not in self._index[level]:
            raise HierarchyError(f"unknown category {value!r} at level {self.level_names[level]!r}")
        return self.level_names[level], value

    def ancestors(self) -> np.ndarray:
        """``(num_leaves, depth)`` codes of every leaf at every level."""
        codes = np.empty((len(self.leaves), self.depth), dtype=np.int64)
        codes[:, -1] = np.arange(len(self.leaves))
        for level in range(self.depth - 1, 0, -1):
            codes[:, level - 1] = np.asarray(self.parents[level], dtype=np.int64)[codes[:, level]]
        return codes

    # -- persistence ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"level_names": list(self.level_names), "vocabularies": [list(v) for v in self.vocabularies]}

    @classmethod
    def from_dict(cls, data: dict) -> Hierarchy:
        try:
            return cls(tuple(data["level_names"]), tuple(tuple(v) for v in data["vocabularies"]))
        except (KeyError, TypeError) as exc:
            raise HierarchyError(f"not a serialized Hierarchy: {exc!r}") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Hierarchy:
        return cls.from_dict(json.loads(text))


def validate_level_names(level_names: Sequence[str]) -> None:
    names = tuple(level_names)
    if not MIN_LEVELS <= len(names) <= MAX_LEVELS:
        raise HierarchyError(f"a hierarchy has {MIN_LEVELS} to {MAX_LEVELS} levels, got {len(names)}: {names}")
    for name in names:
        problem = level_name_problem(name)  # the store's and the filter language's rule, checked before training
        if problem:
            raise HierarchyError(problem)
    if len(set(names)) != len(names):
        raise HierarchyError(f"level names must be distinct, got {names}")
    taken = [name for name in names if name in _RESERVED_LEVEL_NAMES]
    if taken:
        raise HierarchyError(f"level name {taken[0]!r} is reserved (the model keys its per-level parts by level "
                             f"name, and {taken[0]!r} is a method of torch's ModuleDict); rename that level")
