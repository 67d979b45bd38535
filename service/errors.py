"""Every error reaches the client as one JSON shape, ``{"error": {"status", "code", "message"}}``.

The library's errors map to statuses by class (the most specific class wins); an error
the client caused in the service itself is an `ApiError`; anything else is a bug: a 500
with an opaque body, and the traceback in the server log only. `responses(...)` documents
the error statuses of a route in the OpenAPI schema.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from embedder import EmbedderError, ImageDecodeError
from milvus_store import (
    CollectionNotFoundError,
    FilterError,
    QueryError,
    RecordError,
    RecordNotFoundError,
    SchemaMismatchError,
    StoreConnectionError,
    StoreError,
    UnknownLevelError,
)

from .models import ErrorOut

log = logging.getLogger("hiervec.service")


class ApiError(Exception):
    """An error the client caused (or a dependency that is down): status, code and message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


RETRY_AFTER_S = 5  # what a 503 for an unreachable store asks clients to wait

# The library's errors, most specific first: (class, status, code). A store that does not answer
# (StoreUnavailableError, a StoreConnectionError) is 503 with Retry-After, whatever the route.
LIBRARY_ERRORS: list[tuple[type[Exception], int, str]] = [
    (ImageDecodeError, 415, "not_an_image"),
    (CollectionNotFoundError, 404, "no_collection"),
    (RecordNotFoundError, 404, "not_found"),
    (SchemaMismatchError, 409, "model_mismatch"),
    (UnknownLevelError, 400, "unknown_level"),
    (FilterError, 400, "bad_filter"),
    (QueryError, 422, "bad_query"),
    (RecordError, 422, "rejected"),
    (StoreConnectionError, 503, "store_unavailable"),
    (StoreError, 400, "store_error"),
    (EmbedderError, 400, "model_error"),
]

DESCRIPTIONS = {
    400: "A filter, level or argument the collection cannot take (unknown level or category, ...).",
    401: "The API key is missing or wrong (X-API-Key, or Authorization: Bearer).",
    403: "Catalogue administration on a service that has no API key.",
    404: "No such image, collection or endpoint.",
    405: "Method not allowed on this path.",
    409: "The served model and the collection do not match.",
    413: "Body, file or image larger than this service accepts.",
    415: "An upload that is not an image.",
    422: "A request that is malformed or out of bounds.",
    500: "A fault of the service (the server log has the traceback).",
    503: "Milvus is unreachable or did not answer in time (with Retry-After), or too many requests are in "
         "progress.",
}


def responses(*statuses: int) -> dict[int, dict]:
    """OpenAPI entries for a route's error statuses (each with the error body's schema); 422, 500
    and 503 are possible on every route."""
    return {status: {"model": ErrorOut, "description": DESCRIPTIONS[status]}
            for status in sorted({*statuses, 422, 500, 503})}


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "code": code, "message": message}}, status_code=status)


def add_error_handlers(app: FastAPI) -> None:
    def redact(request: Request, message: str) -> str:
        return request.app.state.service.redact(message, request.headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, redact(request, exc.message))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        message = {404: f"no endpoint {request.url.path}", 405: f"{request.method} is not allowed on "
                   f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
        response = error_response(exc.status_code, codes.get(exc.status_code, "http_error"), message)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in exc.errors())
        return error_response(422, "invalid_request", problems)

    def handler(status: int, code: str):
        async def handle(request: Request, exc: Exception) -> JSONResponse:
            message = " ".join(str(exc).split()) or type(exc).__name__
            if isinstance(exc, SchemaMismatchError):
                message += " (the served model and this collection do not match)"
            response = error_response(status, code, redact(request, message))
            if status == 503:  # the store's fault, not the request's: the same request may succeed later
                response.headers["Retry-After"] = str(RETRY_AFTER_S)
            return response

        return handle

    for kind, status, code in LIBRARY_ERRORS:  # the most specific class wins (Starlette looks up the MRO)
        app.add_exception_handler(kind, handler(status, code))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal", "internal error; the server log has the details")
