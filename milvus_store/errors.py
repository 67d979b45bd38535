"""The store's exception tree: catch `StoreError` to handle any of them."""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error raised by `milvus_store`."""


class StoreConnectionError(StoreError, ConnectionError):
    """Milvus cannot be reached (or a Lite file cannot be opened); the URI is named, secrets never."""


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
