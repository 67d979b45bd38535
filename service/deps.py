"""Dependencies every route declares: the service, and the API key for writes (a route cannot forget it)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .core import Service
from .errors import ApiError


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def require_key(request: Request, service: ServiceDep) -> None:
    """Writes need the API key when one is set (routers that write declare this for every route)."""
    if service.settings.api_key and not service.has_key(request.headers):
        raise ApiError(401, "unauthorized", "this endpoint needs the API key in the X-API-Key header")


def require_admin(request: Request, service: ServiceDep) -> None:
    """Catalogue administration (aliases, moving categories, sync) needs the API key, and a key to be set."""
    if not service.settings.api_key:
        raise ApiError(403, "forbidden", "catalogue administration needs the service to have an API key "
                                         "(hiervec serve --api-key, or $HIERVEC_API_KEY)")
    if not service.has_key(request.headers):
        raise ApiError(401, "unauthorized", "this endpoint needs the API key in the X-API-Key header")
