"""`--where LEVEL=VALUE` and `--under PATH` into a store filter, checked against known categories.

A VALUE is a category path from the root (``clothing/tops``) or, where it is unique at
that level, a bare name (``tops``). Several `--where` on one level mean any of them.
The checking itself is `milvus_store.category_filter`, shared with the HTTP service.
Known categories are the collection's, with the model's where a model is loaded (as in
the HTTP service): a category ingested after training is as searchable as any.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

import click


def parse_pairs(pairs: Sequence[str], option: str = "--where") -> list[tuple[str, str]]:
    parsed = []
    for pair in pairs:
        level, sep, value = pair.partition("=")
        if not sep or not level.strip() or not value:
            raise click.BadParameter(f"expected LEVEL=VALUE, got {pair!r}", param_hint=option)
        parsed.append((level.strip(), value))
    return parsed


def build_filter(where: Sequence[str], under: str | None, known: Mapping[str, Collection[str]]):
    """A `milvus_store` filter, or None; `known` maps each level to its category paths."""
    from milvus_store import category_filter

    return category_filter(parse_pairs(where), under, known)


def known_categories(where: Sequence[str], under: str | None, model: Mapping[str, Collection[str]],
                     stored: Callable[[], Mapping[str, Collection[str]]]) -> Mapping[str, Collection[str]]:
    """The categories to check `where`/`under` against: the model's, and the collection's too
    unless full paths the model knows settle every value (`stored` reads every record, so it
    is called only when needed: for a bare name, which must be unique among both, or a
    category only the collection holds)."""
    pairs = parse_pairs(where)
    levels = list(model)
    path = (under or "").strip("/")
    under_known = under is None or (0 < path.count("/") + 1 <= len(levels)
                                    and path in model[levels[path.count("/")]])
    if under_known and all(level in model and value in model[level] for level, value in pairs):
        return model
    collection = stored()
    return {level: set(model[level]) | set(collection.get(level, ())) for level in levels}
