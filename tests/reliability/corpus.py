"""A generated corpus of broken, unusual and valid images (never committed binaries).

Each `Case` says what the file is, whether ingest must store it or skip it, the words its
failure reason must contain, and, for stored images, what the decoded picture must look
like. RELIABILITY.md lists the same cases with the observed outcomes.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

LEAF = "clothing/tops/shirt"
RED, BLUE, WHITE = (220, 30, 30), (30, 30, 220), (255, 255, 255)


@dataclass
class Case:
    what: str
    path: Path
    stored: bool
    reason: str = ""  # for skipped files: words the failure reason contains
    check: Callable[[Image.Image], bool] | None = None  # for stored files: the decoded RGB image is right


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def close(pixel, expected, tolerance=40) -> bool:
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, expected))


def photo(seed: int, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny compressed row of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def build_tree(root: Path) -> list[Case]:
    """`root/clothing/tops/shirt/...` holding every case; returns them."""
    leaf = root / LEAF
    leaf.mkdir(parents=True)
    cases: list[Case] = []

    def add(name: str | bytes, data: bytes, what: str, stored: bool, reason: str = "", check=None) -> Path:
        path = Path(os.fsdecode(os.path.join(os.fsencode(leaf), name if isinstance(name, bytes) else name.encode())))
        path.write_bytes(data)
        cases.append(Case(what, path, stored, reason, check))
        return path

    add("good.png", encoded(photo(1), "PNG"), "an ordinary RGB PNG", True)
    add("good.jpg", encoded(photo(2), "JPEG", quality=90), "an ordinary RGB JPEG", True)
    add("zero-bytes.jpg", b"", "a zero-byte file", False, "not a recognised image format")
    jpeg = encoded(photo(3, (256, 256)), "JPEG", quality=95)
    add("truncated.jpg", jpeg[: len(jpeg) // 2], "a JPEG cut in half", False, "truncated")
    png = encoded(photo(4, (128, 128)), "PNG")
    add("truncated.png", png[: len(png) * 2 // 3], "a PNG cut at two thirds", False, "cannot decode")
    add("text.jpg", b"this is a text file, not a photo\n" * 4, "a text file named .jpg", False,
        "not a recognised image format")
    add("bomb.png", encoded(Image.new("1", (12_000, 12_000)), "PNG"),
        "a decompression bomb: 12000x12000 pixels in a few kB", False, "decompression bomb")
    add("huge-header.png", png_header_only(30_000, 30_000), "a header claiming 30000x30000", False,
        "decompression bomb")
    add("one-pixel.png", encoded(Image.new("RGB", (1, 1), RED), "PNG"), "a 1x1 image", True,
        check=lambda im: im.size == (1, 1) and close(im.getpixel((0, 0)), RED, 0))
    add("cmyk.jpg", encoded(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95), "a CMYK JPEG",
        True, check=lambda im: close(im.getpixel((8, 8)), (255, 0, 0)))
    grey16 = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    add("grey16.png", encoded(grey16, "PNG"), "a 16-bit greyscale PNG", True,
        check=lambda im: close(im.getpixel((4, 4)), (128, 128, 128), 2))
    add("grey8.png", encoded(Image.new("L", (8, 8), 77), "PNG"), "an 8-bit greyscale PNG", True,
        check=lambda im: im.getpixel((4, 4)) == (77, 77, 77))
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([*RED, *BLUE] + [0] * 762)
    palette.paste(1, (0, 0, 4, 8))
    add("palette-transparent.png", encoded(palette, "PNG", transparency=1),
        "a palette PNG whose left half is transparent", True,
        check=lambda im: im.getpixel((1, 4)) == WHITE and close(im.getpixel((6, 4)), RED, 0))
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    add("animated.gif", encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
        "an animated GIF (red, then blue)", True, check=lambda im: close(im.getpixel((8, 8)), RED))
    add("animated.webp", encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100,
                                 lossless=True), "an animated WebP (red, then blue)", True,
        check=lambda im: close(im.getpixel((8, 8)), RED, 0))
    upright = Image.new("RGB", (40, 20), RED)
    upright.paste(BLUE, (20, 0, 40, 20))  # left red, right blue, stored landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # to be displayed rotated 90 degrees clockwise
    add("exif-rotated.jpg", encoded(upright, "JPEG", exif=exif, quality=95),
        "a JPEG with EXIF orientation 6", True,
        check=lambda im: im.size == (20, 40) and close(im.getpixel((10, 5)), RED)
        and close(im.getpixel((10, 35)), BLUE))
    add(b"caf\xe9-latin1-name.png", encoded(photo(5), "PNG"), "a file name that is not UTF-8 (Latin-1 bytes)", True)

    loop = leaf / "self-loop.png"
    loop.symlink_to(loop)
    cases.append(Case("a symbolic link to itself", loop, False, "symbolic link that leads nowhere"))
    dangling = leaf / "dangling.png"
    dangling.symlink_to(leaf / "gone.png")
    cases.append(Case("a symbolic link to a missing file", dangling, False, "symbolic link that leads nowhere"))
    folder_loop = leaf / "folder-loop"
    folder_loop.symlink_to(root, target_is_directory=True)  # followed links stop at a loop, and say so
    cases.append(Case("a symbolic link to a folder above it (a loop)", folder_loop, False, "(a loop): not followed"))
    fifo = leaf / "fifo.png"
    os.mkfifo(fifo)
    cases.append(Case("a FIFO named .png (reading it would block forever)", fifo, False, "not a regular file"))
    unreadable = add("unreadable.png", encoded(photo(6), "PNG"), "a file without read permission", False,
                     "permission denied")
    unreadable.chmod(0)

    odd_folder = Path(os.fsdecode(os.fsencode(root / "clothing/tops") + b"/sh\xefrt"))
    odd_folder.mkdir()
    odd = odd_folder / "in-latin1-folder.png"
    odd.write_bytes(encoded(photo(7), "PNG"))
    cases.append(Case("an image in a folder whose name is not UTF-8", odd, False, "is not valid UTF-8"))
    return cases


def build_manifest(root: Path) -> tuple[Path, list[Case]]:
    """A CSV manifest with bad rows and good ones; returns it and the cases (paths are the images')."""
    images = root / "images"
    images.mkdir(parents=True)
    for i in range(3):
        (images / f"{i}.png").write_bytes(encoded(photo(10 + i), "PNG"))
    manifest = root / "manifest.csv"
    manifest.write_text(
        "path,category,id\n"
        "images/0.png,clothing/tops/shirt,sku-0\n"
        "images/missing.png,clothing/tops/shirt,sku-1\n"
        "images/1.png,,sku-2\n"
        "images/1.png,clothing/tops,sku-3\n"
        "images/2.png,clothing/tops/shirt,sku-0\n"
        "images/2.png,clothing//shirt,sku-4\n"
        "images/2.png,clothing/bottoms/trouser,sku-5\n"
    )
    cases = [
        Case("a valid row", images / "0.png", True),
        Case("a row whose path does not exist", images / "missing.png", False, "does not exist"),
        Case("a row with an empty category (unlabelled: the model predicts it, flagged)", images / "1.png", True),
        Case("a row with a ragged category path (2 of 3 levels)", images / "1.png", False, "has 2 levels"),
        Case("a row repeating an id", images / "2.png", False, "duplicate id 'sku-0'"),
        Case("a row with an empty name inside its category path", images / "2.png", False, "empty"),
        Case("a valid row (same image as a rejected one, another id)", images / "2.png", True),
    ]
    return manifest, cases
