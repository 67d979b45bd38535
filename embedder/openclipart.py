"""Debian's ``openclipart-png`` as a 2-level labelled catalogue of real RGB images.

The package holds about 8,000 PNGs under ``/usr/share/openclipart/png/<department>/
<category>/...`` (``food/fruit``, ``animals/mammals``, ``transportation/vehicles``).
`export` writes them as a folder tree that ``hiervec train``, ``ingest`` and ``eval`` read::

    out/train/<department>/<category>/<name>.png
    out/val/...
    out/test/...

- the category is the first two folders below the root (deeper folders roll up into it;
  images directly in a department have no category and are left out);
- transparency is flattened on white (as product photos are shown) and every image is
  written as RGB, its longer side capped at `max_side`;
- byte-identical files are kept once (the package ships some twice);
- a category with fewer than `min_per_leaf` images is dropped, and one with more than
  `max_per_leaf` keeps that many, so one huge category (1,378 stars) does not swamp the rest;
- the split is deterministic by file: within a category, files are ordered by the SHA-256
  of their path relative to the root, the first `test_fraction` go to test, the next
  `val_fraction` to val (at least 2 each), the rest to train. The same package always gives
  the same split, on any machine.

Install it with ``apt-get install openclipart-png`` (131 MB; benchmarks need it, the tests do not).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .data import decode_image
from .errors import DataError, ImageDecodeError

DEBIAN_DIR = Path("/usr/share/openclipart/png")
LEVEL_NAMES = ("department", "category")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ExportReport:
    """What `export` wrote: images per split, the categories kept and those dropped with their sizes."""

    out: Path
    images: dict[str, int]
    categories: list[str]
    dropped: dict[str, int]
    duplicates: int
    failures: list[tuple[str, str]]


def export(
    out: str | os.PathLike,
    *,
    source: str | os.PathLike = DEBIAN_DIR,
    min_per_leaf: int = 10,
    max_per_leaf: int = 200,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    max_side: int = 512,
    progress: Callable[[int], None] | None = None,
) -> ExportReport:
    """Write `source` (laid out as the Debian package) under `out` as train/val/test folder trees.

    Files already at their target are left as they are, so a rerun is cheap. `progress(1)`
    after each image written or found in place. See the module docstring for the rules.
    """
    source = Path(source)
    if not source.is_dir():
        raise DataError(f"openclipart source {str(source)!r} is not a folder; on Debian: apt-get install openclipart-png")
    if min_per_leaf < 5:
        raise DataError(f"min_per_leaf must be at least 5 (2 test, 2 val and 1 training image), got {min_per_leaf}")
    if max_per_leaf < min_per_leaf:
        raise DataError(f"max_per_leaf must be at least min_per_leaf ({min_per_leaf}), got {max_per_leaf}")
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(f"val_fraction and test_fraction must be in (0, 1) with a sum below 1, "
                        f"got {val_fraction} and {test_fraction}")
    if max_side < 32:
        raise DataError(f"max_side must be at least 32 px, got {max_side}")

    leaves, duplicates = _leaves(source)
    kept = {leaf: files for leaf, files in leaves.items() if len(files) >= min_per_leaf}
    dropped = {leaf: len(files) for leaf, files in leaves.items() if len(files) < min_per_leaf}
    if not kept:
        raise DataError(f"no category under {str(source)!r} has {min_per_leaf} images or more")
    out = Path(out)
    written = dict.fromkeys(SPLITS, 0)
    failures: list[tuple[str, str]] = []
    for leaf, files in sorted(kept.items()):
        files = files[:max_per_leaf]
        for split, chosen in zip(SPLITS, _split(files, val_fraction, test_fraction)):
            folder = out / split / leaf
            folder.mkdir(parents=True, exist_ok=True)
            for rel in chosen:
                target = folder / _target_name(rel)
                try:
                    if not target.exists():
                        _write_rgb(source / rel, target, max_side)
                    written[split] += 1
                except ImageDecodeError as exc:
                    failures.append((exc.source, exc.reason))
                if progress is not None:
                    progress(1)
    return ExportReport(out, written, sorted(kept), dropped, duplicates, failures)


def _leaves(source: Path) -> tuple[dict[str, list[str]], int]:
    """``{department/category: [relative paths ordered by their SHA-256]}`` and the duplicates left out."""
    by_leaf: dict[str, list[str]] = {}
    seen: set[str] = set()
    duplicates = 0
    for folder, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        parts = Path(folder).relative_to(source).parts
        if len(parts) < 2:
            continue
        for name in sorted(files):
            if name.startswith(".") or not name.lower().endswith(".png"):
                continue
            path = Path(folder) / name
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest in seen:
                duplicates += 1
                continue
            seen.add(digest)
            by_leaf.setdefault(f"{parts[0]}/{parts[1]}", []).append(path.relative_to(source).as_posix())
    for files in by_leaf.values():
        files.sort(key=lambda rel: hashlib.sha256(rel.encode()).hexdigest())
    return by_leaf, duplicates


def _split(files: list[str], val_fraction: float, test_fraction: float) -> tuple[list[str], list[str], list[str]]:
    n_test = max(2, round(test_fraction * len(files)))
    n_val = max(2, round(val_fraction * len(files)))
    return files[n_test + n_val :], files[n_test : n_test + n_val], files[:n_test]


def _target_name(rel: str) -> str:
    """A file name unique within its category: deeper folders rolled up into it keep their files apart."""
    stem = Path(rel).stem
    return f"{stem[:60]}-{hashlib.sha256(rel.encode()).hexdigest()[:8]}.png"


def _write_rgb(path: Path, target: Path, max_side: int) -> None:
    image = decode_image(path)  # RGB, transparency composited on white
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    tmp = target.with_name(target.name + ".tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, target)
