"""Dependencies every route declares: the service, and the API key for writes (a route cannot forget it).

The key is read through FastAPI's security dependencies (`X-API-Key`, or `Authorization:
Bearer KEY`), so the OpenAPI schema declares both schemes and which operations need one,
and a client generated from it can send the key.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from .core import Service
from .errors import ApiError

API_KEY_HEADER = APIKeyHeader(name="X-API-Key", scheme_name="ApiKeyHeader", auto_error=False,
                              description="The service's API key (`hiervec serve --api-key`, or $HIERVEC_API_KEY).")
BEARER = HTTPBearer(scheme_name="BearerKey", auto_error=False,
                    description="The same API key as a bearer token: `Authorization: Bearer KEY`.")
UNAUTHORIZED = "this endpoint needs the API key: the X-API-Key header, or Authorization: Bearer KEY"


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def given_key(header: Annotated[str | None, Security(API_KEY_HEADER)] = None,
              bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)] = None) -> str:
    """The key the request carries: X-API-Key first, then a bearer token ('' when neither)."""
    return header or (bearer.credentials.strip() if bearer is not None else "")


KeyDep = Annotated[str, Depends(given_key)]


def require_key(service: ServiceDep, key: KeyDep) -> None:
    """Writes need the API key when one is set (routers that write declare this for every route)."""
    if service.settings.api_key and not service.key_matches(key):
        raise ApiError(401, "unauthorized", UNAUTHORIZED)


def require_admin(service: ServiceDep, key: KeyDep) -> None:
    """Catalogue administration (aliases, moving categories, sync) needs the API key, and a key to be set."""
    if not service.settings.api_key:
        raise ApiError(403, "forbidden", "catalogue administration needs the service to have an API key "
                                         "(hiervec serve --api-key, or $HIERVEC_API_KEY)")
    if not service.key_matches(key):
        raise ApiError(401, "unauthorized", UNAUTHORIZED)
