"""Hierarchy-aware Milvus collections (pymilvus only; never imports torch)."""

from .connection import DEFAULT_URI, ConnectionSettings
from .errors import (
    CollectionNotFoundError,
    FilterError,
    LevelVectorMissingError,
    QueryError,
    RecordError,
    RecordNotFoundError,
    SchemaMismatchError,
    StoreConnectionError,
    StoreUnavailableError,
    StoreError,
    UnknownLevelError,
    UnsupportedIndexError,
    VectorFieldLimitError,
)
from .features import Features
from .filters import (
    And, Confident, Eq, Filter, Ids, In, Meta, Not, Or, Predicted, Under, as_filter, both, category_filter, quote_literal, render, resolve_category, under,
)
from .records import Hit, Record, content_id, path_uri, printable, uri_path
from hiervec_core.vectors import LevelVectors

from .index import (
    CategoryPredictor, DuplicateItem, FailedItem, ImageEmbedder, ImageIndex, IngestItem, IngestReport, RelabelReport,
)
from .search import Route, SearchRequest, SearchResult
from .spec import LITE_INDEXES, SERVER_INDEXES, CollectionSpec, FieldNames, field_names
from .store import HierStore
from .aliases import AliasChange, Aliases
from .moves import MoveReport, move_category
from .copy import CopyReport, copy_collection, open_copy_target
from .lite_process import LiteProcess

__all__ = [
    "AliasChange", "Aliases", "And", "MoveReport", "move_category", "CategoryPredictor", "Confident", "LevelVectors", "QueryError", "RecordNotFoundError", "SearchRequest", "UnknownLevelError", "SearchResult", "CollectionNotFoundError", "CopyReport", "copy_collection", "open_copy_target", "DuplicateItem", "FailedItem", "ImageEmbedder", "ImageIndex", "IngestItem", "IngestReport", "CollectionSpec", "ConnectionSettings", "DEFAULT_URI", "Eq", "FieldNames",
    "Filter", "FilterError", "HierStore", "Hit", "Ids", "In", "LITE_INDEXES", "LiteProcess", "Meta", "Not", "Or", "Predicted", "Record", "RecordError", "RelabelReport", "Route",
    "SERVER_INDEXES", "SchemaMismatchError", "LevelVectorMissingError", "VectorFieldLimitError", "Features", "StoreConnectionError", "StoreError", "StoreUnavailableError", "Under", "UnsupportedIndexError",
    "as_filter", "both", "category_filter", "content_id", "path_uri", "printable", "field_names", "quote_literal", "render", "resolve_category", "under", "uri_path",
]
