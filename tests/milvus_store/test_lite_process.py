"""`LiteProcess`: a Milvus Lite file served from a child process, its lock, and its end."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from milvus_store import HierStore, LiteProcess, StoreConnectionError
from milvus_store.store import _locked_by_another_process

from .helpers import SPEC, brute_force, make_records

pytestmark = pytest.mark.lite


def test_a_lite_file_served_from_its_own_process_keeps_what_it_stores(tmp_path):
    db = tmp_path / "own.db"
    records = make_records(20)
    with LiteProcess(db) as lite:
        assert lite.uri.startswith("http://127.0.0.1:") and lite.running
        assert _locked_by_another_process(str(db))  # the child holds the file's lock
        with pytest.raises(StoreConnectionError, match="another process has it open"):
            HierStore(db, "c", spec=SPEC)
        with pytest.raises(StoreConnectionError, match="another process has it open"):
            LiteProcess(db).start()
        store = HierStore(lite.uri, "c", spec=SPEC)
        store.upsert(records)
        store.flush()
        hits = store.search(np.asarray(records[3].vector)[None], 5)[0]
        store.close()
    assert not lite.running and not _locked_by_another_process(str(db))
    assert [h.id for h in hits] == brute_force(records, np.asarray(records[3].vector), 5)[0]
    reopened = HierStore(db, "c")  # the same file, now opened in this process
    try:
        assert reopened.count() == 20
    finally:
        reopened.close()


def test_the_child_stops_and_frees_the_file_when_its_parent_dies(tmp_path):
    db = tmp_path / "orphan.db"
    parent = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from milvus_store import LiteProcess; "
                               f"lite = LiteProcess({str(db)!r}).start(); print(lite.process.pid, flush=True); "
                               "time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert _locked_by_another_process(str(db))
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 30
    while _locked_by_another_process(str(db)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _locked_by_another_process(str(db))
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child)  # gone, not only unlocked


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for a parent that does not reap it does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_a_server_address_is_not_a_lite_file():
    with pytest.raises(StoreConnectionError, match="is a server address, not a Milvus Lite file"):
        LiteProcess("http://127.0.0.1:19530")
    with pytest.raises(StoreConnectionError, match="neither a Milvus Lite file"):
        LiteProcess("/tmp/not-a-db-file.txt")


def test_what_the_child_says_after_it_serves_is_logged_and_never_stalls_it(tmp_path, caplog):
    """The child's stdout and stderr are pipes: unread, a megabyte of warnings would block the child on its next
    write, mid-request. They are drained into this process's log."""
    import logging
    import threading

    caplog.set_level(logging.WARNING, logger="milvus_store.lite_process")
    with LiteProcess(tmp_path / "own.db") as lite:
        def say():  # as the child would: its own stderr pipe, from the write end (Linux's /proc)
            with open(f"/proc/{lite.process.pid}/fd/2", "w") as stderr:
                stderr.writelines(f"warning {n} {'.' * 100}\n" for n in range(10_000))

        writer = threading.Thread(target=say, daemon=True)
        writer.start()
        writer.join(timeout=60)
        assert not writer.is_alive(), "the child's stderr was not read: a child saying this much would stall"
        with HierStore(lite.uri, "c", spec=SPEC) as store:
            store.upsert(make_records(3))
            store.flush()
            assert store.count() == 3
        def logged():
            return [r.getMessage() for r in caplog.records if r.name == "milvus_store.lite_process"]

        deadline = time.monotonic() + 30
        while len(logged()) < 10_000 and time.monotonic() < deadline:
            time.sleep(0.1)
    said = logged()
    assert len(said) == 10_000 and said[0].startswith("Milvus Lite process: warning 0 ...")
