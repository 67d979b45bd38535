"""`hiervec_core.files`: one rule for opening an image file, a local path or a URL."""

import os

import pytest

from hiervec_core.files import is_url, local_path, missing_filesystem, read_file, why_unreadable

pytestmark = pytest.mark.unit


def test_urls_are_told_from_paths():
    assert [is_url(x) for x in ("s3://b/k.png", "gs://b/k", "https://host/a.jpg", "file:///tmp/a.png")] == [True] * 4
    assert [is_url(x) for x in ("/tmp/a.png", "a/b.png", "C:/data/a.png", "s3:/b/k")] == [False] * 4
    assert local_path("file:///data/a%20b.png").as_posix() == "/data/a b.png"
    with pytest.raises(ValueError, match="not a file:// URL of this machine"):
        local_path("file://otherhost/data/a.png")


def test_a_local_file_a_file_url_and_the_reasons_it_cannot_be_read(tmp_path):
    image = tmp_path / "a b.png"
    image.write_bytes(b"12345")
    assert read_file(image) == read_file(image.as_uri()) == b"12345"
    with pytest.raises(OSError, match="larger than 4 bytes") as big:
        read_file(image, limit=4)
    assert "larger than 4 bytes" in why_unreadable(big.value)
    with pytest.raises(FileNotFoundError) as missing:
        read_file(tmp_path / "none.png")
    assert why_unreadable(missing.value) == "does not exist"
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    with pytest.raises(OSError) as refused:  # refused unopened: reading it would block for ever
        read_file(fifo)
    assert why_unreadable(refused.value) == "is not a regular file (a FIFO, socket or device)"


def test_a_scheme_without_a_filesystem_says_what_is_missing():
    assert missing_filesystem("file") is None and missing_filesystem("memory") is None
    assert missing_filesystem("nosuchscheme") == "fsspec knows no filesystem for nosuchscheme:// URLs"


def test_a_url_is_read_through_fsspec():
    import fsspec

    with fsspec.open("memory://bucket/shirt.png", "wb") as fh:
        fh.write(b"pixels")
    assert read_file("memory://bucket/shirt.png") == b"pixels"
    with pytest.raises(FileNotFoundError):
        read_file("memory://bucket/none.png")
