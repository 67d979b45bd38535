import io
import json

import numpy as np
import pytest
from PIL import Image

from embedder import DataError, ImageDecodeError, decode_image, load_images, read_folder_tree, read_manifest, read_source
from embedder.data import balanced_batches

pytestmark = pytest.mark.unit


def png(path, colour=(200, 10, 10), size=(8, 6), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def test_folder_tree_categories_and_failures(tmp_path):
    png(tmp_path / "clothing/tops/shirt/a.png")
    png(tmp_path / "clothing/tops/shirt/b.png")
    png(tmp_path / "bags/tote/c.png")  # one level short
    (tmp_path / "clothing/tops/shirt/notes.txt").write_text("hello")
    png(tmp_path / "root.png")
    png(tmp_path / ".hidden/x/y/z.png")
    listing = read_folder_tree(tmp_path)
    assert [(i.path.name, i.category) for i in listing.items] == [
        ("root.png", None), ("a.png", "clothing/tops/shirt"), ("b.png", "clothing/tops/shirt")]
    reasons = {f.source.rsplit("/", 1)[-1]: f.reason for f in listing.failures}
    assert reasons == {
        "c.png": "category path 'bags/tote' has 2 levels, expected 3",
        "notes.txt": "not an image file extension (.txt)",
    }


def test_folder_tree_follows_linked_folders_but_not_loops(tmp_path):
    tree, elsewhere = tmp_path / "tree", tmp_path / "elsewhere"
    png(tree / "a/b/x.png")
    png(elsewhere / "shoes/y.png")
    png(elsewhere / "shoes/z.png")
    (tree / "a/b/loop").symlink_to(tree / "a", target_is_directory=True)
    (tree / "a/c").symlink_to(elsewhere / "shoes", target_is_directory=True)  # a category folder kept elsewhere
    (tree / "a/d").symlink_to(elsewhere / "gone", target_is_directory=True)  # leads nowhere
    listing = read_folder_tree(tree)
    assert sorted((i.category, i.path.name) for i in listing.items) == [("a/b", "x.png"), ("a/c", "y.png"),
                                                                          ("a/c", "z.png")]
    reasons = {f.source.rsplit("/", 1)[-1]: f.reason for f in listing.failures}
    assert reasons == {"loop": f"is a symbolic link back to {str(tree / 'a')!r}, a folder it lies in (a loop): "
                               "not followed",
                       "d": "is a symbolic link that leads nowhere (No such file or directory)"}


def test_manifest_csv_and_jsonl(tmp_path):
    png(tmp_path / "img/1.png")
    png(tmp_path / "img/2.png")
    (tmp_path / "m.csv").write_text(
        "path,category,id\n"
        "img/1.png,clothing/tops/shirt,s1\n"
        "img/2.png,,s2\n"
        "img/missing.png,clothing/tops/shirt,s3\n"
        "img/1.png,clothing/ /shirt,s4\n"
        "img/2.png,clothing/tops/shirt,s1\n"
    )
    listing = read_manifest(tmp_path / "m.csv")
    assert [(i.id, i.category) for i in listing.items] == [("s1", "clothing/tops/shirt"), ("s2", None)]
    reasons = [f.reason for f in listing.failures]
    assert reasons[0].startswith("file '") and reasons[0].endswith("missing.png' does not exist")
    assert "empty or whitespace-only category name" in reasons[1]
    assert reasons[2] == "duplicate id 's1' (first on line 2)"
    assert [f.source.rsplit(":", 1)[-1] for f in listing.failures] == ["4", "5", "6"]

    (tmp_path / "m.jsonl").write_text(
        json.dumps({"path": "img/1.png", "category": "a/b", "meta": {"colour": "red"}}) + "\n{oops\n"
    )
    listing = read_source(tmp_path / "m.jsonl")
    assert listing.items[0].meta == {"colour": "red"} and listing.items[0].category == "a/b"
    assert listing.failures[0].reason.startswith("row is not an object")


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_source(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(DataError, match="neither a folder nor a manifest"):
        read_source(tmp_path / "x.txt")
    (tmp_path / "m.csv").write_text("file,category\n")
    with pytest.raises(DataError, match="needs a header with a 'path' column"):
        read_manifest(tmp_path / "m.csv")


def test_decode_errors_name_the_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not a jpeg")
    for name in ("empty.png", "text.jpg"):
        with pytest.raises(ImageDecodeError, match=f"{name}: not a recognised image format"):
            decode_image(tmp_path / name)
    with pytest.raises(ImageDecodeError, match="file does not exist"):
        decode_image(tmp_path / "gone.png")


def test_decode_applies_exif_orientation_and_flattens_alpha():
    image = Image.new("RGB", (4, 2), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert decode_image(buffer.getvalue()).size == (2, 4)
    transparent = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert decode_image(transparent).getpixel((0, 0)) == (255, 255, 255)
    grey16 = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert decode_image(grey16).getpixel((0, 0)) == (255, 255, 255)


def test_load_images_skips_failures_and_keeps_the_rest(tmp_path):
    good = png(tmp_path / "a.png", size=(10, 20))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n")
    steps = []
    batch, kept, failures = load_images([good, tmp_path / "bad.png", good], 16, progress=steps.append)
    assert steps == [1, 1, 1]  # every image, failed or not, advances the progress bar
    assert batch.shape == (2, 3, 16, 16) and batch.dtype.is_floating_point is False
    assert kept == [0, 2]
    assert [f.source for f in failures] == [str(tmp_path / "bad.png")]
    assert batch[0, :, 5, 5].tolist() == [200, 10, 10]


def test_balanced_batches_hold_positives(rng):
    labels = np.array([0] * 10 + [1] * 3 + [2] * 1)
    for batch in balanced_batches(labels, classes_per_batch=2, per_class=4, steps=20, rng=rng):
        assert len(batch) == 8
        classes, counts = np.unique(labels[batch], return_counts=True)
        assert len(classes) == 2 and (counts == 4).all()
