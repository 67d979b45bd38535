"""The HTTP service: `hiervec serve` — a FastAPI app over `ImageIndex`, with a search page at `/`.

Rooms: `settings` (ServiceSettings), `core` (Service: model, collections, micro-batchers),
`routers` (one per area), `models` (response models), `errors` (the error map), `deps`
(get_service, require_key), `shared` (upload reading, hit rendering), `middleware` (body
limit, request counts), `app` (create_app).
"""

from .app import create_app
from .batching import MicroBatcher
from .core import Service
from .errors import ApiError
from .settings import ServiceSettings, SettingsError

__all__ = ["ApiError", "MicroBatcher", "Service", "ServiceSettings", "SettingsError", "create_app"]
