"""The HTTP service: `hiervec serve` — a FastAPI app over `ImageIndex`, with a search page at `/`.

Rooms: `settings` (ServiceSettings), `core` (Service: model, collections, micro-batchers),
`routers` (one per area), `models` (response models), `errors` (the error map), `deps`
(get_service, require_key), `shared` (upload reading, hit rendering), `middleware` (body
limit, request counts), `app` (create_app).
"""

from hiervec_core.lazy import lazy_exports

_EXPORTS = {
    "create_app": ".app",
    "MicroBatcher": ".batching",
    "Service": ".core",
    "ApiError": ".errors",
    "ServiceSettings": ".settings",
    "SettingsError": ".settings",
    "ServerSettings": ".settings",
    "run_server": ".server",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["ApiError", "MicroBatcher", "Service", "ServerSettings", "ServiceSettings", "SettingsError", "create_app", "run_server"]
