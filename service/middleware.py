"""ASGI middleware: a bound on request bodies, on requests in progress, and request counts for GET /stats."""

from __future__ import annotations

from .core import BODY_SLACK
from .errors import error_response


class BodyLimit:
    """Refuse request bodies over `limit` bytes with a 413, by header or while they stream in."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit + BODY_SLACK:
            response = error_response(413, "too_large", f"request body of {int(declared)} bytes is over the "
                                                        f"{self.limit} byte upload limit")
            return await response(scope, receive, send)
        seen, over, answered = 0, False, False

        async def limited():
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit + BODY_SLACK:
                    over = True  # stop reading: to the app the client has gone
                    return {"type": "http.disconnect"}
            return message

        async def unless_over(message):
            nonlocal answered
            if over:
                return  # the app's answer to a cut-off body is dropped: the 413 below goes instead
            answered = True
            await send(message)

        try:
            await self.app(scope, limited, unless_over)
        except Exception:
            if not over:
                raise
        if over and not answered:
            response = error_response(413, "too_large", f"request body is over the {self.limit} byte upload limit")
            await response(scope, receive, send)


class CountRequests:
    """Count requests per route for GET /stats (`Service.requests`, keyed "METHOD /path"), and pin each
    request to the generation (model and collection) current when it arrived (`Service.pin`).

    Plain ASGI: Starlette's `@app.middleware("http")` runs every request through a task group
    and memory streams, a few percent of the event loop's time under load. The router records
    the matched route in the request's scope, which this reads once the app is done.
    """

    def __init__(self, app, service):
        self.app, self.service = app, service
        self.in_flight = 0  # requests of this app in progress (one event loop: no lock)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.service.settings.max_requests
        if self.in_flight >= limit:  # bodies held at once are bounded by requests in progress
            self.service.requests["refused (too many requests)"] += 1
            response = error_response(503, "too_many_requests", f"{limit} requests are in progress, the most this "
                                                                "server takes at once; retry later")
            response.headers["Retry-After"] = "1"
            return await response(scope, receive, send)
        self.in_flight += 1
        token = self.service.pin()  # one generation serves this request, whatever switches meanwhile
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.service.unpin(token)
            route = scope.get("route")
            self.service.requests[f"{scope['method']} {route.path if route else 'other'}"] += 1
