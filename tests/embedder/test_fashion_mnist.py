import gzip

import numpy as np
import pytest
from PIL import Image

from embedder import DataError, read_folder_tree
from embedder import fashion_mnist

pytestmark = pytest.mark.unit


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def idx_root(tmp_path):
    images = np.arange(4 * 28 * 28, dtype=np.uint32).reshape(4, 28, 28) % 256
    labels = np.array([9, 0, 8, 9])
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    return tmp_path, images, labels


def test_reads_idx_files_from_a_local_folder(idx_root):
    root, images, labels = idx_root
    got_images, got_labels = fashion_mnist.load("test", root=root)
    assert got_images.shape == (4, 28, 28) and np.array_equal(got_images, images)
    assert got_labels.tolist() == [9, 0, 8, 9]


def test_export_writes_the_three_level_tree(idx_root, tmp_path):
    root, images, _ = idx_root
    out = tmp_path / "tree"
    steps = []
    assert fashion_mnist.export_folder_tree(out, split="test", limit=3, root=root, progress=steps.append) == 3
    assert steps == [1, 1, 1]
    listing = read_folder_tree(out)
    assert sorted(i.category for i in listing.items) == [
        "bags/bags/bag", "clothing/tops/t-shirt-top", "footwear/boots/ankle-boot"]
    assert np.array_equal(np.asarray(Image.open(out / "footwear/boots/ankle-boot/test-00000.png")), images[0])
    assert fashion_mnist.hierarchy().num_classes == (3, 6, 10)


def test_truncated_or_foreign_files_are_refused(tmp_path):
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(bytes([0, 0, 0x08, 3]) + (10).to_bytes(4, "big") * 3 + b"\x00" * 5)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(10))
    with pytest.raises(DataError, match="is truncated"):
        fashion_mnist.load("test", root=tmp_path)
    with pytest.raises(DataError, match="split must be one of"):
        fashion_mnist.load("validation", root=tmp_path)


def test_product_photos_are_distinct_reproducible_views(idx_root):
    root, images, _ = idx_root
    views = fashion_mnist.product_photos(images.astype(np.uint8), 3, seed=1)
    assert views.shape == (4, 3, 28, 28) and views.dtype == np.uint8
    assert np.array_equal(views, fashion_mnist.product_photos(images.astype(np.uint8), 3, seed=1))
    assert not np.array_equal(views[0, 0], views[0, 1])  # a product's photos differ
    assert not np.array_equal(views, fashion_mnist.product_photos(images.astype(np.uint8), 3, seed=2))
    with pytest.raises(DataError, match="photos must be positive"):
        fashion_mnist.product_photos(images.astype(np.uint8), 0)


def test_export_products_writes_the_four_level_tree(idx_root, tmp_path):
    root, _, labels = idx_root
    out = tmp_path / "products"
    assert fashion_mnist.export_products(out, split="test", count=2, photos=3, offset=1, root=root) == 6
    listing = read_folder_tree(out)
    assert sorted(i.category for i in listing.items) == (
        ["bags/bags/bag/test-00002"] * 3 + ["clothing/tops/t-shirt-top/test-00001"] * 3)
    with pytest.raises(DataError, match="outside the 4 images"):
        fashion_mnist.products("test", 3, 2, offset=2, root=root)
