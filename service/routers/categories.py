"""GET /categories: the hierarchy with counts, the model's categories and the collection's."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from ..deps import ServiceDep
from ..errors import responses
from ..models import CategoriesOut, CategoryNode

router = APIRouter(tags=["categories"])


@router.get("/categories", response_model=CategoriesOut, responses=responses(404, 409),
            summary="The hierarchy with counts")
async def categories(service: ServiceDep, collection: str | None = None) -> CategoriesOut:
    counts = await run_in_threadpool(service.categories, collection)
    known = await run_in_threadpool(service.known_categories, collection)
    levels = service.level_names
    return CategoriesOut(levels=list(levels), total=sum(counts[levels[0]].values()), tree=_tree(levels, known, counts))


def _tree(levels: Sequence[str], known: dict[str, set[str]], counts: dict[str, Counter]) -> list[CategoryNode]:
    nodes: dict[str, CategoryNode] = {}
    roots: list[CategoryNode] = []
    for depth, level in enumerate(levels):
        for path in sorted(known[level]):
            node = CategoryNode(name=path.rsplit("/", 1)[-1], path=path, level=level, count=counts[level][path])
            nodes[path] = node
            parent = nodes.get(path.rsplit("/", 1)[0]) if depth else None
            (parent.children if parent is not None else roots).append(node)
    return roots
