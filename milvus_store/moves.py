"""Move or rename a category in place: every image under it keeps its vectors and takes the new path.

    >>> with HierStore("catalogue.db", "images", create=False) as store:          # doctest: +SKIP
    ...     move_category(store, "clothing/tops", "clothing/upper-body").moved
    1200

Each stored level field holds the category's path from the root, so a move rewrites the
moved level and every level below it (``clothing/tops/shirt`` becomes
``clothing/upper-body/shirt``), and the levels above when the new parent differs
(``clothing/tops`` to ``sale/tops`` changes the department too). Rows are read under the old
path in batches and upserted with the new one, vectors, predictions, confidences and meta as
they were; no image is embedded again.

Refused, with nothing written: paths of different depths (the number of levels would
change), an old path with nothing under it, and a new path that already holds images
unless `merge` is given. The move is recorded in the collection while it runs, so a move
that was interrupted is completed by running it again (its own rows at the new path are
not a collision).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .errors import FilterError, StoreError
from .filters import Eq
from .records import RecordError, category_levels
from .spec import CATEGORY_MAX_LENGTH, PROPERTY_MOVE, SEPARATOR
from .store import STRONG, HierStore

MOVE_BATCH = 512


@dataclass
class MoveReport:
    source: str
    target: str
    level: str  # the level both paths name
    moved: int  # rows rewritten by this run
    already_there: int  # rows at `target` when this run began (0 unless merging; a resumed move counts its own)
    resumed: bool  # this run completed an interrupted move
    count: int  # rows in the collection afterwards (a move never changes it)

    def to_dict(self) -> dict:
        return asdict(self)


def _levels(path: str, store: HierStore, what: str) -> list[str]:
    if not isinstance(path, str) or not path:
        raise FilterError(f"{what} must be a category path such as clothing/tops, got {path!r}")
    names = path.split(SEPARATOR)
    depth = len(names)
    if depth > store.spec.depth:
        raise FilterError(f"{what} {path!r} has {depth} levels; the collection has {store.spec.depth} "
                          f"({', '.join(store.spec.level_names)})")
    try:
        return category_levels(names, depth)
    except RecordError as exc:
        raise FilterError(f"{what}: {exc}") from None


def move_category(store: HierStore, source: str, target: str, *, merge: bool = False,
                  batch_size: int = MOVE_BATCH, progress: Callable[[int], None] | None = None) -> MoveReport:
    """Rewrite the category of every image under `source` to `target` (same depth), in place."""
    old, new = _levels(source, store, "the path to move"), _levels(target, store, "the new path")
    if len(old) != len(new):
        raise FilterError(f"{source!r} has {len(old)} levels and {target!r} {len(new)}: a move keeps the number "
                          f"of levels (nothing was changed)")
    if source == target:
        raise FilterError(f"{source!r} is already there (nothing was changed)")
    if not 1 <= batch_size <= 16_384:
        raise FilterError(f"batch_size must be in [1, 16384], got {batch_size}")
    level = store.spec.level_names[len(old) - 1]
    fields = store.spec.fields
    before = store.count()
    recorded = _recorded_move(store)
    resumed = recorded == {"from": source, "to": target}
    if recorded and not resumed:
        raise StoreError(f"another move ({recorded['from']!r} -> {recorded['to']!r}) was interrupted in "
                         f"{store.collection!r}: run it again to complete it first (nothing was changed)")
    remaining = store.count(Eq(level, source))
    if remaining == 0 and not resumed:
        raise FilterError(f"nothing is stored under {source!r} at level {level!r} (nothing was changed)")
    already = store.count(Eq(level, target))
    if already and not merge and not resumed:
        raise StoreError(f"{target!r} already holds {already} images: pass merge=True to put those of "
                         f"{source!r} with them (nothing was changed)")
    longest = max((len(v) for v in store.category_counts(store.spec.level_names[-1], where=Eq(level, source))),
                  default=0)
    if longest - len(source) + len(target) > CATEGORY_MAX_LENGTH:
        raise FilterError(f"moved paths would be longer than {CATEGORY_MAX_LENGTH} characters (nothing was changed)")

    _record_move(store, {"from": source, "to": target})
    level_fields = list(fields.levels.values())
    depth = len(old)
    names = [fields.id, *fields.scalars, *store.spec.vector_dims()]
    expr, params = store._filter(Eq(level, source))
    moved, bound = 0, remaining + batch_size  # a pass that never empties the old path is a bug: stop
    while True:
        with store._calls("move: read"):
            rows = store._client.query(store.collection, filter=expr, output_fields=names, limit=batch_size,
                                       timeout=store.timeout, **store._params(params), **STRONG)
        if not rows:
            break
        for row in rows:
            for i, field in enumerate(level_fields):
                value = row[field]
                row[field] = new[i] if i < depth else target + value[len(source):]
        store.upsert_rows([{name: row[name] for name in names} for row in rows], batch_size=batch_size)
        moved += len(rows)
        if progress is not None:
            progress(len(rows))
        if moved > bound:
            raise StoreError(f"move {source!r} -> {target!r}: rows stay under {source!r} after {moved} rewrites; "
                             f"run it again to complete it")
    after = store.count()
    if after != before:
        raise StoreError(f"move {source!r} -> {target!r}: the collection held {before} rows and now {after}; "
                         f"run it again (the move is recorded as unfinished)")
    _record_move(store, None)
    return MoveReport(source, target, level, moved, already, resumed, after)


def _recorded_move(store: HierStore) -> dict | None:
    with store._calls("describe collection"):
        properties = store._client.describe_collection(store.collection, timeout=store.timeout).get("properties", {})
    value = properties.get(PROPERTY_MOVE) or ""
    try:
        return json.loads(value) if value else None
    except ValueError:
        return None


def _record_move(store: HierStore, move: dict | None) -> None:
    with store._calls("record the move"):
        store._client.alter_collection_properties(store.collection, properties={
            PROPERTY_MOVE: json.dumps(move) if move else ""}, timeout=store.timeout)
