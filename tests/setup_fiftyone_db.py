"""Make FiftyOne's bundled database runnable for the tests (called by `make venv`).

fiftyone-db's source releases download MongoDB while they build, which needs the internet
(here they build without it and bundle nothing); its 0.4.5 wheel bundles mongod 6.0, built
against OpenSSL 1.1. Where the system has only OpenSSL 3 (Debian 12), the two OpenSSL 1.1
libraries come from a registry wheel that vendors them (psycopg2-binary 2.9.5), copied under
the names mongod asks for into ``<venv>/lib/mongod-compat``; `tests/servers.FiftyOneDatabase`
puts that folder on mongod's library path. Linux x86-64 only; elsewhere FiftyOne's tests skip
with the reason when their database cannot start.
"""

from __future__ import annotations

import importlib.util
import platform
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

FIFTYONE_DB = "fiftyone-db==0.4.5"
SSL11 = "psycopg2-binary==2.9.5"
LIBRARIES = {"libssl": "libssl.so.1.1", "libcrypto": "libcrypto.so.1.1"}


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True)


def compat_folder() -> Path:
    """Where the OpenSSL 1.1 libraries go, for mongod's library path."""
    return Path(sys.prefix) / "lib" / "mongod-compat"


def mongod() -> Path | None:
    """fiftyone-db's bundled mongod, found without importing fiftyone (its import reads its config)."""
    spec = importlib.util.find_spec("fiftyone")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "db" / "bin" / "mongod"
        if path.is_file():
            return path
    return None


def runs(path: Path, compat: Path | None = None) -> bool:
    env = {"LD_LIBRARY_PATH": str(compat)} if compat else None
    return subprocess.run([str(path), "--version"], capture_output=True, env=env).returncode == 0


def main() -> int:
    if sys.platform != "linux" or platform.machine() != "x86_64" or importlib.util.find_spec("fiftyone") is None:
        print("setup_fiftyone_db: not Linux x86-64 with fiftyone installed; nothing to do")
        return 0
    if mongod() is None:
        pip("install", "--no-deps", FIFTYONE_DB)
    path = mongod()
    if path is None or runs(path):
        return 0
    compat = compat_folder()
    compat.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        pip("download", "--no-deps", "--only-binary=:all:", "--python-version", "3.11", "--platform",
            "manylinux2014_x86_64", "-d", folder, SSL11)
        [wheel] = Path(folder).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                name = Path(member).name
                if Path(member).parent.name != "psycopg2_binary.libs":
                    continue
                for prefix, wanted in LIBRARIES.items():
                    if name.startswith(prefix + "-"):
                        data = archive.read(member)
                        (compat / wanted).write_bytes(data)
                        (compat / name).write_bytes(data)  # libssl's own NEEDED names the vendored file
    ok = runs(path, compat)
    print(f"setup_fiftyone_db: mongod {'runs' if ok else 'still does not run'} with {compat}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
