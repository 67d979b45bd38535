"""`HiervecEmbedding` through LlamaIndex's own API: `MultiModalVectorStoreIndex` on LlamaIndex's Milvus
vector store over a Milvus Lite file, image documents in, an image query out."""

import io

import numpy as np
import pytest

from embedder import Embedder

from ..conftest import needs
from .conftest import images

pytestmark = [pytest.mark.lite,
              needs("llama_index.core", "LlamaIndex is not installed (pip install 'hiervec[llamaindex]')"),
              needs("llama_index.vector_stores.milvus",
                    "llama-index-vector-stores-milvus is not installed (make venv installs it)")]


def test_image_documents_in_an_image_query_out_on_milvus_lite(tree, tiny_model, tmp_path):
    from llama_index.core import StorageContext
    from llama_index.core.indices import MultiModalVectorStoreIndex
    from llama_index.core.schema import ImageDocument
    from llama_index.vector_stores.milvus import MilvusVectorStore

    from integrations.llamaindex import HiervecEmbedding

    embedding = HiervecEmbedding(model_path=tiny_model, device="cpu")
    files = images(tree)
    documents = [ImageDocument(image_path=str(path), metadata={"category": path.parent.relative_to(tree).as_posix()})
                 for path in files]
    store = MilvusVectorStore(uri=str(tmp_path / "llama.db"), collection_name="images",
                              dim=embedding.dim, overwrite=True)
    index = MultiModalVectorStoreIndex.from_documents(
        documents, storage_context=StorageContext.from_defaults(image_store=store),
        embed_model=embedding, image_embed_model=embedding)

    query = files[7]
    found = index.as_retriever(image_similarity_top_k=4).image_to_image_retrieve(str(query))
    # the same neighbours as hiervec's own vectors by cosine, the query image first
    vectors = Embedder.from_checkpoint(tiny_model, device="cpu").embed(files).concat
    expected = [str(files[i]) for i in np.argsort(-(vectors @ vectors[7]), kind="stable")[:4]]
    assert [hit.node.image_path for hit in found] == expected and expected[0] == str(query)
    assert found[0].score == pytest.approx(1.0, abs=1e-4)
    assert found[0].node.metadata["category"] == query.parent.relative_to(tree).as_posix()


def test_the_embedding_reads_what_llamaindex_hands_it(tree, tiny_model):
    from integrations.llamaindex import HiervecEmbedding

    embedding = HiervecEmbedding(model_path=tiny_model, device="cpu")
    path = images(tree)[0]
    by_path = embedding.get_image_embedding(str(path))
    buffer = io.BytesIO(path.read_bytes())
    assert np.allclose(embedding.get_image_embedding(buffer), by_path, atol=1e-6) and buffer.tell() == 0
    assert len(by_path) == embedding.dim == 24 and np.isclose(np.linalg.norm(by_path), 1.0, atol=1e-5)
    batch = embedding.get_image_embedding_batch([str(p) for p in images(tree)[:3]])
    assert np.allclose(batch[0], by_path, atol=1e-6) and len(batch) == 3
    assert embedding.model_name == f"hiervec:{embedding.embedder.fingerprint}"
    with pytest.raises(NotImplementedError, match="hiervec embeds images, not text"):
        embedding.get_query_embedding("a red shirt")
    with pytest.raises(ValueError, match="give model_path .* or embedder"):
        HiervecEmbedding()
