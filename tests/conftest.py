import os
from pathlib import Path

import numpy as np
import pytest

LEVELS = ("department", "category", "item")
LEAVES = ("clothing/tops/shirt", "clothing/tops/coat", "clothing/bottoms/trouser", "footwear/boots/boot")


@pytest.fixture(scope="session", autouse=True)
def export_cache(tmp_path_factory) -> Path:
    """Models exported for ONNX Runtime and OpenVINO (`--runtime`) go to a folder of this run, not ~/.cache."""
    folder = tmp_path_factory.mktemp("export-cache")
    os.environ["HIERVEC_CACHE"] = str(folder)  # also for the `hiervec serve` processes tests start
    return folder


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """An untrained, seeded resnet18 checkpoint (32 px, 8 dims per level) for `LEAVES`: fast, deterministic.

    Its classifiers' scale is 1, so its untrained predictions are unsure (no probability
    of 1), as routing and relabel tests need.
    """
    import torch

    from embedder import EmbedderConfig, Hierarchy, PyramidEmbedder, save_checkpoint

    hierarchy = Hierarchy.from_paths(list(LEAVES), LEVELS)
    torch.manual_seed(0)
    config = EmbedderConfig.for_hierarchy(hierarchy, dim=8, backbone="resnet18", image_size=32, fpn_channels=16,
                                          classifier_scale=1.0)
    path = tmp_path_factory.mktemp("tiny-model") / "model.pt"
    save_checkpoint(path, PyramidEmbedder(config), hierarchy)
    return path


@pytest.fixture(scope="session")
def lite_server(tmp_path_factory):
    """A `milvus-lite server` on a free loopback port, for client/server tests."""
    from .servers import LiteServer

    with LiteServer(tmp_path_factory.mktemp("milvus-lite-server")) as server:
        yield server.uri


@pytest.fixture(scope="session")
def embedded_milvus_server(tmp_path_factory):
    """The real Milvus 2.3 standalone of PyPI's `milvus` package (`milvus-server`), without Docker:
    one for the session (it takes a minute to start and to stop)."""
    from .servers import EmbeddedMilvus

    if EmbeddedMilvus.executable() is None:
        pytest.skip("PyPI's `milvus` package (milvus-server, Milvus 2.3 standalone) is not installed; "
                    "pip install 'milvus==2.3.5' (x86_64 Linux)")
    with EmbeddedMilvus(tmp_path_factory.mktemp("milvus-server")) as server:
        yield server


@pytest.fixture(scope="session")
def embedded_milvus(embedded_milvus_server) -> str:
    """The address of `embedded_milvus_server`."""
    return embedded_milvus_server.uri
