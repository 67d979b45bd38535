"""Where the model runs: device choice, mixed precision and thread counts.

The library never changes process-wide settings on its own: `resolve_device` only
answers, and `set_threads` is called by a face (the CLI, the service), once per process.

>>> resolve_device("cpu")
device(type='cpu')
>>> Precision.for_device(torch.device("cpu"), amp=True).dtype
torch.bfloat16
>>> Precision.for_device(torch.device("cpu"), amp=False).autocast().__class__.__name__
'nullcontext'
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

import torch

from .errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device for `spec`: ``auto`` (CUDA if available, else MPS, else CPU), ``cpu``,
    ``cuda``, ``cuda:N`` or ``mps``. A device this machine does not have is a `ConfigError`."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = "auto" if spec is None else str(spec).strip().lower()
    if not _DEVICE.match(spec):
        raise ConfigError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {spec!r}")
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} asked for, but torch sees no CUDA GPU here "
                              f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {spec!r} asked for, but this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not _mps_available():
        raise ConfigError("device 'mps' asked for, but torch's MPS backend is not available here")
    return device


@dataclass(frozen=True)
class Precision:
    """Mixed precision for one device: autocast's dtype (None: float32) and whether training
    scales the loss (float16 on CUDA needs a `GradScaler`; bfloat16 does not).

    `--amp` picks bfloat16 on CPUs and on GPUs that support it, float16 with loss scaling on
    older CUDA GPUs, float16 on MPS. Whatever runs inside, vectors leave the model as float32.
    """

    device_type: str
    dtype: torch.dtype | None = None

    @classmethod
    def for_device(cls, device: torch.device, amp: bool) -> Precision:
        if not amp:
            return cls(device.type)
        if device.type == "cuda":
            return cls("cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        if device.type == "mps":
            return cls("mps", torch.float16)
        return cls(device.type, torch.bfloat16)

    @property
    def scales_loss(self) -> bool:
        return self.device_type == "cuda" and self.dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A scaler that scales only where the dtype needs it (disabled scalers pass the loss through)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.scales_loss)

    def __str__(self) -> str:
        return "float32" if self.dtype is None else str(self.dtype).removeprefix("torch.") + " autocast"


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), not every core of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads(local_processes: int = 1) -> int:
    """One process's share of the CPUs when `local_processes` torch processes share this machine."""
    if local_processes < 1:
        raise ConfigError(f"local_processes must be at least 1, got {local_processes}")
    return max(1, available_cpus() // local_processes)


def set_threads(threads: int) -> None:
    """Set torch's intra-op thread count for this process (a face calls it, once, before the work)."""
    if threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
