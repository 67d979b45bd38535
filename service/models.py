"""The HTTP API's response models: they document the OpenAPI schema."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, StringConstraints

from milvus_store.spec import ID_MAX_LENGTH


class HitOut(BaseModel):
    id: str
    distance: float | None = Field(None, description="Squared L2 distance (smaller is nearer); for a fused search "
                                                      "the fused score (larger is nearer); null for a lookup.")
    uri: str = Field(description="Where the image lives (a local path for files ingested or uploaded here).")
    category: str | None = Field(None, description="Leaf category path, e.g. clothing/tops/shirt.")
    categories: dict[str, str] = Field(description="Category path at each level.")
    meta: dict[str, Any]
    predicted: bool = Field(False, description="The category path was predicted by the model at ingest, not given.")
    confidence: dict[str, float] = Field(default_factory=dict, description="Probability of the path at each level "
                                                                            "(1 for given paths).")
    image_url: str | None = Field(None, description="This service's URL of the image, when it can serve it.")


class SearchOut(BaseModel):
    query: dict[str, Any] = Field(description="What was searched with: the uploaded file's name, or the stored id.")
    level: str | None = Field(None, description="The level vector searched, or null for the image vector.")
    filter: dict[str, Any]
    request: dict[str, Any] = Field(description="Every parameter of the search, as the service understood it.")
    routing: dict[str, Any] | None = Field(None, description="With `auto`: the query's predicted path and whether "
                                                              "the search was restricted to its category.")
    hits: list[HitOut]
    collection: str | None = Field(None, description="The collection searched (the one the served alias pointed "
                                                     "at when the request arrived).")
    model: str | None = Field(None, description="The fingerprint of the model that embedded the query.")


class ImageResult(BaseModel):
    filename: str | None
    id: str
    status: str = Field(description="stored (new), updated (the id was stored already: category and meta "
                                    "replaced), duplicate (the same id as an earlier upload of this request, "
                                    "which is the one stored) or failed.")
    reason: str | None = None
    stage: str | None = Field(None, description="For a failure: decode (not an image), too_large (more pixels "
                                                "than the service decodes) or invalid (bad record).")
    predicted_path: str | None = Field(None, description="The category the model predicted, when none was given.")


class ImagesOut(BaseModel):
    stored: int
    updated: int
    duplicates: int = 0
    predicted: int = Field(description="How many of the stored or updated got a predicted category.")
    failed: int
    count: int
    results: list[ImageResult]


class DeletedOut(BaseModel):
    deleted: str
    count: int = Field(description="Images left in the collection.")


class CategoryNode(BaseModel):
    name: str
    path: str
    level: str
    count: int
    children: list[CategoryNode] = []


class CategoriesOut(BaseModel):
    levels: list[str]
    total: int
    tree: list[CategoryNode]


class HealthOut(BaseModel):
    status: str = Field(description="ok, or unavailable (with a 503) when Milvus cannot be reached.")
    model: str = Field(description="The served model's vector fingerprint.")
    store: str
    count: int | None = None
    collection: str | None = Field(None, description="The served collection (where the served alias points).")


class ModelInfo(BaseModel):
    fingerprint: str = Field(description="The served model's vector fingerprint (what the collection records).")
    backbone: str
    image_size: int = Field(description="The square side, in pixels, images are resized to.")
    mode: str = Field(description="pyramid (one vector per level, concatenated) or flat.")


class BatchingInfo(BaseModel):
    max_batch: int = Field(description="The most queries that share one forward pass or Milvus call.")
    window_ms: float = Field(description="How long a batch with room waits for more queries.")


class BatcherStats(BaseModel):
    batches: int = Field(description="Calls made since the service started.")
    items: int = Field(description="Queries they served.")
    mean_batch: float


class StatsOut(BaseModel):
    collection: str = Field(description="The collection read (where the served alias points).")
    uri: str = Field(description="The Milvus address or Lite file (redacted for clients without the API key).")
    count: int = Field(description="Images stored.")
    levels: list[str]
    dim: int = Field(description="The image vector's dimension (the level vectors', summed).")
    level_dims: list[int]
    metric: str
    index: str
    model: ModelInfo
    uptime_s: float
    requests: dict[str, int] = Field(description="Requests answered since the start, by route and status.")
    batching: BatchingInfo
    memory_budget_bytes: dict[str, int] = Field(description="The most memory the service's request handling "
                                                            "holds at once, by part, and the total.")
    embedding: BatcherStats
    searching: BatcherStats


class ErrorBody(BaseModel):
    status: int
    code: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorBody


class AliasesOut(BaseModel):
    served: str = Field(description="The name the service serves (an alias or a collection).")
    collection: str = Field(description="The collection it serves now.")
    model: str = Field(description="The fingerprint of the model serving it.")
    aliases: dict[str, str] = Field(description="Every alias of the store and the collection it points at.")


class MoveOut(BaseModel):
    source: str
    target: str
    level: str = Field(description="The level both paths name.")
    moved: int = Field(description="Images whose category was rewritten.")
    already_there: int = Field(description="Images at the new path before the move (merged with).")
    resumed: bool = Field(description="This call completed a move that was interrupted.")
    count: int


MAX_SYNC_IDS = 1_000_000


class SyncIn(BaseModel):
    ids: list[Annotated[str, StringConstraints(min_length=1, max_length=ID_MAX_LENGTH)]] = Field(
        max_length=MAX_SYNC_IDS, description="Every id the catalogue holds now; the served collection's images "
                                             "with other ids are removed.")
    dry_run: bool = Field(False, description="Remove nothing; say what would be removed.")


class SyncOut(BaseModel):
    scope: str
    examined: int = Field(description="Images in the collection.")
    stale: int = Field(description="Images whose id the catalogue does not list.")
    stale_uris: list[str] = Field(description="The first of their uris.")
    removed: int
    dry_run: bool
    count: int
