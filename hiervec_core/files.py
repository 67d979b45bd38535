"""Opening image files: local paths, and URLs that fsspec opens (``s3://``, ``gs://``, ``http(s)://``, ...).

One rule for every reader (training, ingest on one process or on Ray, the baseline):

- A local path must be a regular file: a FIFO, socket or device is refused unopened
  (reading one could block for ever).
- A URL is opened by the fsspec filesystem of its scheme, with credentials from the
  environment as that filesystem documents (s3fs: ``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``~/.aws``; gcsfs: Google's default
  credentials; fsspec's own ``FSSPEC_<PROTOCOL>_<OPTION>`` variables for any of them).
  ``file://`` URLs are local paths.
- At most `MAX_FILE_BYTES` are read from one file.

Errors: `FileNotFoundError` (no such file or object), `PermissionError` (denied), or another
`OSError` whose message says why, for every kind of location alike.

>>> is_url("s3://bucket/shirt.jpg"), is_url("/data/shirt.jpg"), is_url("C:/data/shirt.jpg")
(True, False, False)
>>> local_path("file:///data/a%20b.jpg")
PosixPath('/data/a b.jpg')
"""

from __future__ import annotations

import errno
import os
import re
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator
from urllib.parse import unquote, urlsplit

MAX_FILE_BYTES = 256 * 1024 * 1024  # one image file; larger ones are refused, not read
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")  # two letters at least: "C:/..." is a Windows path


def is_url(location: object) -> bool:
    """Whether `location` is a URL string (``scheme://...``) rather than a local path."""
    return isinstance(location, str) and _URL.match(location) is not None


def scheme(location: str) -> str:
    """The URL's scheme, lower case (``s3``, ``https``, ...)."""
    match = _URL.match(location)
    if match is None:
        raise ValueError(f"{location!r} is not a URL")
    return match.group(1).lower()


def local_path(url: str) -> Path:
    """The local path of a ``file://`` URL (percent-escapes decoded)."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "file" or parts.netloc not in ("", "localhost"):
        raise ValueError(f"{url!r} is not a file:// URL of this machine")
    return Path(unquote(parts.path))


def missing_filesystem(protocol: str) -> str | None:
    """None when fsspec can open `protocol` URLs here, else why not (the package to install)."""
    try:
        import fsspec
        from fsspec.registry import known_implementations, registry
    except ImportError:
        return "fsspec is not installed (pip install fsspec)"
    if protocol not in known_implementations and protocol not in registry:
        return f"fsspec knows no filesystem for {protocol}:// URLs"
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        hint = {"s3": " (pip install 'hiervec[s3]')", "gs": " (pip install 'hiervec[gcs]')",
                "gcs": " (pip install 'hiervec[gcs]')"}.get(protocol, "")
        return f"{protocol}:// URLs need a package that is not installed: {exc}{hint}"
    return None


@contextmanager
def open_file(location: str | os.PathLike) -> Iterator[BinaryIO]:
    """The file at `location` (a path or a URL), opened for binary reading."""
    if is_url(location) and scheme(location) == "file":
        location = local_path(location)
    if not is_url(location):
        with open(location, "rb", opener=_regular_file_opener) as fh:
            yield fh
        return
    import fsspec

    try:
        handle = fsspec.open(location, "rb").open()
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as exc:  # the filesystem's own errors (a refused connection, a bad bucket name, ...)
        raise OSError(f"cannot open {location}: {' '.join(str(exc).split()) or type(exc).__name__}") from None
    try:
        yield handle
    finally:
        handle.close()


def read_file(location: str | os.PathLike, *, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of the file at `location` (a path or a URL), at most `limit` of them (else `OSError`)."""
    with open_file(location) as fh:
        try:
            data = fh.read(limit + 1)
        except (FileNotFoundError, PermissionError):
            raise
        except OSError as exc:
            raise OSError(f"cannot read {location}: {exc.strerror or exc}") from None
        except Exception as exc:  # a remote filesystem failing mid-read
            raise OSError(f"cannot read {location}: {' '.join(str(exc).split()) or type(exc).__name__}") from None
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes, the most one image file may have")
    return data


def why_unreadable(exc: OSError) -> str:
    """Why a file could not be read, in words, the same for a path and a URL."""
    if isinstance(exc, FileNotFoundError):
        return "does not exist"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a folder, not an image"
    return exc.strerror or " ".join(str(exc).split()) or type(exc).__name__


def _regular_file_opener(path: str, flags: int) -> int:
    fd = os.open(path, flags | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "is not a regular file (a FIFO, socket or device)")
    return fd
