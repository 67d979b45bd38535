"""Training input that streams from the listing: nothing decoded up front, decoding in loader workers.

`ImageFiles` is the listing as a lazy image array: ``files[i]`` decodes one file to a
``(3, S, S)`` uint8 tensor, ``files[indices]`` is a smaller listing, ``files.decode(...)``
decodes a bounded sample (validation). `training_loader` feeds the training loop: the
class-balanced batches are drawn from the labels alone (`BalancedBatchSampler`, the
seeded `balanced_batches` of one process or of every rank) and handed to a
`torch.utils.data.DataLoader` as its batch sampler, so decoding, resizing and
augmentation run in `workers` processes, and one process and N processes see the same
global batches. A file that fails to decode is left out of its batch and reported; the
epoch goes on.

Memory then depends on the listing (paths and label rows) and on the batches in flight,
not on the number of images: `bench/train_scale.py --memory` measures it.

>>> files = ImageFiles(["a.png", "b.jpg"], size=224)                 # doctest: +SKIP
>>> files.shape, files[0].shape                                      # doctest: +SKIP
((2, 3, 224, 224), torch.Size([3, 224, 224]))
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .devices import available_cpus
from .data import Failure, balanced_batches, decode_image, image_to_tensor, load_images
from .errors import ImageDecodeError


class ImageFiles:
    """Image files at one input size, decoded only when read: a stand-in for a uint8 ``(n, 3, S, S)`` tensor."""

    dtype = torch.uint8

    def __init__(self, paths: Sequence[str | os.PathLike], size: int):
        self.paths = [os.fspath(p) for p in paths]
        self.size = size

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), 3, self.size, self.size)

    @property
    def ndim(self) -> int:
        return 4

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return image_to_tensor(decode_image(self.paths[index]), self.size)  # ImageDecodeError names the file
        if isinstance(index, slice):
            return ImageFiles(self.paths[index], self.size)
        return ImageFiles([self.paths[i] for i in np.asarray(index, dtype=np.int64)], self.size)

    def decode(self, *, workers: int | None = None) -> tuple[torch.Tensor, list[int], list[Failure]]:
        """Every file decoded (threads): ``(uint8 tensor, kept indices, failures)``; for bounded samples."""
        return load_images(self.paths, self.size, workers=workers)


@dataclass
class Batch:
    images: torch.Tensor  # float (b, 3, S, S) in [0, 1], augmented
    positions: torch.Tensor  # int64 (b,): which of the sampler's indices these are (failures left out)
    failures: list[Failure]


class _TrainingImages(Dataset):
    """``dataset[i]``: image `i` as floats in [0, 1], augmented, or the failure that stopped it."""

    def __init__(self, images, augment: Callable[[torch.Tensor], torch.Tensor] | None):
        self.images = images
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        try:
            image = self.images[index]
        except ImageDecodeError as exc:
            return None, Failure(exc.source, exc.reason)
        image = image.float().div_(255)
        if self.augment is None:
            return image, None
        with torch.random.fork_rng(devices=[]):  # this sample's own stream: the same crop in any worker, after any resume
            # the CPU generator alone, the one fork_rng restores: torch.manual_seed also seeds every
            # accelerator backend, which before CUDA starts queues the call with a formatted stack
            # (0.5 to 1 ms a sample on a 2-core CPU, more under a deeper stack) and on a GPU would
            # leave the CUDA generator reseeded by every sample
            torch.default_generator.manual_seed(seed)
            return self.augment(image), None


def _collate(items) -> Batch:
    kept = [i for i, (image, _) in enumerate(items) if image is not None]
    failures = [failure for _, failure in items if failure is not None]
    images = torch.stack([items[i][0] for i in kept]) if kept else torch.empty(0)
    return Batch(images, torch.tensor(kept, dtype=torch.int64), failures)


def _pin(batch: Batch) -> Batch:
    return Batch(batch.images.pin_memory(), batch.positions, batch.failures)


class BalancedBatchSampler(Sampler[list[tuple[int, int]]]):
    """One epoch of `balanced_batches`: `steps` batches of this rank, drawn from the labels alone with the
    seeded `rng` (advanced as they are drawn, so the next epoch continues the sequence).

    Each batch is a list of ``(index, augmentation seed)``: a sample's seed follows from `seed`,
    its step and its place in the batch, so its augmentation does not depend on which worker
    draws it or on where a run was resumed. `skip` draws the first batches without yielding
    them: an epoch resumed after `skip` steps goes on with the batches it would have had.
    """

    def __init__(self, leaf_labels: np.ndarray, classes_per_batch: int, per_class: int, steps: int,
                 rng: np.random.Generator, *, rank: int = 0, world_size: int = 1, seed: int = 0, skip: int = 0):
        self.batches = balanced_batches(leaf_labels, classes_per_batch, per_class, steps, rng, rank=rank,
                                        world_size=world_size)
        self.steps, self.seed, self.skip = steps, seed, skip

    def __len__(self) -> int:
        return self.steps - self.skip

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step, batch in enumerate(self.batches):
            if step >= self.skip:
                base = (self.seed * 1_000_003 + step) * 4096
                yield [(int(index), (base + position) % 2**63) for position, index in enumerate(batch)]


def training_loader(images, sampler: BalancedBatchSampler, augment, *, workers: int = 0,
                    pin_memory: bool = False) -> Iterator[tuple[list[int], Batch]]:
    """The epoch's batches in order: (the sampler's indices, the decoded and augmented `Batch`).

    With `workers` > 0, decoding and augmentation run in that many processes (each with one
    torch thread and its own seeded random stream); with 0, in this thread, in batch order.
    """
    indices: list[list[int]] = []

    class Recorded(Sampler[list[int]]):  # the indices of each batch, in the order the loader asked for them
        def __len__(self) -> int:
            return len(sampler)

        def __iter__(self):
            for batch in sampler:
                indices.append([index for index, _ in batch])
                yield batch

    generator = torch.Generator().manual_seed(sampler.seed)  # the loader's own draws leave the global RNG alone
    loader = DataLoader(_TrainingImages(images, augment), batch_sampler=Recorded(), num_workers=workers,
                        collate_fn=_collate, generator=generator, worker_init_fn=_one_thread if workers else None,
                        persistent_workers=False, prefetch_factor=2 if workers else None,
                        multiprocessing_context=worker_start_method() if workers else None)
    for step, batch in enumerate(loader):
        yield indices[step], (_pin(batch) if pin_memory and len(batch.images) else batch)


def worker_start_method() -> str | None:
    """How loader workers start: None (the platform's default: fork on Linux, fast) unless this
    process has loaded gRPC (a Milvus client, whose channels may be live): gRPC does not support
    fork without exec once it runs, and a fork then can crash the parent. Such a process starts
    its workers from a fork server, a clean process of its own that has imported torch and
    torchvision: each worker unpickles the augmentations (torchvision transforms), and importing
    torchvision in every worker of every epoch took 2.4 s a worker here (most of it torch._dynamo)."""
    if "grpc" not in sys.modules or "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    multiprocessing.get_context("forkserver").set_forkserver_preload(["torch", "torchvision", "embedder.streaming"])
    return "forkserver"


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # workers share the machine's cores with the training process


def default_workers(local_world_size: int = 1, device_type: str | None = None) -> int:
    """Loader processes per training process. On an accelerator (`device_type` cuda, mps, or None):
    this machine's cores shared among its processes, one core each left to the training step (at
    least 1, at most 8). On CPUs, 0: the training step itself uses every core, and decoding in
    its thread between steps costs less than loader processes competing with it for the cores
    (BENCHMARKS.md, "Training on catalogues bigger than memory")."""
    if device_type == "cpu":
        return 0
    cores = available_cpus()
    return max(1, min(8, cores // max(1, local_world_size) - 1))
