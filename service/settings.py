"""`ServiceSettings` (the service) and `ServerSettings` (the processes serving it): everything `hiervec
serve` configures, with a bound on every size a client controls.

Imports neither FastAPI nor torch: the CLI reads its options' defaults from these fields."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from hiervec_core.names import DEFAULT_COLLECTION, DEFAULT_DEVICE, DEFAULT_RUNTIME

MB = 2**20
MEGAPIXEL = 1_000_000


class SettingsError(ValueError):
    """A service setting out of range; the message names it."""


@dataclass(frozen=True)
class ServiceSettings:
    """Everything `hiervec serve` configures; secrets never appear in `repr`."""

    model: str | os.PathLike
    uri: str | None = None
    collection: str = DEFAULT_COLLECTION
    token: str | None = field(default=None, repr=False)
    api_key: str | None = field(default=None, repr=False)
    max_upload_bytes: int = 20 * MB
    max_k: int = 1000  # hits per query: k, or k x group_size when grouped
    max_files: int = 64  # images per POST /images
    max_pixels: int = 40 * MEGAPIXEL  # per uploaded image, read from its header before it is decoded
    max_requests: int = 64  # requests in progress at once (more answer 503), a bound on bodies held
    max_batch: int = 32
    batch_window_ms: float = 0.0
    media_dir: str | os.PathLike | None = "hiervec-media"
    image_roots: tuple[str, ...] = ()
    optimize: bool = False  # embed through the traced, frozen model (embedder.inference.frozen_for_cpu)
    device: str = DEFAULT_DEVICE  # where the model runs (embedder.devices.resolve_device)
    amp: bool = False  # mixed-precision embedding; stored and searched vectors stay float32
    runtime: str = DEFAULT_RUNTIME  # torch, onnxruntime, openvino; auto: the fastest installed (embedder.runtimes)
    threads: int | None = None  # torch threads of each server process (None: torch's default)
    # A Milvus Lite `uri` is served from a process of its own (milvus_store.LiteProcess), so that
    # Lite's Python work does not share this process's interpreter lock with the service's.
    lite_process: bool = True
    store_uri: str | None = None  # where the store is reached when not at `uri` (workers: the parent's Lite process)
    # How often the service checks where the alias it serves points (`service.core.Generation`); 0: never.
    alias_check_s: float = 2.0
    # The deadline of every call to the store: a Milvus that takes connections and never answers is a 503
    # (store_unavailable) after it, not a request held for ever.
    store_timeout_s: float = 30.0

    def __post_init__(self):
        for name in ("max_upload_bytes", "max_k", "max_files", "max_batch", "max_pixels", "max_requests"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.store_timeout_s > 0:
            raise SettingsError(f"store_timeout_s must be positive, got {self.store_timeout_s}")
        if self.alias_check_s < 0:
            raise SettingsError(f"alias_check_s must not be negative, got {self.alias_check_s}")
        if self.batch_window_ms < 0:
            raise SettingsError(f"batch_window_ms must not be negative, got {self.batch_window_ms}")
        if self.threads is not None and self.threads < 1:
            raise SettingsError(f"threads must be positive, got {self.threads}")

    @property
    def store_connection(self) -> dict:
        """How the service connects to the store (`HierStore`'s keyword arguments)."""
        return {"token": self.token, "timeout": self.store_timeout_s}

    def to_json(self) -> str:
        """The settings without the secrets (workers read those from the environment)."""
        data = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in self.__dict__.items()
                if k not in ("token", "api_key")}
        return json.dumps(data | {"image_roots": list(self.image_roots)})

    @classmethod
    def from_json(cls, text: str) -> ServiceSettings:
        data = json.loads(text)
        return cls(**data | {"image_roots": tuple(data.get("image_roots", ()))})


@dataclass(frozen=True)
class ServerSettings:
    """The server processes: where they listen, how many, and the connection guards below the app
    (`service.guard`: a deadline on request headers, a bound on connections per client address)."""

    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    header_timeout_s: float = 10.0
    max_connections_per_client: int = 32

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port must be in [0, 65535], got {self.port}")
        if not 1 <= self.workers <= 256:
            raise SettingsError(f"workers must be in [1, 256], got {self.workers}")
        if not self.header_timeout_s > 0:
            raise SettingsError(f"header_timeout_s must be positive, got {self.header_timeout_s}")
        if self.max_connections_per_client < 1:
            raise SettingsError(f"max_connections_per_client must be positive, got {self.max_connections_per_client}")

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach `host` (127.0.0.0/8, ::1, localhost)."""
        import ipaddress

        if self.host.strip().lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:  # a host name: it may resolve to any address
            return False
