"""`--where LEVEL=VALUE` and `--under PATH` into a store filter, checked against known categories.

A VALUE is a category path from the root (``clothing/tops``) or, where it is unique at
that level, a bare name (``tops``). Several `--where` on one level mean any of them.
The checking itself is `milvus_store.category_filter`, shared with the HTTP service.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

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
