"""`--where LEVEL=VALUE` and `--under PATH` into a store filter, checked against known categories.

A VALUE is a category path from the root (``clothing/tops``) or, where it is unique at
that level, a bare name (``tops``). Several `--where` on one level mean any of them.
The checking itself is `milvus_store.category_filter` (through `SearchRequest.to_filter` for
searches), shared with the HTTP service. Searches check against the model's categories and
the collection's (`ImageIndex.known_categories`): a category ingested after training is as
searchable as any.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import click


def parse_pairs(pairs: Sequence[str], option: str = "--where") -> list[tuple[str, str]]:
    from milvus_store import FilterError
    from hiervec_app.search import parse_where

    try:
        return list(parse_where(pairs))
    except FilterError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


def build_filter(where: Sequence[str], under: str | None, known: Mapping[str, Collection[str]]):
    """A `milvus_store` filter, or None; `known` maps each level to its category paths."""
    from milvus_store import category_filter

    return category_filter(parse_pairs(where), under, known)


def parse_weights(text: str | None, option: str = "--level-weights") -> tuple[tuple[str, float], ...]:
    from milvus_store import QueryError
    from hiervec_app.search import parse_level_weights

    try:
        return parse_level_weights(text)
    except QueryError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None
