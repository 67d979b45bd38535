"""Catalogue administration behind the API key: where the served alias points, moving a category,
and syncing the collection with the catalogue's own list of ids."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Form
from starlette.concurrency import run_in_threadpool

from milvus_store import Aliases, move_category
from milvus_store.sync import apply_sync, plan_sync

from ..deps import ServiceDep, require_admin
from ..errors import ApiError, responses
from ..models import AliasesOut, MoveOut, SyncIn, SyncOut

router = APIRouter(tags=["catalogue"], dependencies=[Depends(require_admin)])


@router.get("/aliases", response_model=AliasesOut, responses=responses(401, 403),
            summary="The served name, the collection it serves and every alias")
async def aliases(service: ServiceDep) -> AliasesOut:
    def read() -> dict[str, str]:
        with Aliases(service.store_uri, **service.settings.store_connection) as found:
            return found.all()

    return AliasesOut(served=service.settings.collection, collection=service.current().collection,
                      model=service.embedder.fingerprint, aliases=await run_in_threadpool(read))


@router.post("/categories/move", response_model=MoveOut, responses=responses(400, 401, 403),
             summary="Move or rename a category in place (no image is embedded again)")
async def move(service: ServiceDep,
               source: Annotated[str, Form(alias="from", description="The category to move, e.g. clothing/tops.")],
               target: Annotated[str, Form(alias="to", description="Its new path, as many levels deep.")],
               merge: Annotated[bool, Form(description="Allow a new path that already holds images.")] = False,
               ) -> MoveOut:
    index = service.index(None)
    report = await run_in_threadpool(move_category, index.store, source, target, merge=merge)
    service.changed(None)
    return MoveOut(**report.to_dict())


@router.post("/sync", response_model=SyncOut, responses=responses(401, 403, 422),
             summary="Remove the served collection's images whose ids the catalogue no longer lists")
async def sync(service: ServiceDep, body: Annotated[SyncIn, Body()]) -> SyncOut:
    if not body.ids:
        raise ApiError(422, "bad_query", "ids is empty: a sync with an empty listing would remove everything; "
                                         "delete the images explicitly instead")
    index = service.index(None)
    plan = await run_in_threadpool(plan_sync, index.store, body.ids, ())
    removed = 0 if body.dry_run else await run_in_threadpool(apply_sync, index.store, plan)
    if removed:
        service.changed(None)
    return SyncOut(**plan.to_dict(), removed=removed, dry_run=body.dry_run,
                   count=await run_in_threadpool(index.store.count))
