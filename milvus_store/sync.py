"""Sync a collection with its source: remove the images the source no longer lists.

`plan_sync` says what would go, `apply_sync` removes exactly that. The scope is what the
source can speak for: under a folder, the stored images whose ``uri`` is under that folder
(other folders' images in the same collection are never touched); for a manifest, which
lists the catalogue, the whole collection. An image in scope stays when its id is one of
the listing's (a file whose bytes changed has a new id: its old version goes) or its ``uri``
is one the caller keeps (a listed file that could not be read or stored this time keeps what
is stored of it).

    >>> failed = {f.uri for f in report.failed}                                                 # doctest: +SKIP
    >>> plan = plan_sync(store, kept_ids=report.ids, kept_uris=failed, under_uri="/data/shop")  # doctest: +SKIP
    >>> apply_sync(store, plan)                                                                 # doctest: +SKIP
    12
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from .store import HierStore

DELETE_BATCH = 1000
SHOWN = 20  # stale uris a report shows (the ids are all in the plan)


@dataclass
class SyncPlan:
    scope: str  # "the collection", or the uri prefix of the source folder
    examined: int = 0  # stored images in scope
    stale: list[str] = field(default_factory=list)  # ids of the images to remove
    stale_uris: list[str] = field(default_factory=list)  # the first `SHOWN` of their uris

    def to_dict(self) -> dict:
        return {"scope": self.scope, "examined": self.examined, "stale": len(self.stale),
                "stale_uris": self.stale_uris}


def _under(uri: str, prefix: str) -> bool:
    return uri.startswith(prefix.rstrip("/") + "/")


def plan_sync(store: HierStore, kept_ids: Iterable[str], kept_uris: Iterable[str], *,
              under_uri: str | None = None) -> SyncPlan:
    """What a sync removes: images in scope (under `under_uri`, else all) whose id is not in
    `kept_ids` and whose uri is not in `kept_uris`."""
    ids: Collection[str] = set(kept_ids)
    uris: Collection[str] = set(kept_uris)
    plan = SyncPlan(scope=under_uri.rstrip("/") + "/" if under_uri else "the collection")
    for hit in store.iterate(None, output=[store.spec.fields.uri]):
        if under_uri and not _under(hit.uri or "", under_uri):
            continue
        plan.examined += 1
        if hit.id not in ids and hit.uri not in uris:
            plan.stale.append(hit.id)
            if len(plan.stale_uris) < SHOWN:
                plan.stale_uris.append(hit.uri)
    return plan


def apply_sync(store: HierStore, plan: SyncPlan) -> int:
    """Remove the plan's images; returns how many were removed."""
    removed = 0
    for start in range(0, len(plan.stale), DELETE_BATCH):
        removed += store.delete(plan.stale[start : start + DELETE_BATCH])
    return removed
