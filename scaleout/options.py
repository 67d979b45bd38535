"""What `--engine ray` is told: where Ray is and how wide to go (`RayOptions`), and how each actor
builds its model (`EmbedderRecipe`). Imports neither Ray nor torch: the CLI reads its defaults here."""

from __future__ import annotations

from dataclasses import dataclass, field

from hiervec_core.names import DEFAULT_DEVICE, DEFAULT_RUNTIME

from .errors import ScaleOutError


@dataclass(frozen=True)
class EmbedderRecipe:
    """How each actor builds its `Embedder` (a checkpoint path and options: small and picklable)."""

    model_path: str
    runtime: str = DEFAULT_RUNTIME
    optimize: bool = False
    device: str = DEFAULT_DEVICE
    amp: bool = False
    threads: int = 1  # torch threads per actor: actors sharing a node must not oversubscribe its cores

    def build(self):
        from embedder import Embedder
        from embedder.devices import set_threads

        set_threads(self.threads)
        return Embedder.from_checkpoint(self.model_path, optimize=self.optimize, device=self.device, amp=self.amp,
                                        runtime=self.runtime)


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide: `address` None starts a local Ray (on loopback); `actors` embedding
    actors of `cpus_per_actor` CPUs (fractions allowed) and `gpus_per_actor` GPUs; `writers`
    writer actors for a server (None: 2; a Milvus Lite file is always written by the driver)."""

    address: str | None = None
    actors: int = 1
    cpus_per_actor: float = 0.5
    gpus_per_actor: float = 0.0
    writers: int | None = None
    batch_size: int = 64
    num_cpus: int | None = None  # of a local Ray started here (None: this machine's)
    extra: dict = field(default_factory=dict)  # more ray.init arguments

    def __post_init__(self) -> None:
        if not 1 <= self.actors <= 1024:
            raise ScaleOutError(f"actors must be in [1, 1024], got {self.actors}")
        if not 0 < self.cpus_per_actor <= 256:
            raise ScaleOutError(f"cpus_per_actor must be in (0, 256], got {self.cpus_per_actor}")
        if not 0 <= self.gpus_per_actor <= 16:
            raise ScaleOutError(f"gpus_per_actor must be in [0, 16], got {self.gpus_per_actor}")
        if self.writers is not None and not 1 <= self.writers <= 64:
            raise ScaleOutError(f"writers must be in [1, 64], got {self.writers}")
        if not 1 <= self.batch_size <= 4096:
            raise ScaleOutError(f"batch_size must be in [1, 4096], got {self.batch_size}")
