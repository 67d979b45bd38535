"""What the application room needs from a model: two small protocols (`embedder.Embedder` has both)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from hiervec_core.vectors import LevelVectors


@runtime_checkable
class ImageEmbedder(Protocol):
    """What `ImageIndex` needs from a model."""

    level_names: tuple[str, ...]
    level_dims: tuple[int, ...]  # empty when the model has only the image vector
    dim: int
    fingerprint: str

    def prepare(self, image: Any) -> Any:
        """Decode one image (bytes, path, PIL image); raise with a readable reason when it cannot."""

    def embed(self, prepared: Sequence[Any]) -> LevelVectors:
        """The vectors of prepared images."""


@runtime_checkable
class CategoryPredictor(Protocol):
    """A model that also predicts category paths (`embedder.Embedder` is one). With it, images
    without a category path get the model's prediction, flagged as predicted; queries can be
    routed to their predicted category; stored predictions can be redone (`relabel`)."""

    categories: Mapping[str, Collection[str]]  # level -> the category paths the model knows

    def predict_vectors(self, vectors: LevelVectors) -> list:
        """One prediction per row, each with ``.path`` and ``.probabilities`` ({level: p})."""
