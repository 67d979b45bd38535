"""A tiny model and catalogue for the service tests: 4 leaves of generated images in Milvus Lite."""

from __future__ import annotations

import contextlib
import io
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ..conftest import LEAVES as LEAF_PATHS

LEAVES = {
    "clothing/tops/shirt": (220, 40, 40),
    "clothing/tops/coat": (200, 90, 40),
    "clothing/bottoms/trouser": (40, 40, 220),
    "footwear/boots/boot": (40, 200, 40),
}
assert tuple(LEAVES) == LEAF_PATHS
PER_LEAF = 5


def png_bytes(colour, seed: int, size: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, size=(size, size, 3)), 0, 255).astype(np.uint8)
    pixels[rng.integers(0, size - 10):, rng.integers(0, size - 10):] //= 2
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Catalogue:
    root: Path
    model: Path
    tree: Path
    files: dict[str, list[Path]]  # leaf -> image files


@pytest.fixture(scope="package")
def catalogue(tmp_path_factory, tiny_model) -> Catalogue:
    """The tiny untrained model and a folder tree of generated images."""
    root = tmp_path_factory.mktemp("service")
    tree = root / "images"
    files: dict[str, list[Path]] = {}
    for n, (leaf, colour) in enumerate(LEAVES.items()):
        (tree / leaf).mkdir(parents=True)
        for i in range(PER_LEAF):
            path = tree / leaf / f"{i}.png"
            path.write_bytes(png_bytes(colour, seed=100 * n + i))
            files.setdefault(leaf, []).append(path)
    return Catalogue(root, tiny_model, tree, files)


def ingest_catalogue(service, catalogue: Catalogue) -> list[str]:
    from hiervec_app import IngestItem

    items = [IngestItem(path, leaf, uri=str(path)) for leaf, paths in catalogue.files.items() for path in paths]
    report = service.index(None).ingest(items)
    assert report.ok and report.stored == len(items)
    return report.ids


@contextlib.contextmanager
def live_server(service):
    """The app over `service` on a free loopback port, served by uvicorn on a thread: yields its base URL."""
    import uvicorn

    from service import create_app

    from ..servers import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
