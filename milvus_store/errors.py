"""The store's exception tree: catch `StoreError` to handle any of them."""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error raised by `milvus_store`."""


class StoreConnectionError(StoreError, ConnectionError):
    """Milvus cannot be reached (or a Lite file cannot be opened); the URI is named, secrets never."""


class StoreUnavailableError(StoreConnectionError):
    """Milvus did not answer a call: down, unreachable, not ready, or the call ran out of time. A fault
    of the server or the network, not of the request: the same call may succeed later."""


class CollectionNotFoundError(StoreError, LookupError):
    """The collection does not exist and no spec was given to create it."""


class SchemaMismatchError(StoreError):
    """The collection was created for another layout or model; nothing was written.

    `field`, `expected` (what the caller brings) and `actual` (what the collection holds)
    say which.
    """

    def __init__(self, collection: str, field: str, expected, actual):
        super().__init__(
            f"collection {collection!r} does not match: {field} is {actual!r} in the collection "
            f"but {expected!r} was given"
        )
        self.collection, self.field, self.expected, self.actual = collection, field, expected, actual


class UnsupportedIndexError(StoreError, ValueError):
    """An index type the target (Milvus Lite or a server) cannot serve; refused before creation."""


class RecordError(StoreError, ValueError):
    """A record that cannot be stored; the message names its id (or position) and the problem."""


class FilterError(StoreError, ValueError):
    """A filter naming an unknown level, an impossible path or a value of the wrong type."""


class QueryError(StoreError, ValueError):
    """A search or store call with an argument out of range (k, group size, batch size, vectors of the
    wrong shape, a stored id that is not there); the message names the argument and the value."""


class UnknownLevelError(FilterError):
    """A level name (for a level search, grouping, routing or weights) that the collection does not have."""


class RecordNotFoundError(StoreError, LookupError):
    """A stored id that a call needs (e.g. to search with its vectors) is not in the collection."""


class VectorFieldLimitError(StoreError):
    """The server takes fewer vector fields per collection than the layout needs; nothing was created.
    The message names the server setting and the layouts that fit."""


class LevelVectorMissingError(UnknownLevelError):
    """A search on a level whose vector this collection's layout does not keep (`--level-vectors`)."""
