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
