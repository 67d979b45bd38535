"""What the Milvus at the other end can do, from the version it reports.

hiervec runs on three kinds of engine, which differ in what a collection may hold and
what a search may ask:

- Milvus Lite (a ``.db`` file, or ``milvus-lite server``): any number of vector fields,
  INVERTED scalar indexes, no templated ``filter_params``; hiervec groups hits itself
  (Lite 3.2.2 drops categories with fewer than ``group_size`` hits).
- Milvus 2.4 and newer servers: up to ``proxy.maxVectorFieldNum`` vector fields (4 unless
  configured, at most 10), hybrid search, group-by, INVERTED indexes; templated filters
  from 2.5.
- Milvus 2.3 servers (PyPI's embedded ``milvus`` package among them): one vector field per
  collection, no hybrid search or group-by, MARISA-trie indexes on VARCHAR fields. Before
  2.3.10 an upsert into a collection with a partition key hashes the wrong field and files
  rows under the wrong partition, so filters on the key miss them (milvus-io/milvus#30607,
  fixed by #30772/#30773; seen here on 2.3.5: 8 of 100 rows found): no partition key there.

>>> old, new = Features.of("v2.3.5-lite", local=False), Features.of("v2.5.14", local=False)
>>> old.max_vector_fields, old.partition_key, new.max_vector_fields, new.partition_key, new.templates
(1, False, 4, True, True)
>>> Features.of("milvus_lite 3.2.2", local=True).max_vector_fields is None
True
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .spec import STOCK_VECTOR_FIELDS

_VERSION = re.compile(r"v?(\d+)\.(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class Features:
    name: str  # what error messages call the target
    lite: bool  # Milvus Lite's engine, in process or as a server
    version: tuple[int, int, int] | None  # a server's release; None for Lite
    max_vector_fields: int | None  # None: no limit; for 2.4+ servers the stock setting (it may be raised)
    templates: bool  # templated filter_params
    hybrid_search: bool
    server_group_by: bool  # group_by_field that keeps small categories
    scalar_index: str | None  # the index for VARCHAR level fields
    bool_index: str | None  # the index for the BOOL `predicted` field
    partition_key: bool  # upserts into a partition-key collection land in the right partition

    @classmethod
    def of(cls, version: str, *, local: bool) -> Features:
        text = str(version)
        if local or text.startswith("milvus_lite"):
            return cls("Milvus Lite", True, None, None, templates=False, hybrid_search=True, server_group_by=False,
                       scalar_index="INVERTED", bool_index="INVERTED", partition_key=True)
        match = _VERSION.search(text)
        release = tuple(int(part or 0) for part in match.groups()) if match else (2, 5, 0)
        modern = release >= (2, 4, 0)
        return cls(
            f"Milvus {'.'.join(map(str, release))}", False, release,
            STOCK_VECTOR_FIELDS if modern else 1,
            templates=release >= (2, 5, 0), hybrid_search=modern, server_group_by=modern,
            scalar_index="INVERTED" if modern else "Trie", bool_index="INVERTED" if modern else None,
            partition_key=release >= (2, 3, 10),
        )

    @property
    def vector_fields_configurable(self) -> bool:
        """Whether the server's vector-field limit is a setting (2.4+) rather than fixed."""
        return self.version is not None and self.version >= (2, 4, 0)
