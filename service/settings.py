"""`ServiceSettings`: everything `hiervec serve` configures, with a bound on every size a client controls."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from hiervec_core.names import DEFAULT_COLLECTION


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
    max_upload_bytes: int = 20 * 2**20
    max_k: int = 1000  # hits per query: k, or k x group_size when grouped
    max_files: int = 64  # images per POST /images
    max_pixels: int = 40_000_000  # per uploaded image, read from its header before it is decoded
    max_requests: int = 64  # requests in progress at once (more answer 503), a bound on bodies held
    max_batch: int = 32
    batch_window_ms: float = 0.0
    media_dir: str | os.PathLike | None = "hiervec-media"
    image_roots: tuple[str, ...] = ()
    optimize: bool = False  # embed through the traced, frozen model (embedder.inference.frozen_for_cpu)
    device: str = "auto"  # where the model runs (embedder.devices.resolve_device)
    amp: bool = False  # mixed-precision embedding; stored and searched vectors stay float32
    runtime: str = "auto"  # torch, onnxruntime, openvino; auto: the fastest installed (embedder.runtimes)
    threads: int | None = None  # torch threads of each server process (None: torch's default)
    # A Milvus Lite `uri` is served from a process of its own (milvus_store.LiteProcess), so that
    # Lite's Python work does not share this process's interpreter lock with the service's.
    lite_process: bool = False
    store_uri: str | None = None  # where the store is reached when not at `uri` (workers: the parent's Lite process)
    # How often the service checks where the alias it serves points (`service.core.Generation`); 0: never.
    alias_check_s: float = 2.0

    def __post_init__(self):
        for name in ("max_upload_bytes", "max_k", "max_files", "max_batch", "max_pixels", "max_requests"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be positive, got {getattr(self, name)}")
        if self.alias_check_s < 0:
            raise SettingsError(f"alias_check_s must not be negative, got {self.alias_check_s}")
        if self.batch_window_ms < 0:
            raise SettingsError(f"batch_window_ms must not be negative, got {self.batch_window_ms}")
        if self.threads is not None and self.threads < 1:
            raise SettingsError(f"threads must be positive, got {self.threads}")

    def to_json(self) -> str:
        """The settings without the secrets (workers read those from the environment)."""
        data = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in self.__dict__.items()
                if k not in ("token", "api_key")}
        return json.dumps(data | {"image_roots": list(self.image_roots)})

    @classmethod
    def from_json(cls, text: str) -> ServiceSettings:
        data = json.loads(text)
        return cls(**data | {"image_roots": tuple(data.get("image_roots", ()))})
