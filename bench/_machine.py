"""What a benchmark ran on, printed beside its figures, and the CPU time processes used."""

from __future__ import annotations

import os
import platform
import sys
import time
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


def cpu_seconds(pid: int | None = None) -> float | None:
    """User + system CPU seconds that process `pid` (default: this one) has used so far; None
    when it cannot be read (another process, off Linux)."""
    if pid is None:
        return time.process_time()  # every thread's, at the clock's resolution (os.times counts in 10 ms ticks)
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_processes(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc; none elsewhere)."""
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


def tree_cpu_seconds(pid: int | None) -> float:
    """CPU seconds of process `pid` and of its children (a Milvus server's launcher and the server
    it starts), 0 for None."""
    if pid is None:
        return 0.0
    return sum(cpu_seconds(p) or 0.0 for p in (pid, *child_processes(pid)))
