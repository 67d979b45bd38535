"""`--where LEVEL=VALUE` and `--under PATH` into a store filter, checked against known categories.

A VALUE is a category path from the root (``clothing/tops``) or, where it is unique at
that level, a bare name (``tops``). Several `--where` on one level mean any of them.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import click


def parse_pairs(pairs: Sequence[str]) -> list[tuple[str, str]]:
    parsed = []
    for pair in pairs:
        level, sep, value = pair.partition("=")
        if not sep or not level.strip() or not value:
            raise click.BadParameter(f"expected LEVEL=VALUE, got {pair!r}", param_hint="--where")
        parsed.append((level.strip(), value))
    return parsed


def resolve_category(level: str, value: str, known: Collection[str]) -> str:
    if value in known:
        return value
    if "/" not in value:
        matches = sorted(path for path in known if path.rsplit("/", 1)[-1] == value)
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise click.ClickException(
                f"category {value!r} is ambiguous at level {level!r}: it could be {', '.join(matches)}"
            )
    sample = ", ".join(sorted(known)[:8]) + (", ..." if len(known) > 8 else "")
    raise click.ClickException(f"unknown category {value!r} at level {level!r}; known: {sample or 'none'}")


def build_filter(
    where: Sequence[str], under: str | None, known: Mapping[str, Collection[str]]
):
    """A `milvus_store` filter, or None; `known` maps each level to its category paths."""
    from milvus_store import Eq, In, Under

    parts = []
    by_level: dict[str, list[str]] = {}
    for level, value in parse_pairs(where):
        if level not in known:
            raise click.ClickException(f"unknown level {level!r} in --where; levels are {', '.join(known)}")
        by_level.setdefault(level, []).append(resolve_category(level, value, known[level]))
    for level, values in by_level.items():
        parts.append(Eq(level, values[0]) if len(values) == 1 else In(level, tuple(values)))
    if under is not None:
        path = under.strip("/")
        depth = path.count("/") + 1
        levels = list(known)
        if depth > len(levels):
            raise click.ClickException(f"--under {under!r} is deeper than the {len(levels)} levels")
        level = levels[depth - 1]
        if path not in known[level]:
            raise click.ClickException(f"unknown category {path!r} for --under (level {level!r})")
        parts.append(Under(path))
    if not parts:
        return None
    combined = parts[0]
    for part in parts[1:]:
        combined = combined & part
    return combined
