"""Aliases: the address of a catalogue that outlives its collections.

Every search, ingest and delete can go to an alias; Milvus resolves it on each call. A new
collection is built beside the live one (a new model: `hiervec reindex`), then the alias is
moved in one step (`set_alias`), and the old collection is kept for a rollback (`set_alias`
back). `HierStore` opens an alias like a collection (`HierStore.target` names the
collection behind it) and refuses to drop a collection an alias points at.

    >>> with Aliases("catalogue.db") as aliases:                      # doctest: +SKIP
    ...     aliases.set("shop", "images_v2")
    AliasChange(alias='shop', collection='images_v2', previous='images_v1')
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

from .connection import ConnectionSettings
from .errors import CollectionNotFoundError, StoreError
from .spec import PROPERTY_SPEC
from .store import MilvusConnection


SETTLE_S = 10.0


@dataclass(frozen=True)
class AliasChange:
    alias: str
    collection: str
    previous: str | None  # the collection it pointed at before; None when it is new

    def to_dict(self) -> dict:
        return asdict(self)


class Aliases(MilvusConnection):
    """The aliases of one Milvus deployment (a Lite file or a server)."""

    def __init__(self, uri: str | os.PathLike | None = None, *, token: str | None = None,
                 timeout: float | None = None):
        self._open_connection(ConnectionSettings.resolve(uri, token=token), timeout)

    def __enter__(self) -> Aliases:
        return self

    def collections(self) -> list[str]:
        with self._calls("list collections"):
            return sorted(self._client.list_collections(timeout=self.timeout))

    def all(self) -> dict[str, str]:
        """Every alias of the deployment and the collection it points at, by alias."""
        return self._aliases_of(self.collections())

    def _aliases_of(self, collections: list[str]) -> dict[str, str]:
        found = {}
        for collection in collections:
            with self._calls(f"list the aliases of {collection!r}"):
                listed = self._client.list_aliases(collection, timeout=self.timeout)
            for alias in listed.get("aliases", []) if isinstance(listed, dict) else listed:
                found[alias] = collection
        return dict(sorted(found.items()))

    def get(self, alias: str) -> str | None:
        """The collection `alias` points at; None when no alias has that name."""
        return self.all().get(alias)

    def set(self, alias: str, collection: str) -> AliasChange:
        """Point `alias` at `collection` (a hiervec collection of this deployment), creating the
        alias or moving it in one step, once the collection is loaded. Refused, with nothing
        changed, when `alias` is the name of a collection or `collection` is an alias, missing,
        or not a hiervec collection."""
        collections = self.collections()
        if alias in collections:
            raise StoreError(f"{alias!r} is a collection at {self.settings.display_uri!r}, not an alias: an alias "
                             f"needs a name of its own; nothing was changed")
        aliases = self._aliases_of(collections)
        if collection in aliases:
            raise StoreError(f"{collection!r} is an alias (of {aliases[collection]!r}): point {alias!r} at a "
                             f"collection; nothing was changed")
        if collection not in collections:
            raise CollectionNotFoundError(f"collection {collection!r} does not exist at "
                                          f"{self.settings.display_uri!r}; nothing was changed")
        with self._calls(f"describe {collection!r}"):
            properties = self._client.describe_collection(collection, timeout=self.timeout).get("properties", {})
        if PROPERTY_SPEC not in properties:
            raise StoreError(f"collection {collection!r} is not a hiervec collection (no recorded spec); "
                             f"nothing was changed")
        previous = aliases.get(alias)
        if previous == collection:
            return AliasChange(alias, collection, previous)
        with self._calls(f"load {collection!r}"):
            # loaded before the alias moves: the first search through it is served at once
            self._client.load_collection(collection, timeout=self.timeout)
        with self._calls(f"point alias {alias!r} at {collection!r}"):
            if previous is None:
                self._client.create_alias(collection, alias, timeout=self.timeout)
            else:
                self._client.alter_alias(collection, alias, timeout=self.timeout)
            self._settle(alias, collection)
        return AliasChange(alias, collection, previous)

    def _settle(self, alias: str, collection: str) -> None:
        """Return once reads through `alias` reach `collection`: Milvus 2.3 answered the first query
        after `alter_alias` from the collection it had left (0 rows here), then from the new one.
        Waits at most `SETTLE_S` (a collection being written to may never show equal counts)."""
        deadline = time.monotonic() + SETTLE_S
        while True:
            counts = [self._client.query(name, filter="", output_fields=["count(*)"], timeout=self.timeout,
                                         consistency_level="Strong")[0]["count(*)"] for name in (collection, alias)]
            if counts[0] == counts[1] or time.monotonic() > deadline:
                return
            time.sleep(0.1)

    def remove(self, alias: str) -> str:
        """Drop the alias (never a collection); returns the collection it pointed at."""
        collection = self.get(alias)
        if collection is None:
            raise CollectionNotFoundError(f"no alias {alias!r} at {self.settings.display_uri!r}")
        with self._calls(f"drop alias {alias!r}"):
            self._client.drop_alias(alias, timeout=self.timeout)
        return collection
