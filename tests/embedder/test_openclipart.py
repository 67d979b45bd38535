"""The openclipart exporter on a tiny fake tree laid out like Debian's openclipart-png."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli.main import cli
from embedder import openclipart, read_source
from embedder.errors import DataError

pytestmark = pytest.mark.unit


def clip_art(path, colour, size=(40, 30), transparent=True):
    """An RGBA drawing: a coloured square on a transparent background (as the package's PNGs are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    image.paste(Image.new("RGBA", (10, 10), (*colour, 255)), (5, 5))
    if not transparent:
        image = image.convert("RGB")
    image.save(path)


@pytest.fixture
def package(tmp_path):
    root = tmp_path / "png"
    for i in range(12):  # food/fruit: 12 images, one in a deeper folder that rolls up
        clip_art(root / "food" / "fruit" / ("tropical" if i == 0 else "") / f"fruit{i}.png", (200, i * 20, 0))
    for i in range(10):
        clip_art(root / "animals" / "birds" / f"bird{i}.png", (0, i * 20, 200), size=(900, 300))
    for i in range(4):  # too few: dropped
        clip_art(root / "animals" / "fish" / f"fish{i}.png", (0, 200, i * 20))
    clip_art(root / "food" / "loose.png", (1, 2, 3))  # directly in a department: no category
    (root / "animals" / "birds" / "bird0-copy.png").write_bytes((root / "animals" / "birds" / "bird0.png").read_bytes())
    (root / "animals" / "birds" / "notes.txt").write_text("not an image")
    return root


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))


def test_export_writes_a_deterministic_split_of_rgb_images_on_white(package, tmp_path):
    report = openclipart.export(tmp_path / "out", source=package, max_side=256)
    assert report.categories == ["animals/birds", "food/fruit"]
    assert report.dropped == {"animals/fish": 4}
    assert report.duplicates == 1 and report.failures == []
    # 12 fruit: 20% test (2), 20% val (2), 8 train; 10 birds: 2, 2, 6
    assert report.images == {"train": 14, "val": 4, "test": 4}
    out = tmp_path / "out"
    for split in openclipart.SPLITS:
        items = read_source(out / split).items
        assert {i.category for i in items} == {"animals/birds", "food/fruit"}
    names = {split: listing(out / split) for split in openclipart.SPLITS}
    assert not set(names["train"]) & set(names["test"]) and not set(names["val"]) & set(names["test"])
    assert sum(name.startswith("food/fruit/fruit0-") for s in names.values() for name in s) == 1  # rolled up

    bird = Image.open(next((out / "train" / "animals" / "birds").glob("*.png")))
    assert bird.mode == "RGB" and bird.size == (256, 85)  # the longer side capped, the shape kept
    fruit = np.asarray(Image.open(next((out / "test" / "food" / "fruit").glob("*.png"))))
    assert fruit.shape == (30, 40, 3) and (fruit[0, 0] == 255).all()  # transparency flattened on white

    again = openclipart.export(tmp_path / "again", source=package, max_side=256)
    assert {split: listing(tmp_path / "again" / split) for split in openclipart.SPLITS} == names
    assert openclipart.export(out, source=package, max_side=256).images == report.images  # a rerun: the same


def test_more_images_than_max_per_leaf_keep_the_first_in_split_order(package, tmp_path):
    report = openclipart.export(tmp_path / "out", source=package, min_per_leaf=10, max_per_leaf=10)
    assert report.images == {"train": 12, "val": 4, "test": 4}
    full = openclipart.export(tmp_path / "full", source=package)
    # the test and val images of a capped category are those of the full export: the split order decides
    assert listing(tmp_path / "out" / "test") == listing(tmp_path / "full" / "test")
    assert full.images["train"] == 14


@pytest.mark.parametrize("kwargs, message", [
    ({"min_per_leaf": 4}, "min_per_leaf must be at least 5"),
    ({"max_per_leaf": 6}, "max_per_leaf must be at least min_per_leaf"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, "with a sum below 1"),
    ({"min_per_leaf": 50}, "no category under .* has 50 images or more"),
])
def test_export_refuses_settings_it_cannot_honour(package, tmp_path, kwargs, message):
    with pytest.raises(DataError, match=message):
        openclipart.export(tmp_path / "out", source=package, **kwargs)


def test_a_missing_package_names_the_package(tmp_path):
    with pytest.raises(DataError, match="apt-get install openclipart-png"):
        openclipart.export(tmp_path / "out", source=tmp_path / "nowhere")


def test_the_data_command_reports_what_it_wrote(package, tmp_path):
    result = CliRunner().invoke(cli, ["data", "openclipart", str(tmp_path / "out"), "--source", str(package), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["images"] == {"train": 14, "val": 4, "test": 4}
    assert report["levels"] == ["department", "category"] and report["departments"] == 2
    assert report["dropped"] == {"animals/fish": 4} and report["duplicates"] == 1 and report["failed"] == 0
