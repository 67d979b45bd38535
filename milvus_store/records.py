"""What goes into a collection (`Record`) and what comes back (`Hit`), and record validation."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, unquote_to_bytes

import numpy as np

from hiervec_core.files import is_url

from .errors import RecordError
from .spec import (CATEGORY_MAX_LENGTH, ID_MAX_LENGTH, META_MAX_BYTES, META_MAX_DEPTH, SEPARATOR, URI_MAX_LENGTH,
                   CollectionSpec)


def printable(text: str) -> str:
    """`text` with undecodable file-name bytes (lone surrogates) shown as ``\\xNN``, and any other lone
    surrogate as ``\\udNNN``: safe to print and store."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte (from JSON's \\ud800, say)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def path_uri(path: str | os.PathLike) -> str:
    """The absolute path as stored in ``uri``; a path that is not valid UTF-8 becomes a lossless file:// URL;
    a URL (``s3://...``) is stored as it is."""
    if is_url(path):
        return path
    absolute = os.path.abspath(os.fspath(path))
    try:
        absolute.encode("utf-8")
        return absolute
    except UnicodeEncodeError:
        return "file://" + quote(os.fsencode(absolute))


def uri_path(uri: str) -> str | None:
    """The local file a stored ``uri`` names (a path or a file:// URL), or None for other URLs."""
    if uri.startswith("file://"):
        return os.fsdecode(unquote_to_bytes(uri[len("file://"):]))
    return None if "://" in uri else uri


def content_id(data: bytes) -> str:
    """The id of an image without a caller id: SHA-256 of its bytes, so a re-ingest is an upsert."""
    return hashlib.sha256(data).hexdigest()


@dataclass
class Record:
    """One image: its leaf category path, its vectors, and where it lives.

    `id` is the caller's; without one, `content` (the image bytes) gives `content_id`.
    `level_vectors` maps each level name to that level's vector (omit for a flat model).
    """

    category: str | Sequence[str]
    vector: Sequence[float] | np.ndarray
    level_vectors: Mapping[str, Sequence[float] | np.ndarray] = field(default_factory=dict)
    id: str | None = None
    uri: str = ""
    meta: Mapping = field(default_factory=dict)
    content: bytes | None = field(default=None, repr=False)
    predicted: bool = False  # the category path was predicted by the model, not given
    confidence: Mapping[str, float] | None = None  # level -> probability of the path there (given paths: 1)

    def resolved_id(self) -> str | None:
        if self.id is not None:
            return str(self.id)
        return content_id(self.content) if self.content is not None else None


@dataclass(frozen=True)
class Hit:
    """A stored image returned by a search (with `distance`) or a query (distance None)."""

    id: str
    distance: float | None
    uri: str
    categories: dict[str, str]  # level name -> category path at that level
    meta: dict
    predicted: bool = False
    confidence: dict[str, float] = field(default_factory=dict)  # level -> probability (1 for given paths)

    @property
    def category(self) -> str | None:
        """The leaf category path."""
        return next(reversed(self.categories.values()), None) if self.categories else None


def category_levels(category: str | Sequence[str], depth: int) -> list[str]:
    """Per-level category values of a leaf path: ``a/b/c`` -> ``[a, a/b, a/b/c]``."""
    names = category.split(SEPARATOR) if isinstance(category, str) else list(category)
    if len(names) != depth:
        raise RecordError(f"category path {category!r} has {len(names)} levels, expected {depth}")
    for name in names:
        if not isinstance(name, str) or not name.strip() or name != name.strip() or SEPARATOR in name:
            raise RecordError(f"category path {category!r} has an empty, padded or separator-bearing name {name!r}")
    return [SEPARATOR.join(names[: i + 1]) for i in range(depth)]


def _vector(value, dim: int, what: str) -> list[float]:
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:  # a caller's value, not a bug: numpy says why
        raise RecordError(f"{what} is not an array of numbers ({exc})") from None
    if array.shape != (dim,):
        raise RecordError(f"{what} has shape {array.shape}, expected ({dim},)")
    if not np.isfinite(array).all():
        raise RecordError(f"{what} holds NaN or infinite values")
    return array.tolist()


def validate_records(records: Sequence[Record], spec: CollectionSpec) -> tuple[list[dict], list[tuple[int, str]]]:
    """Milvus rows of the valid records, and ``(position, "record 'id': problem")`` for the others."""
    rows, problems, seen = [], [], {}
    for position, record in enumerate(records):
        rid = record.resolved_id() if isinstance(record, Record) else None
        label = f"record {rid!r}" if rid is not None else f"record #{position}"
        try:
            if rid in seen:
                raise RecordError(f"id repeats record #{seen[rid]} of the same batch")
            rows.append(_row(record, rid, spec))
            seen[rid] = position
        except RecordError as exc:
            problems.append((position, f"{label}: {exc}"))
    return rows, problems


def to_rows(records: Sequence[Record], spec: CollectionSpec) -> list[dict]:
    """Rows of `records`, all validated first; the first bad record raises `RecordError`."""
    rows, problems = validate_records(records, spec)
    if problems:
        raise RecordError(problems[0][1])
    return rows


def _row(record: Record, rid: str | None, spec: CollectionSpec) -> dict:
    fields = spec.fields
    if not isinstance(record, Record):
        raise RecordError(f"expected a Record, got {type(record).__name__}")
    if rid is None:
        raise RecordError("has neither an id nor content to hash")
    row = {fields.id: check_id(rid)}
    uri = _utf8(str(record.uri or ""), "uri")
    if len(uri) > URI_MAX_LENGTH:
        raise RecordError(f"uri is longer than {URI_MAX_LENGTH} characters")
    row[fields.uri] = uri
    levels = category_levels(record.category, spec.depth)
    _utf8(levels[-1], "category path")
    if len(levels[-1]) > CATEGORY_MAX_LENGTH:
        raise RecordError(f"category path is longer than {CATEGORY_MAX_LENGTH} characters")
    row.update(zip(fields.levels.values(), levels))
    row[fields.vector] = _vector(record.vector, spec.dim, "vector")
    given = dict(record.level_vectors or {})
    # The model's vectors of levels this layout does not keep are accepted and not stored: the
    # image vector holds them (`levels_from_concat`).
    unknown = sorted(set(given) - set(spec.level_names if spec.level_dims else ()))
    if unknown:
        raise RecordError(
            f"level vectors for unknown levels {unknown}; the collection has "
            f"{list(fields.level_vectors) or 'no per-level vectors'}"
        )
    missing = [name for name in fields.level_vectors if name not in given]
    if missing:
        raise RecordError(f"missing level vectors for {missing}")
    for name, vfield in fields.level_vectors.items():
        row[vfield] = _vector(given[name], spec.level_dim(name), f"level vector {name!r}")
    row[fields.meta] = _meta(record.meta)
    row[fields.predicted] = bool(record.predicted)
    confidence = dict(record.confidence or {})
    unknown = sorted(set(confidence) - set(fields.confidence))
    if unknown:
        raise RecordError(f"confidence for unknown levels {unknown}")
    for name, cfield in fields.confidence.items():
        try:
            value = float(confidence.get(name, 1.0))
        except (TypeError, ValueError):
            raise RecordError(f"confidence at {name!r} must be a number, got {confidence.get(name)!r}") from None
        if not 0.0 <= value <= 1.0:
            raise RecordError(f"confidence at {name!r} must be in [0, 1], got {value}")
        row[cfield] = value
    return row


def check_id(rid: str) -> str:
    """`rid` if Milvus can store it as an id (1 to `ID_MAX_LENGTH` characters of valid UTF-8), else a `RecordError`."""
    if not isinstance(rid, str):
        raise RecordError(f"id must be a string, got {type(rid).__name__}")
    if not rid or len(rid) > ID_MAX_LENGTH:
        raise RecordError(f"id must have 1 to {ID_MAX_LENGTH} characters, got {len(rid)}")
    return _utf8(rid, "id")


def _utf8(text: str, what: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RecordError(f"{what} {printable(text)!r} is not valid UTF-8 (a file name's raw bytes?)") from None
    return text


def _meta(meta) -> dict:
    if not isinstance(meta, Mapping):
        raise RecordError(f"meta must be a mapping, got {type(meta).__name__}")
    depth = json_depth(meta)
    if depth > META_MAX_DEPTH:
        raise RecordError(f"meta is nested more than {META_MAX_DEPTH} levels deep; at most {META_MAX_DEPTH} are stored")
    big = _integer_beyond_int64(meta)
    if big is not None:
        raise RecordError(f"meta holds an integer {big[1]} at {big[0]}, beyond the 64-bit integers Milvus's JSON "
                          f"stores (store it as a string)")
    try:
        text = json.dumps(dict(meta), allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise RecordError(f"meta is not JSON-serialisable: {exc}") from None
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise RecordError("meta holds text that is not valid Unicode (a lone surrogate)") from None
    if size > META_MAX_BYTES:
        raise RecordError(f"meta is {size} bytes as JSON; at most {META_MAX_BYTES} are stored")
    return json.loads(text)


INT64 = (-(2**63), 2**63 - 1)


def _integer_beyond_int64(meta: Mapping) -> tuple[str, int] | None:
    """(where, value) of the first integer in `meta` that a 64-bit signed integer cannot hold (Milvus's
    JSON cannot store it: the whole insert it is part of fails), or None. `meta`'s depth is bounded
    before this is called."""
    stack = [(meta, "meta")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, Mapping):
            stack.extend((child, f"{where}[{json.dumps(str(key), ensure_ascii=False)}]") for key, child in item.items())
        elif isinstance(item, (list, tuple)):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(item))
        elif isinstance(item, int) and not isinstance(item, bool) and not INT64[0] <= item <= INT64[1]:
            return where, str(item) if item.bit_length() <= 128 else f"of {item.bit_length()} bits"
    return None


def json_depth(value, limit: int = META_MAX_DEPTH) -> int:
    """How deeply objects and lists nest in `value` (a scalar is 0), counted without recursion and
    no further than ``limit + 1``: a hostile value cannot exhaust the stack or the time."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def hit_from_entity(entity: Mapping, spec: CollectionSpec, *, id_: str, distance: float | None) -> Hit:
    fields = spec.fields
    categories = {name: entity[f] for name, f in fields.levels.items() if f in entity}
    distance = None if distance is None or math.isnan(distance) else float(distance)
    confidence = {name: float(entity[f]) for name, f in fields.confidence.items() if f in entity}
    return Hit(str(id_), distance, entity.get(fields.uri, ""), categories, entity.get(fields.meta) or {},
               bool(entity.get(fields.predicted, False)), confidence)
