"""`train_listing`: a labelled source listing to a checkpoint in one call (what `hiervec train` runs),
in one process or as one rank of a torchrun job.

    >>> summary = train_listing(read_source("data/train"), "model.pt", TrainConfig(epochs=3))  # doctest: +SKIP
    >>> summary.to_dict()["fingerprint"]                                                       # doctest: +SKIP
    '3c1f...'
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hiervec_core.names import DEFAULT_BACKBONE, IMAGE_SIZE_RANGE

from .checkpoint import Checkpoint
from .config import EmbedderConfig
from .data import SourceListing, default_image_size
from .distributed import DistributedContext, process_group
from .errors import DataError
from .hierarchy import Hierarchy
from .streaming import ImageFiles, default_workers
from .train_config import DEFAULT_DIM, DEFAULT_MODE, DEFAULT_WEIGHTS, DIST_TIMEOUT_S, TrainConfig
from .training import train


@dataclass
class TrainSummary:
    """What a training job wrote (None on the ranks other than 0: rank 0 reports)."""

    out: str
    checkpoint: Checkpoint | None
    images: int  # trained on (listed, labelled, decoded)
    skipped: list = field(default_factory=list)  # listing failures and files that did not decode, each once
    seconds: float = 0.0
    processes: int = 1

    def to_dict(self) -> dict:
        checkpoint = self.checkpoint
        summary = {"checkpoint": self.out, "fingerprint": checkpoint.vector_fingerprint, "epochs": checkpoint.epoch,
                   "images": self.images, "skipped": len(self.skipped), "seconds": round(self.seconds, 1),
                   "metrics": checkpoint.metrics, "processes": self.processes}
        if checkpoint.calibration:
            summary["calibration"] = checkpoint.calibration
        if checkpoint.selection:
            summary["selection"] = checkpoint.selection
        return summary


def train_listing(
    listing: SourceListing,
    out: str | os.PathLike,
    train_config: TrainConfig = TrainConfig(),
    *,
    levels: Sequence[str] | None = None,
    pad: bool = False,
    backbone: str = DEFAULT_BACKBONE,
    weights: str | None = DEFAULT_WEIGHTS,
    image_size: int | None = None,
    dim: int = DEFAULT_DIM,
    mode: str = DEFAULT_MODE,
    resume: bool = False,
    device: str = "auto",
    amp: bool = False,
    workers: int | None = None,
    dist_timeout_s: float = DIST_TIMEOUT_S,
    log: Callable[[str], None] | None = None,
) -> TrainSummary:
    """Train on the labelled items of `listing` and write the checkpoint `out`.

    The hierarchy comes from the category paths (`levels` names the levels, coarsest first;
    `pad` accepts shorter paths); `image_size` None reads it from the data; `weights` is the
    backbone's start (``imagenet``, a file, or None / ``none`` for random). Under torchrun
    (``RANK``/``WORLD_SIZE`` set) this process is one rank of the job. `log` gets progress
    lines (rank 0's only).
    """
    context = DistributedContext.from_environment()
    say = log if (log is not None and context.is_main) else (lambda line: None)
    labelled = [item for item in listing.items if item.category is not None]
    if not labelled:
        raise DataError("the listing holds no labelled images")
    hierarchy = Hierarchy.from_paths([item.category for item in labelled], levels, pad=pad)
    if image_size is None:
        image_size, why = default_image_size([item.path for item in labelled], bounds=IMAGE_SIZE_RANGE)
        say(f"image size {image_size} px: {why}")
    images = ImageFiles([item.path for item in labelled], image_size)  # decoded batch by batch, in the loader
    labels = hierarchy.encode_many([item.category for item in labelled], pad=pad)
    config = EmbedderConfig.for_hierarchy(hierarchy, dim=dim, backbone=backbone, image_size=image_size, mode=mode)
    say(f"training {mode} {backbone} on {len(labelled)} images at {image_size} px, levels "
        f"{', '.join(f'{n} ({c})' for n, c in zip(hierarchy.level_names, hierarchy.num_classes))}")
    started = time.perf_counter()
    with process_group(context, device, timeout_s=dist_timeout_s) as process_device:
        if workers is None:
            workers = default_workers(context.local_world_size, process_device.type)
        result = train(images, labels, hierarchy, config, train_config, out=out,
                       backbone_weights=None if weights in (None, "none") else weights, resume=resume,
                       device=process_device, amp=amp, workers=workers, log=say)
    failures = list({failure.source: failure for failure in result.failures}.values())  # each file once
    return TrainSummary(str(out), result.checkpoint, len(labelled) - len(failures),
                        list(listing.failures) + failures, time.perf_counter() - started, context.world_size)
