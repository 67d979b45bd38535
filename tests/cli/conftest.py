"""The CLI's tests share a tiny generated folder tree and a model trained on it (`workspace`)."""

import hashlib
import shutil

import numpy as np
import pytest
from PIL import Image

from ..commands import run_json

LEAVES = {
    "clothing/tops/shirt": (220, 40, 40),
    "clothing/tops/coat": (200, 90, 40),
    "clothing/bottoms/trouser": (40, 40, 220),
    "footwear/boots/boot": (40, 200, 40),
}
PER_LEAF = 6


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    tree = root / "images"
    for leaf, colour in LEAVES.items():
        (tree / leaf).mkdir(parents=True)
        for i in range(PER_LEAF):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, size=(40, 40, 3)), 0, 255).astype(np.uint8)
            pixels[rng.integers(0, 30):, rng.integers(0, 30):] //= 2  # a shape, so images differ
            Image.fromarray(pixels).save(tree / leaf / f"{i}.png")
    model = root / "model.pt"
    summary = run_json("train", tree, "--out", model, "--levels", "department,category,item", "--backbone", "resnet18",
                       "--weights", "none", "--epochs", "1", "--steps-per-epoch", "2", "--image-size", "32",
                       "--dim", "8", "--val-fraction", "0.3")
    assert summary["epochs"] == 1 and summary["images"] == len(LEAVES) * PER_LEAF
    assert "val/recall@1" in summary["metrics"]
    yield root, tree, model
    shutil.rmtree(root, ignore_errors=True)  # a module's checkpoints (about 135 MB) do not wait for the session's end


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()
