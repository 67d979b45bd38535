"""The embedder's exception tree: catch `EmbedderError` to handle any of them."""

from __future__ import annotations


class EmbedderError(Exception):
    """Base of every error raised by `embedder`."""


class HierarchyError(EmbedderError, ValueError):
    """A category path or level name that the hierarchy cannot accept."""


class ConfigError(EmbedderError, ValueError):
    """An `EmbedderConfig` or `TrainConfig` value out of range."""


class WeightsNotFoundError(EmbedderError, FileNotFoundError):
    """Pretrained weights that were asked for but cannot be found or loaded."""


class CheckpointError(EmbedderError):
    """A checkpoint file that is missing, unreadable or of another format."""


class ImageDecodeError(EmbedderError):
    """An image file that cannot be decoded; `source` names it, `reason` says why."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class DataError(EmbedderError, ValueError):
    """A data source (folder tree, manifest) that cannot be read as labelled images."""


class DistributedError(EmbedderError):
    """A multi-process job that cannot start or go on: a process group that cannot form, a
    rank that stopped answering, ranks that read different data."""
