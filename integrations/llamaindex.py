"""`HiervecEmbedding`: a hiervec model as a LlamaIndex `MultiModalEmbedding` (``pip install 'hiervec[llamaindex]'``).

Images in (paths, ``BytesIO``, bytes, PIL images), the model's image vector out (unit length:
cosine, inner product and L2 rank alike), so `MultiModalVectorStoreIndex` stores and queries
hiervec vectors in any LlamaIndex vector store, Milvus Lite included::

    from integrations.llamaindex import HiervecEmbedding
    embedding = HiervecEmbedding(model_path="model.pt")
    index = MultiModalVectorStoreIndex.from_documents(image_documents, embed_model=embedding,
                                                      image_embed_model=embedding, storage_context=...)
    index.as_retriever(image_similarity_top_k=5).image_to_image_retrieve("query.jpg")

hiervec embeds images only: the text methods raise `NotImplementedError` naming the image ones,
so a text query fails at once instead of ranking by an unrelated vector.
"""

from __future__ import annotations

import asyncio
import io
import os
from typing import Any

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.embeddings import MultiModalEmbedding

from embedder import Embedder

TEXT = ("hiervec embeds images, not text: query with an image (get_image_embedding, "
        "MultiModalVectorIndexRetriever.image_to_image_retrieve)")


def _image(source: Any):
    """What `embedder.decode_image` reads, from LlamaIndex's ImageType (a path or a BytesIO)."""
    if isinstance(source, io.IOBase):
        position = source.tell() if source.seekable() else None
        data = source.read()
        if position is not None:
            source.seek(position)
        return data
    return source


class HiervecEmbedding(MultiModalEmbedding):
    """A hiervec checkpoint (`model_path`) or a ready `Embedder` (`embedder=`) as a LlamaIndex image embedding."""

    model_path: str | None = Field(default=None, description="A checkpoint written by `hiervec train`.")
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N or mps.")
    runtime: str = Field(default="torch", description="torch, onnxruntime, openvino or auto.")
    _embedder: Embedder = PrivateAttr()

    def __init__(self, model_path: str | os.PathLike | None = None, *, embedder: Embedder | None = None,
                 device: str = "auto", runtime: str = "torch", embed_batch_size: int = 32, **kwargs: Any):
        if (model_path is None) == (embedder is None):
            raise ValueError("give model_path (a hiervec checkpoint) or embedder, not both and not neither")
        super().__init__(model_path=None if model_path is None else str(model_path), device=device, runtime=runtime,
                         embed_batch_size=embed_batch_size, **kwargs)
        self._embedder = embedder or Embedder.from_checkpoint(model_path, device=device, runtime=runtime)
        self.model_name = f"hiervec:{self._embedder.fingerprint}"

    @classmethod
    def class_name(cls) -> str:
        return "HiervecEmbedding"

    @property
    def embedder(self) -> Embedder:
        return self._embedder

    @property
    def dim(self) -> int:
        return self._embedder.dim

    def _get_image_embeddings(self, img_file_paths: list) -> list[list[float]]:
        vectors = self._embedder.embed([_image(source) for source in img_file_paths]).concat
        return [row.tolist() for row in vectors]

    def _get_image_embedding(self, img_file_path) -> list[float]:
        return self._get_image_embeddings([img_file_path])[0]

    async def _aget_image_embedding(self, img_file_path) -> list[float]:
        return await asyncio.to_thread(self._get_image_embedding, img_file_path)

    async def _aget_image_embeddings(self, img_file_paths: list) -> list[list[float]]:
        return await asyncio.to_thread(self._get_image_embeddings, img_file_paths)

    def _get_text_embedding(self, text: str) -> list[float]:
        raise NotImplementedError(TEXT)

    def _get_query_embedding(self, query: str) -> list[float]:
        raise NotImplementedError(TEXT)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        raise NotImplementedError(TEXT)
