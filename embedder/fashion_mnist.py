"""Fashion-MNIST as a 3-level catalogue: department > category > item.

| department | category         | items                                  |
|------------|------------------|----------------------------------------|
| clothing   | tops             | t-shirt-top, pullover, coat, shirt     |
| clothing   | bottoms          | trouser                                |
| clothing   | dresses          | dress                                  |
| footwear   | sandals-sneakers | sandal, sneaker                        |
| footwear   | boots            | ankle-boot                             |
| bags       | bags             | bag                                    |

Read from Debian's ``dataset-fashion-mnist`` package when installed, else downloaded by
torchvision into `download_dir`.

The product-level variant (`product_photos`, `export_products`) adds a fourth level:
each source image is one product, photographed several times (random shift, scale,
rotation, flip and brightness), as in Stanford Online Products, where many products with
a few photos each sit under recognisable categories. Train and test products come from
Fashion-MNIST's own train and test splits, so test products are never seen in training.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataError
from .hierarchy import Hierarchy

LEVEL_NAMES = ("department", "category", "item")
PRODUCT_LEVEL_NAMES = (*LEVEL_NAMES, "product")
CLASS_PATHS = (
    "clothing/tops/t-shirt-top",
    "clothing/bottoms/trouser",
    "clothing/tops/pullover",
    "clothing/dresses/dress",
    "clothing/tops/coat",
    "footwear/sandals-sneakers/sandal",
    "clothing/tops/shirt",
    "footwear/sandals-sneakers/sneaker",
    "bags/bags/bag",
    "footwear/boots/ankle-boot",
)  # index = Fashion-MNIST's label
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {"train": "train-{}-idx{}-ubyte.gz", "test": "t10k-{}-idx{}-ubyte.gz"}
SPLITS = ("train", "test")
SPLIT_SIZES = {"train": 60_000, "test": 10_000}


def hierarchy() -> Hierarchy:
    return Hierarchy.from_paths(CLASS_PATHS, LEVEL_NAMES)


def load(split: str, *, root: str | os.PathLike | None = None, download_dir: str | os.PathLike | None = None):
    """``(images uint8 (n, 28, 28), class labels int64 (n,))`` of `split` ('train' or 'test').

    `root` is a folder with the four ``*-ubyte.gz`` files (default: Debian's); when it
    lacks them, torchvision downloads the data set into `download_dir`.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    folder = Path(root) if root is not None else DEBIAN_DIR
    images_file = folder / _FILES[split].format("images", 3)
    labels_file = folder / _FILES[split].format("labels", 1)
    if images_file.is_file() and labels_file.is_file():
        return _read_idx(images_file), _read_idx(labels_file).astype(np.int64)
    return _download(split, download_dir or Path.home() / ".cache" / "hiervec" / "fashion-mnist", folder)


def product_photos(images: np.ndarray, photos: int, *, seed: int = 0) -> np.ndarray:
    """``photos`` random views of each ``(28, 28)`` uint8 image: ``(n, photos, 28, 28)`` uint8.

    Each view shifts (up to 10%), scales (0.8-1.1), rotates (up to 15 degrees), maybe
    flips and changes the brightness (up to 30%) of its product; the same `seed` gives
    the same photos.
    """
    import torch
    from torchvision.transforms import v2

    if photos < 1:
        raise DataError(f"photos must be positive, got {photos}")
    camera = v2.Compose([
        v2.RandomAffine(degrees=15, translate=(0.1, 0.1), scale=(0.8, 1.1)),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=0.3),
    ])
    source = torch.from_numpy(np.array(images, dtype=np.uint8))[:, None]  # a writable copy
    out = np.empty((len(images), photos, *images.shape[1:]), dtype=np.uint8)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU generator, which fork_rng restores (streaming.py says why)
        for i, image in enumerate(source):
            for j in range(photos):
                out[i, j] = camera(image)[0].numpy()
    return out


def products(split: str, count: int, photos: int, *, offset: int = 0, seed: int = 0, root=None):
    """Products ``offset .. offset+count-1`` of `split`: (photos ``(count, photos, 28, 28)``, class labels).

    The photo seed mixes in the split and offset, so disjoint ranges get unrelated views.
    """
    images, labels = load(split, root=root)
    if count < 1 or offset < 0 or offset + count > len(images):
        raise DataError(f"products {offset}..{offset + count - 1} are outside the {len(images)} images of {split!r}")
    chosen = slice(offset, offset + count)
    mixed = seed * 1_000_003 + SPLITS.index(split) * 100_003 + offset
    return product_photos(images[chosen], photos, seed=mixed), labels[chosen]


def product_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}"


def export_products(
    out: str | os.PathLike,
    *,
    split: str = "test",
    count: int = 1000,
    photos: int = 5,
    offset: int = 0,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write products as ``out/<department>/<category>/<item>/<split>-<index>/<photo>.png``.

    Levels: `PRODUCT_LEVEL_NAMES`. Returns the number of photos exported; files already
    there are left as they are. `progress(n)` is called with each product's photo count.
    """
    views, labels = products(split, count, photos, offset=offset, seed=seed, root=root)
    out = Path(out)
    for i, (product, label) in enumerate(zip(views, labels)):
        folder = out / CLASS_PATHS[label] / product_name(split, offset + i)
        folder.mkdir(parents=True, exist_ok=True)
        for j, photo in enumerate(product):
            target = folder / f"{j}.png"
            if not target.exists():
                Image.fromarray(photo, mode="L").save(target)
        if progress is not None:
            progress(len(product))
    return count * photos


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: {array.size} values for shape {shape}")
    return array.reshape(shape)


def _download(split: str, download_dir: str | os.PathLike, searched: Path):
    from torchvision.datasets import FashionMNIST

    try:
        data = FashionMNIST(str(download_dir), train=split == "train", download=True)
    except Exception as exc:  # URLError, HTTPError, RuntimeError from torchvision
        raise DataError(
            f"Fashion-MNIST is not in {searched} and cannot be downloaded ({exc}); "
            f"on Debian: apt-get install dataset-fashion-mnist"
        ) from exc
    return data.data.numpy(), data.targets.numpy().astype(np.int64)


def export_folder_tree(
    out: str | os.PathLike,
    *,
    split: str = "test",
    limit: int | None = None,
    root: str | os.PathLike | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write `split` ('train', 'test' or 'all') as ``out/<department>/<category>/<item>/<name>.png``.

    `limit` takes the first N images of each split (the files are already shuffled).
    Returns the number of images exported; files already there are left as they are.
    `progress(1)` is called after each image.
    """
    splits = SPLITS if split == "all" else (split,)
    if split != "all" and split not in SPLITS:
        raise DataError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be positive, got {limit}")
    out = Path(out)
    written = 0
    for name in splits:
        images, labels = load(name, root=root)
        count = len(images) if limit is None else min(limit, len(images))
        for folder in {CLASS_PATHS[c] for c in labels[:count]}:
            (out / folder).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            target = out / CLASS_PATHS[labels[index]] / f"{name}-{index:05d}.png"
            if not target.exists():
                Image.fromarray(images[index], mode="L").save(target)
            written += 1
            if progress is not None:
                progress(1)
    return written
