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


@pytest.fixture(scope="session")
def s3_catalogue(tmp_path_factory):
    """A catalogue in an S3 stand-in (moto's server on loopback) and a manifest of it.

    Three images of each of `LEAVES` under ``s3://catalogue/images/<leaf>/``, one more the
    reader is denied (``denied.png``, first leaf), and a CSV manifest listing them with an
    object that does not exist (second leaf), a local file (third leaf) and a ``file://`` URL
    (fourth leaf). Tests set `server.environment` (the ``AWS_*`` variables) to read it.
    """
    pytest.importorskip("moto", reason="moto is not installed: pip install 'moto[server]' (the dev extra has it)")
    pytest.importorskip("s3fs", reason="s3fs is not installed: pip install 'hiervec[s3]' (the dev extra has it)")
    import csv
    import io
    from types import SimpleNamespace

    from PIL import Image

    from .servers import S3StandIn

    rng = np.random.default_rng(11)

    def png() -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, size=(40, 40, 3), dtype=np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    objects = {f"images/{leaf}/{i}.png": png() for leaf in LEAVES for i in range(3)}
    objects["images/denied.png"] = png()
    folder = tmp_path_factory.mktemp("s3-catalogue")
    local, via_url = folder / "local.png", folder / "local via url.png"
    local.write_bytes(png())
    via_url.write_bytes(png())
    with S3StandIn("catalogue", objects, denied=("images/denied.png",)) as server:
        rows = [(server.url(key), key.split("/", 1)[1].rsplit("/", 1)[0]) for key in objects if key != "images/denied.png"]
        rows += [(server.url("images/denied.png"), LEAVES[0]), (server.url("images/missing.png"), LEAVES[1]),
                 (str(local), LEAVES[2]), (via_url.as_uri(), LEAVES[3])]
        manifest = folder / "manifest.csv"
        with open(manifest, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "category"])
            writer.writerows(rows)
        yield SimpleNamespace(server=server, manifest=manifest, rows=rows, denied=server.url("images/denied.png"),
                              missing=server.url("images/missing.png"), local=local, via_url=via_url)


@pytest.fixture
def s3_environment(s3_catalogue, monkeypatch):
    """The credentials and endpoint of `s3_catalogue`'s reader in this process's environment, as s3fs reads them."""
    for key, value in s3_catalogue.server.environment.items():
        monkeypatch.setenv(key, value)
    return s3_catalogue
