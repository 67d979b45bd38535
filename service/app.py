"""The HTTP face of hiervec: search, add, get and delete images, browse the hierarchy.

>>> service = Service.open(ServiceSettings(model="model.pt", uri="./hiervec.db"))   # doctest: +SKIP
>>> app = create_app(service)                                                      # doctest: +SKIP
>>> # uvicorn.run(app, host="127.0.0.1", port=8000)

One router per area (`service.routers`: search, images, categories, admin), each route
declaring `Depends(get_service)`, and the writing router `Depends(require_key)` for all
of its routes. Image decoding runs on worker threads; concurrent queries share forward
passes and Milvus calls through two micro-batchers, so the event loop only routes
requests. Every error reaches the client as JSON (`service.errors`); a bug becomes a 500
with the same shape and the traceback goes to the server log only.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from .core import Service
from .errors import add_error_handlers
from .middleware import BodyLimit, CountRequests
from .routers import admin, catalogue, categories, images, search
from .settings import ServiceSettings

PAGE = Path(__file__).with_name("static") / "index.html"


def create_app(service: Service) -> FastAPI:
    """The ASGI app over an open `Service` (closed when the app shuts down)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    app = FastAPI(
        title="hiervec", version=_version(), lifespan=lifespan,
        description="Hierarchical-category image retrieval on Milvus: search by image or id inside parts of "
                    "the category tree, add and delete images, browse the hierarchy.",
        # one short, stable operationId per route: its function's name (generated clients name their calls so)
        generate_unique_id_function=lambda route: route.name,
    )
    app.state.service = service
    app.add_middleware(BodyLimit, limit=service.settings.max_upload_bytes)
    app.add_middleware(CountRequests, service=service)
    add_error_handlers(app)
    for router in (search.router, images.router, images.writes, categories.router, admin.router, catalogue.router):
        app.include_router(router)

    page_html = PAGE.read_text(encoding="utf-8")
    page_headers = {"Content-Security-Policy": _page_policy(page_html), "X-Content-Type-Options": "nosniff",
                    "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html, headers=page_headers)

    fastapi_openapi = app.openapi  # FastAPI's, which builds the schema once and keeps it
    app.openapi = lambda: binary_uploads(fastapi_openapi())
    return app


def binary_uploads(schema: dict) -> dict:
    """Uploads declared the way both OpenAPI 3.0 and 3.1 generators read as files.

    FastAPI writes an `UploadFile` as OpenAPI 3.1's ``{"type": "string", "contentMediaType":
    "application/octet-stream"}``, which client generators (openapi-python-client,
    openapi-typescript) take for a plain string, so their uploads were sent as text (422
    "Expected UploadFile"). ``"format": "binary"`` beside it is what they read as a file.
    """

    def visit(node):
        if isinstance(node, dict):
            if node.get("type") == "string" and node.get("contentMediaType") == "application/octet-stream":
                node["format"] = "binary"
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)  # in place, and again each call: FastAPI keeps the schema it built
    return schema


def app_from_environment() -> FastAPI:
    """Factory for `uvicorn --factory` workers: settings come from $HIERVEC_SERVE_SETTINGS (JSON)."""
    settings = ServiceSettings.from_json(os.environ["HIERVEC_SERVE_SETTINGS"])
    settings = ServiceSettings(**settings.__dict__ | {"token": os.environ.get("HIERVEC_MILVUS_TOKEN"),
                                                      "api_key": os.environ.get("HIERVEC_API_KEY")})
    return create_app(Service.open(settings))


def _page_policy(html: str) -> str:
    """A strict Content-Security-Policy for the search page: its own inline script and style (by
    hash) and nothing else; images from this service or the user's own file; no frames."""

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
            f"img-src 'self' blob:; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hiervec")
    except PackageNotFoundError:
        return "0"
