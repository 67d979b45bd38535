"""Labelled image sources (folder tree, CSV/JSONL manifest), decoding and batching.

A source is read into `SourceItem`s plus `Failure`s: a file or row that cannot be used is
reported with its reason and skipped; it never stops the others.

Folder tree: ``root/<level 1>/<level 2>/.../<image>``; the folders below the root are
the category path. Manifest: CSV with a header or JSON Lines, columns ``path`` (relative
to the manifest's folder or absolute, or a URL that fsspec opens: ``s3://``, ``gs://``,
``https://``, ``file://``; see `hiervec_core.files`), ``category`` (a path such as ``clothing/tops/shirt``,
optional for unlabelled images), optional ``id`` and (JSONL) ``meta``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from hiervec_core.files import is_url, local_path, missing_filesystem, open_file, read_file, scheme, why_unreadable

from .errors import DataError, HierarchyError, ImageDecodeError
from .hierarchy import join_path, split_path

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MANIFEST_EXTENSIONS = frozenset({".csv", ".jsonl", ".ndjson"})


@dataclass(frozen=True)
class SourceItem:
    path: Path | str  # a local path, or a URL string that fsspec opens (a manifest's s3://, https://, ... rows)
    category: str | None  # leaf category path, None when unlabelled
    id: str | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    origin: str | None = None  # the manifest row it came from ("manifest.csv:7"); None in a folder tree


@dataclass(frozen=True)
class Failure:
    source: str
    reason: str


@dataclass
class SourceListing:
    items: list[SourceItem]
    failures: list[Failure]


def read_source(source: str | os.PathLike, *, depth: int | None = None) -> SourceListing:
    """A folder tree or a manifest file, by what `source` is."""
    path = Path(source)
    if path.is_dir():
        return read_folder_tree(path, depth=depth)
    if path.is_file() and path.suffix.lower() in MANIFEST_EXTENSIONS:
        return read_manifest(path)
    if not path.exists():
        raise DataError(f"data source {str(path)!r} does not exist")
    raise DataError(
        f"data source {str(path)!r} is neither a folder nor a manifest ({', '.join(sorted(MANIFEST_EXTENSIONS))})"
    )


def read_folder_tree(root: str | os.PathLike, *, depth: int | None = None) -> SourceListing:
    """Images under `root`; their category is their folder path relative to `root`.

    `depth` is the number of category levels; by default the most common one. Images
    directly under `root` are unlabelled (category None: a model can predict theirs).
    Images at another depth, non-image files and folder names the hierarchy rejects are
    failures.
    Symbolic links to folders are followed, once per folder: a link back into a folder
    already on its way down (a loop) is a failure naming it, as is a link that leads nowhere;
    hidden entries are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"folder tree root {str(root)!r} is not a folder")
    found: list[tuple[Path, tuple[str, ...]]] = []
    failures: list[Failure] = []

    def on_error(exc: OSError) -> None:
        failures.append(Failure(str(exc.filename), f"cannot list folder: {exc.strerror or exc}"))

    for folder, dirs, files in os.walk(root, onerror=on_error, followlinks=True):
        dirs[:] = _unlooped(Path(folder), sorted(d for d in dirs if not d.startswith(".")), root, failures)
        rel = Path(folder).relative_to(root).parts
        undecodable = next((part for part in rel if not _is_utf8(part)), None)
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(folder) / name
            if undecodable is not None:
                failures.append(Failure(str(path), f"category folder name '{_shown(undecodable)}' is not valid UTF-8"))
            elif path.is_symlink() and not path.exists():  # a link to nothing: say so, whatever its name
                failures.append(Failure(str(path), _not_a_file(path)))
            elif path.suffix.lower() not in IMAGE_EXTENSIONS:
                failures.append(Failure(str(path), f"not an image file extension ({path.suffix or 'none'})"))
            elif not path.is_file():  # follows links: a broken or looping link, a FIFO, a socket
                failures.append(Failure(str(path), _not_a_file(path)))
            else:
                found.append((path, rel))
    labelled = [rel for _, rel in found if rel]
    if not labelled:
        return SourceListing([SourceItem(path, None) for path, _ in found], failures)
    depth = depth or Counter(len(rel) for rel in labelled).most_common(1)[0][0]
    items = []
    for path, rel in found:
        if not rel:  # directly under the root: no category, for the model to predict
            items.append(SourceItem(path, None))
            continue
        if len(rel) != depth:
            failures.append(Failure(str(path), f"category path {join_path(rel)!r} has {len(rel)} levels, expected {depth}"))
            continue
        try:
            items.append(SourceItem(path, join_path(split_path(rel))))
        except HierarchyError as exc:
            failures.append(Failure(str(path), str(exc)))
    return SourceListing(items, failures)


def read_manifest(manifest: str | os.PathLike) -> SourceListing:
    """Rows of a CSV (with header) or JSONL manifest; see the module docstring."""
    manifest = Path(manifest)
    rows = list(_manifest_rows(manifest))
    items: list[SourceItem] = []
    failures: list[Failure] = []
    seen_ids: dict[str, int] = {}
    missing: dict[str, str | None] = {}  # URL scheme -> why fsspec cannot open it here (None: it can)
    for line, row in rows:
        where = f"{manifest}:{line}"
        if not isinstance(row, dict):
            failures.append(Failure(where, f"row is not an object: {row!r:.200}"))
            continue
        raw_path = row.get("path")
        if not raw_path:
            failures.append(Failure(where, "row has no 'path'"))
            continue
        if not isinstance(raw_path, str):
            failures.append(Failure(where, f"path must be a string, got {type(raw_path).__name__} {raw_path!r:.80}"))
            continue
        if "\0" in raw_path:
            failures.append(Failure(where, f"path {raw_path!r:.200} holds a NUL byte, which no file name can"))
            continue
        if is_url(raw_path) and scheme(raw_path) != "file":
            protocol = scheme(raw_path)
            if protocol not in missing:
                missing[protocol] = missing_filesystem(protocol)
            if missing[protocol] is not None:
                failures.append(Failure(where, f"cannot open {raw_path!r:.200}: {missing[protocol]}"))
                continue
            path = raw_path  # opened when read (a missing or denied object is reported then, per file)
        else:
            try:
                path = local_path(raw_path) if is_url(raw_path) else Path(raw_path)
            except ValueError as exc:
                failures.append(Failure(where, str(exc)))
                continue
            path = path if path.is_absolute() else manifest.parent / path
        try:
            is_file = isinstance(path, str) or path.is_file()
        except OSError as exc:  # e.g. a name longer than the filesystem allows
            failures.append(Failure(where, f"file {str(path)!r:.200} cannot be looked up: {exc.strerror or exc}"))
            continue
        if not is_file:
            failures.append(Failure(where, f"file {str(path)!r} {_not_a_file(path)}"))
            continue
        category = row.get("category")
        if category is not None and not isinstance(category, str):
            failures.append(Failure(where, f"category must be a path string, got {category!r}"))
            continue
        if category == "":  # an empty CSV cell: an unlabelled image
            category = None
        if category is not None:
            try:
                category = join_path(split_path(category))
            except HierarchyError as exc:
                failures.append(Failure(where, str(exc)))
                continue
        item_id = row.get("id") or None
        if item_id is not None:
            if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
                failures.append(Failure(where, f"id must be a string, got {type(item_id).__name__}"))
                continue
            item_id = str(item_id)
            if item_id in seen_ids:
                failures.append(Failure(where, f"duplicate id {item_id!r} (first on line {seen_ids[item_id]})"))
                continue
            seen_ids[item_id] = line
        meta = row.get("meta") or {}
        if isinstance(meta, str):
            try:
                meta = json.loads(meta)
            except json.JSONDecodeError as exc:
                failures.append(Failure(where, f"meta is not JSON: {exc}"))
                continue
            except RecursionError:
                failures.append(Failure(where, "meta is nested too deeply to read"))
                continue
        if not isinstance(meta, dict):
            failures.append(Failure(where, f"meta must be a JSON object, got {meta!r}"))
            continue
        items.append(SourceItem(path, category, item_id, meta, where))
    return SourceListing(items, failures)


def _manifest_rows(manifest: Path) -> Iterator[tuple[int, object]]:
    try:
        text = manifest.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read manifest {str(manifest)!r}: {exc}") from exc
    if manifest.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise DataError(f"manifest {str(manifest)!r} needs a header with a 'path' column, got {reader.fieldnames}")
        for row in reader:
            yield reader.line_num, row
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, f"invalid JSON ({exc.msg})"
        except RecursionError:
            yield number, "invalid JSON (nested too deeply to read)"


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # raw bytes of a non-UTF-8 name, kept by Python as surrogates
        return False


def _shown(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _unlooped(folder: Path, names: list[str], root: Path, failures: list) -> list[str]:
    """The subfolders of `folder` to walk into: a symbolic link to a folder that is already on the way
    down from `root` (it would loop) is left out, as a failure."""
    ancestors = {os.path.realpath(p) for p in (folder, *folder.parents) if p == root or root in p.parents}
    kept = []
    for name in names:
        path = folder / name
        if path.is_symlink() and os.path.realpath(path) in ancestors:
            failures.append(Failure(str(path), f"is a symbolic link back to {os.path.realpath(path)!r}, a folder "
                                               f"it lies in (a loop): not followed"))
        else:
            kept.append(name)
    return kept


def _not_a_file(path: Path) -> str:
    """Why `path` (which is not a regular file) cannot be read, in words."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if path.is_symlink():
            return f"is a symbolic link that leads nowhere ({exc.strerror or exc})"
        return "does not exist"
    if stat.S_ISDIR(mode):
        return "is a folder, not an image"
    return "is not a regular file (a FIFO, socket or device)"


# -- decoding ----------------------------------------------------------------------------
def decode_image(source: str | os.PathLike | bytes | Image.Image, *, name: str | None = None) -> Image.Image:
    """An RGB image with its EXIF orientation applied; `ImageDecodeError` says why not.

    Pillow's decompression-bomb limit stays on: an image beyond it is refused, not decoded.
    Transparent images are composited on white, as product photos are shown.
    """
    label = name or (str(source) if not isinstance(source, (bytes, Image.Image)) else "<image>")
    try:
        with warnings.catch_warnings():
            # Refused below, explicitly: a filter set here would not be thread-safe.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(source, Image.Image):
                image = source
            else:
                image = Image.open(io.BytesIO(source if isinstance(source, bytes) else _read(source, label)))
        limit = Image.MAX_IMAGE_PIXELS
        if limit and image.width * image.height > limit:
            raise ImageDecodeError(label, f"refused as a decompression bomb: {image.width}x{image.height} "
                                          f"is over Pillow's limit of {limit} pixels")
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(label, "file does not exist") from None
    except PermissionError:
        raise ImageDecodeError(label, "permission denied") from None
    except IsADirectoryError:
        raise ImageDecodeError(label, "is a folder, not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(label, f"refused as a decompression bomb: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(label, "not a recognised image format") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError(label, f"cannot decode: {exc}") from None


def _read(location: str | os.PathLike, label: str) -> bytes:
    """The file's bytes (a local path or a URL: `hiervec_core.files`), or `ImageDecodeError` saying why not."""
    try:
        return read_file(location)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # `decode_image` names these
    except OSError as exc:
        raise ImageDecodeError(label, f"cannot read: {why_unreadable(exc)}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "I;16" or image.mode.startswith("I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray((array / peak * 255).round().astype(np.uint8), mode="L")
    return image.convert("RGB")


def image_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """A ``(3, size, size)`` uint8 tensor: the whole image resized (squashed), nothing cropped."""
    resized = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_images(
    sources: Sequence[str | os.PathLike | bytes | Image.Image],
    size: int,
    *,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, list[int], list[Failure]]:
    """Decode and resize in parallel: ``(uint8 (n_ok, 3, size, size), kept indices, failures)``;
    `progress(1)` after each image, in order."""

    def one(index: int):
        try:
            return index, image_to_tensor(decode_image(sources[index]), size), None
        except ImageDecodeError as exc:
            return index, None, Failure(exc.source, exc.reason)

    workers = workers or min(8, (os.cpu_count() or 1) + 2)
    results = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(one, range(len(sources))):
            results.append(result)
            if progress is not None:
                progress(1)
    kept = [i for i, tensor, _ in results if tensor is not None]
    tensors = [tensor for _, tensor, _ in results if tensor is not None]
    failures = [failure for _, _, failure in results if failure is not None]
    stacked = torch.stack(tensors) if tensors else torch.empty((0, 3, size, size), dtype=torch.uint8)
    return stacked, kept, failures


def default_image_size(paths: Sequence[str | os.PathLike], *, sample: int = 200,
                       bounds: tuple[int, int] = (64, 224)) -> tuple[int, str]:
    """The input size to train at, read from the images: (size, why).

    The median shorter side of up to `sample` images spread over `paths` (read from their
    headers, nothing decoded), rounded to a multiple of 32 and clamped to `bounds`: small
    images are not blown up past what they hold, large ones not squeezed below what the
    backbone was pretrained to see. Files that cannot be opened are left out of the sample.
    """
    low, high = bounds
    if not paths:
        raise DataError("no images to read a default image size from")
    step = max(1, len(paths) // sample)
    sides = []
    for path in list(paths)[::step][:sample]:
        try:
            with open_file(path) as fh, Image.open(fh) as image:
                sides.append(min(image.size))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
    if not sides:
        return low, f"none of {min(sample, len(paths))} sampled images could be opened; the smallest size"
    median = float(np.median(sides))
    size = int(min(high, max(low, 32 * round(median / 32))))
    return size, (f"the median shorter side of {len(sides)} sampled images is {median:.0f} px "
                  f"(rounded to a multiple of 32, within {low}..{high})")


# -- batching ----------------------------------------------------------------------------
def balanced_batches(
    leaf_labels: np.ndarray,
    classes_per_batch: int,
    per_class: int,
    steps: int,
    rng: np.random.Generator,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> Iterable[np.ndarray]:
    """`steps` batches of `classes_per_batch` leaf classes x `per_class` images each.

    Every batch therefore holds positive pairs; a class smaller than `per_class` is
    sampled with replacement. With `world_size` processes, every rank draws the same
    global batch of ``world_size * classes_per_batch`` classes from the same seeded `rng`
    and keeps the classes of its `rank`: disjoint classes per rank, equal local batches,
    and together the batch one process would draw with ``world_size`` times the classes.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
    classes, inverse = np.unique(leaf_labels, return_inverse=True)
    if len(classes) < world_size:
        raise DataError(f"{world_size} processes need at least {world_size} leaf classes (one each per batch), "
                        f"got {len(classes)}")
    members = [np.flatnonzero(inverse == c) for c in range(len(classes))]
    local = min(classes_per_batch, len(classes) // world_size)
    take = local * world_size
    mine = slice(rank * local * per_class, (rank + 1) * local * per_class)
    for _ in range(steps):
        chosen = rng.choice(len(classes), size=take, replace=False)
        batch = np.concatenate(
            [rng.choice(members[c], size=per_class, replace=len(members[c]) < per_class) for c in chosen]
        )
        yield batch if world_size == 1 else batch[mine]
