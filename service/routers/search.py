"""POST /search: by an uploaded image or a stored id, with every option of `SearchRequest`."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from hiervec_core.names import FUSIONS, PREDICTED_CHOICES
from hiervec_app import SearchRequest
from hiervec_app.search import parse_level_weights, parse_where

from ..deps import ServiceDep
from ..errors import ApiError, responses
from ..models import SearchOut
from ..shared import hits_out, read_upload

router = APIRouter(tags=["search"])


@router.post("/search", response_model=SearchOut, responses=responses(400, 404, 409, 413, 415),
             summary="Search by an uploaded image or a stored id")
async def search(
    request: Request,
    service: ServiceDep,
    image: Annotated[UploadFile | None, File(description="The query image.")] = None,
    id: Annotated[str | None, Form(description="Search with this stored image instead of an upload (it is left "
                                               "out of its own hits).")] = None,
    k: Annotated[int, Form(ge=1, description="Number of hits.")] = 10,
    level: Annotated[str | None, Form(description="Search one level's vector instead of the image vector.")] = None,
    fuse: Annotated[str | None, Form(pattern=f"^({'|'.join(FUSIONS)})$",
                                     description="Search every level's vector and fuse the rankings: rrf or "
                                                 "weighted (with level_weights).")] = None,
    level_weights: Annotated[str | None, Form(description="Weighted fusion: the levels searched and their "
                                                          "weights, e.g. category=1,item=2.")] = None,
    where: Annotated[list[str], Form(description="LEVEL=CATEGORY (a path or a unique name); repeatable.")] = [],  # noqa: B006
    under: Annotated[str | None, Form(description="Only inside this subtree, e.g. clothing/tops.")] = None,
    group_by: Annotated[str | None, Form(description="At most group_size hits per category of this level.")] = None,
    group_size: Annotated[int, Form(ge=1)] = 1,
    collection: Annotated[str | None, Form(description="Another collection of the same model.")] = None,
    auto: Annotated[str | None, Form(description="Predict the query's category and search only within it at "
                                                 "this level when confident enough.")] = None,
    min_confidence: Annotated[float, Form(ge=0, le=1, allow_inf_nan=False,
                                          description="With `auto`: the probability needed.")] = 0.5,
    predicted: Annotated[str, Form(pattern=f"^({'|'.join(PREDICTED_CHOICES)})$",
                                   description="Stored images with predicted categories: include, exclude "
                                               "or only.")] = "include",
    min_label_confidence: Annotated[float | None, Form(ge=0, le=1, allow_inf_nan=False,
                                                       description="Only stored images whose category has at "
                                                                   "least this probability.")] = None,
) -> SearchOut:
    if (image is None) == (id is None):
        raise ApiError(422, "bad_query", "give exactly one of an uploaded `image` or a stored `id`")
    form = await request.form()  # parsed once already (FastAPI caches it): read what it kept of the fields
    for field in ("image", "id"):
        if len(form.getlist(field)) > 1:  # FastAPI would keep the last and drop the others without a word
            raise ApiError(422, "bad_query", f"one `{field}` per search, got {len(form.getlist(field))}; "
                                             "search once per query image")
    max_k = service.settings.max_k
    if k > max_k:
        raise ApiError(422, "bad_query", f"k must be at most {max_k}, got {k}")
    if group_by is not None and k * group_size > max_k:
        raise ApiError(422, "bad_query", f"k x group_size must be at most {max_k} hits, got "
                                         f"{k} x {group_size} = {k * group_size}")
    search_request = SearchRequest(
        k=k, level=level, where=parse_where(where), under=under, fusion=fuse,
        level_weights=parse_level_weights(level_weights), group_by=group_by, group_size=group_size,
        predicted=predicted, min_label_confidence=min_label_confidence, auto=auto, min_confidence=min_confidence,
    )
    search_request.check(service.level_names, vector_levels=service.level_names if service.embedder.level_dims else ())
    if image is not None:
        data = await read_upload(image, service.settings.max_upload_bytes)
        prepared = await run_in_threadpool(service.prepare, data, image.filename)
        search_request = search_request.with_vectors(await service.embed(prepared))
        query = {"filename": image.filename}
    else:
        search_request, query = replace(search_request, ids=(id,)), {"id": id}
    result = await service.search(search_request, collection)
    described = search_request.describe()
    searched = service.index(collection).store.collection
    return SearchOut(query=query, level=level, request=described, collection=searched,
                     model=service.embedder.fingerprint,
                     routing=result.route.to_dict() if result.route is not None else None,
                     hits=hits_out(service, request, result.hits),
                     filter={"where": described["where"], "under": under, "group_by": group_by})
