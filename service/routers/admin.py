"""GET /healthz and GET /stats: is the service up, and what it holds and has done."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from milvus_store import StoreError

from ..deps import ServiceDep
from ..errors import responses
from ..models import HealthOut, StatsOut

router = APIRouter(tags=["admin"])


@router.get("/healthz", response_model=HealthOut, responses=responses(), summary="Model loaded and store reachable")
async def healthz(request: Request, service: ServiceDep) -> JSONResponse:
    try:
        count = await run_in_threadpool(service.index(None).store.count, timeout=5)
    except StoreError as exc:
        return JSONResponse({"status": "unavailable", "model": service.embedder.fingerprint,
                             "store": service.redact(str(exc), request.headers)}, status_code=503)
    return JSONResponse({"status": "ok", "model": service.embedder.fingerprint, "store": "reachable", "count": count,
                         "collection": service.current().collection})


@router.get("/stats", response_model=StatsOut, responses=responses(404, 409),
            summary="Collection, model and request statistics")
async def stats(request: Request, service: ServiceDep, collection: str | None = None) -> dict:
    index = await run_in_threadpool(service.index, collection)
    spec = index.store.spec
    config = service.embedder.config
    return {
        "collection": index.store.collection, "uri": service.redact(index.store.settings.display_uri, request.headers),
        "count": await run_in_threadpool(index.store.count),
        "levels": list(spec.level_names), "dim": spec.dim, "level_dims": list(spec.level_dims),
        "metric": spec.metric, "index": spec.index,
        "model": {"fingerprint": service.embedder.fingerprint, "backbone": config.backbone,
                  "image_size": config.image_size, "mode": config.mode},
        "uptime_s": round(time.time() - service.started, 1),
        "requests": {key: n for key, n in sorted(service.requests.items()) if n},
        "batching": {"max_batch": service.settings.max_batch, "window_ms": service.settings.batch_window_ms},
        "memory_budget_bytes": service.memory_budget,
        "embedding": service.embedding.stats.to_dict(),
        "searching": service.searching.stats.to_dict(),
    }
