"""Training across processes and machines with `torchrun` and DistributedDataParallel.

torchrun starts one process per device and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
and ``LOCAL_WORLD_SIZE``; `DistributedContext.from_environment` reads them and
`process_group` joins the group (NCCL on CUDA, gloo on CPU) with a timeout, so a rank that
stops answering fails the job instead of hanging it. `train` then wraps the model in
DDP when the group has more than one process.

What makes a run on N processes the same as one process on the N local batches together:
- `balanced_batches` draws the global batch from one seeded generator on every rank and
  gives each rank its own leaf classes (disjoint, so positive pairs never straddle ranks);
- the contrastive loss sees the global batch (`GlobalBatchLoss`): every rank gathers
  the vectors and labels of all ranks, its own part keeping its gradient, and scales the
  gradient by the world size, so DDP's averaging yields the gradient of the loss on the
  whole batch. Per-image losses (softmax) are means over equal local batches, which DDP's
  average already turns into the global mean.
- batch norm: `SyncBatchNorm` on CUDA (statistics over the global batch) and, on CPUs,
  where torch's `SyncBatchNorm` does not run, the batch-norm layers in eval mode (the
  backbone's running statistics), chosen by `TrainConfig.batch_norm`.

>>> DistributedContext().enabled, DistributedContext(rank=1, world_size=2).is_main
(False, False)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from .devices import resolve_device
from .errors import ConfigError, DistributedError
from .train_config import DIST_TIMEOUT_S

DEFAULT_TIMEOUT_S = DIST_TIMEOUT_S  # a collective that waits longer than this fails the job (torch's own default)


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the job: its rank among `world_size`, and on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank must be in [0, world_size), got rank {self.rank} of {self.world_size}")
        if self.local_world_size < 1 or not 0 <= self.local_rank < self.local_world_size:
            raise ConfigError(f"local rank must be in [0, local_world_size), got {self.local_rank} "
                              f"of {self.local_world_size}")

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> DistributedContext:
        """The variables torchrun sets; one process of one when they are absent."""
        env = os.environ if environ is None else environ

        def number(name: str, default: int) -> int:
            value = env.get(name)
            if value is None or value == "":
                return default
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"environment variable {name} must be an integer, got {value!r}") from None

        world_size = number("WORLD_SIZE", 1)
        return cls(number("RANK", 0), world_size, number("LOCAL_RANK", 0),
                   number("LOCAL_WORLD_SIZE", world_size if "WORLD_SIZE" in env else 1))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> DistributedContext:
    """The context of the process group this process has joined (one process of one if none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistributedContext()
    local = DistributedContext.from_environment()
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local.local_rank, local.local_world_size)


def process_device(context: DistributedContext, device: str | torch.device | None) -> torch.device:
    """The device of this process: with several processes on CUDA, the GPU of its local rank."""
    resolved = resolve_device(device)
    if resolved.type == "cuda" and context.enabled and resolved.index is None:
        if context.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {context.local_rank} has no GPU: this machine has "
                              f"{torch.cuda.device_count()}; start at most that many processes per node")
        resolved = torch.device("cuda", context.local_rank)
    return resolved


@contextlib.contextmanager
def process_group(context: DistributedContext, device: str | torch.device | None = "auto", *,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[torch.device]:
    """Join the job's process group for the duration (when it has more than one process); yields the device.

    NCCL on CUDA, gloo otherwise; rendezvous through torchrun's ``MASTER_ADDR``/``MASTER_PORT``.
    """
    resolved = process_device(context, device)
    if not context.enabled:
        yield resolved
        return
    if timeout_s <= 0:
        raise ConfigError(f"the process group timeout must be positive, got {timeout_s} s")
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, rank=context.rank, world_size=context.world_size,
                                timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"rank {context.rank} could not join the {backend} process group of "
                               f"{context.world_size}: {exc}") from exc
    try:
        yield resolved
    finally:
        dist.destroy_process_group()


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor`, concatenated in rank order; this rank's part keeps its gradient.

    All ranks must pass tensors of one shape (equal local batches).
    """
    context = current()
    if not context.enabled:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(context.world_size)]
    dist.all_gather(parts, tensor.detach().contiguous())
    parts[context.rank] = tensor
    return torch.cat(parts)


class GlobalBatchLoss(nn.Module):
    """A loss over pairs computed on the global batch of all ranks.

    The value is the loss of the whole batch, the same on every rank (what one process
    would log); the gradient is scaled by the world size, because each rank back-propagates
    only through its own vectors and DDP averages the ranks' gradients: the average of the
    parts is the whole gradient divided by the world size.
    """

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        world_size = current().world_size
        value = self.loss(gather_with_grad(embeddings), gather_with_grad(labels))
        if world_size == 1:
            return value
        return value * world_size - value.detach() * (world_size - 1)


def mean_across_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each value over the ranks (every rank must call it with the same keys)."""
    context = current()
    if not context.enabled or not values:
        return values
    stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(stacked)
    return dict(zip(values, (stacked / context.world_size).tolist()))


def check_same_on_every_rank(what: str, values: list[int], device: torch.device) -> None:
    """Fail clearly when the ranks disagree on `values` (e.g. they read different data)."""
    context = current()
    if not context.enabled:
        return
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(context.world_size)]
    dist.all_gather(gathered, mine)
    rows = [g.tolist() for g in gathered]
    if any(row != rows[0] for row in rows):
        detail = ", ".join(f"rank {r}: {row}" for r, row in enumerate(rows))
        raise DistributedError(f"the processes disagree on {what} ({detail}): every process must read the same "
                               f"data and checkpoint")


def broadcast_from_main(value: float, device: torch.device) -> float:
    """Rank 0's `value` on every rank (a decision only rank 0 can take, e.g. to stop early)."""
    if not current().enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, 0)
    return float(tensor.item())


def barrier() -> None:
    if current().enabled:
        dist.barrier()
