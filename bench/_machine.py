"""What a benchmark ran on, printed beside its figures."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata


def describe(packages: tuple[str, ...] = ("pymilvus", "milvus-lite", "numpy")) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = []
    for name in packages:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()} on {sys.platform}; "
            + ", ".join(versions))
