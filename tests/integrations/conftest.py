"""A tiny catalogue for the integrations' tests: the service tests' coloured images in a folder tree."""

from pathlib import Path

import pytest

from ..service.conftest import LEAVES, PER_LEAF, png_bytes


@pytest.fixture(scope="package")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("integrations") / "images"
    for n, (leaf, colour) in enumerate(LEAVES.items()):
        (root / leaf).mkdir(parents=True)
        for i in range(PER_LEAF):
            (root / leaf / f"{i}.png").write_bytes(png_bytes(colour, seed=100 * n + i))
    return root


def images(tree: Path) -> list[Path]:
    return sorted(tree.rglob("*.png"))
