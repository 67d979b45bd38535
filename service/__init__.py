"""The HTTP service: `hiervec serve` — a FastAPI app over `ImageIndex`, with a search page at `/`."""

from .app import ApiError, Service, ServiceSettings, create_app
from .batching import MicroBatcher

__all__ = ["ApiError", "MicroBatcher", "Service", "ServiceSettings", "create_app"]
