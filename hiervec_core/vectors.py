"""`LevelVectors`: the vectors of n images, per level and concatenated, as numpy float32.

One type from the model to the store and back: `embedder.Embedder.embed` returns it,
`milvus_store.HierStore.embeddings` reads it back from a collection (with the ids of its
rows), and the service hands one image's vectors (a batch of one) between its stages.

>>> import numpy as np
>>> v = LevelVectors({"dept": np.ones((3, 2)), "item": np.zeros((3, 4))}, np.ones((3, 6)))
>>> len(v), v.query("item").shape, v.dims
(3, (3, 4), {'dept': 2, 'item': 4})
>>> [len(one) for one in v.split()], len(LevelVectors.stack(v.split()))
([1, 1, 1], 3)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


class VectorShapeError(ValueError):
    """Vectors whose shapes do not form one batch (rows, dimensions), or a level they lack."""


@dataclass(frozen=True, eq=False)
class LevelVectors:
    """`levels` ``{level: (n, d_i)}`` (empty for a flat model, which has only the image vector),
    `concat` ``(n, D)``, and for vectors read from a store the `ids` of their rows."""

    levels: Mapping[str, np.ndarray]
    concat: np.ndarray
    ids: tuple[str, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        concat = np.asarray(self.concat, dtype=np.float32)
        if concat.ndim != 2:
            raise VectorShapeError(f"concat must be (n, D), got shape {concat.shape}")
        levels = {}
        for name, value in self.levels.items():
            array = np.asarray(value, dtype=np.float32)
            if array.ndim != 2 or len(array) != len(concat):
                raise VectorShapeError(f"level {name!r} must be ({len(concat)}, d), got shape {array.shape}")
            levels[name] = array
        if self.ids is not None and len(self.ids) != len(concat):
            raise VectorShapeError(f"{len(self.ids)} ids for {len(concat)} rows")
        object.__setattr__(self, "concat", concat)
        object.__setattr__(self, "levels", levels)
        if self.ids is not None:
            object.__setattr__(self, "ids", tuple(self.ids))

    def __len__(self) -> int:
        return len(self.concat)

    @property
    def dims(self) -> dict[str, int]:
        return {name: v.shape[1] for name, v in self.levels.items()}

    def query(self, level: str | None = None) -> np.ndarray:
        """The vectors a search compares: the image vectors, or one level's."""
        if level is None:
            return self.concat
        if level not in self.levels:
            raise VectorShapeError(f"no vectors for level {level!r}; levels with vectors: "
                                   f"{', '.join(self.levels) or 'none (a flat model)'}")
        return self.levels[level]

    def rows(self, rows: Sequence[int] | slice) -> LevelVectors:
        """These rows, in this order."""
        index = rows if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        ids = None if self.ids is None else tuple(np.asarray(self.ids, dtype=object)[index])
        return LevelVectors({n: v[index] for n, v in self.levels.items()}, self.concat[index], ids)

    def split(self) -> list[LevelVectors]:
        """One batch of one per row."""
        return [self.rows(slice(row, row + 1)) for row in range(len(self))]

    @classmethod
    def stack(cls, parts: Iterable[LevelVectors]) -> LevelVectors:
        """The rows of every part, in order (parts of one model: the same levels and dims)."""
        parts = list(parts)
        if not parts:
            raise VectorShapeError("nothing to stack")
        names = list(parts[0].levels)
        if any(list(p.levels) != names for p in parts):
            raise VectorShapeError("parts with different levels cannot be stacked")
        ids = None if any(p.ids is None for p in parts) else tuple(i for p in parts for i in p.ids)
        return cls({n: np.concatenate([p.levels[n] for p in parts]) for n in names},
                   np.concatenate([p.concat for p in parts]), ids)


def levels_from_concat(concat: np.ndarray, dims: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Each level's unit vector read back from image vectors ``(n, Σd)`` (levels in `dims`' order).

    The image vector concatenates positive multiples of the unit level vectors (the level
    weights over their norm), so each slice, scaled back to unit length, is its level's
    vector: a collection that stores only image vectors still has every level's vector.

    >>> levels_from_concat(np.array([[0.6, 0.0, 0.0, 0.8]]), {"dept": 2, "item": 2})
    {'dept': array([[1., 0.]], dtype=float32), 'item': array([[0., 1.]], dtype=float32)}
    """
    concat = np.asarray(concat, dtype=np.float32)
    if concat.ndim != 2 or concat.shape[1] != sum(dims.values()):
        raise VectorShapeError(f"image vectors of shape (n, {sum(dims.values())}) hold levels {dict(dims)}, "
                               f"got shape {concat.shape}")
    levels, start = {}, 0
    for name, dim in dims.items():
        part = concat[:, start : start + dim]
        norms = np.linalg.norm(part, axis=1, keepdims=True)
        levels[name] = np.divide(part, norms, out=np.zeros_like(part), where=norms > 0)
        start += dim
    return levels
