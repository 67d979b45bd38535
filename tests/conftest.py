import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on a two-core machine: one torch thread each (and
    # for the processes they start), or two workers' thread pools oversubscribe the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

# `make test` runs two pytest-xdist workers, and tests that share something costly or machine-wide
# run in one of them, one after another: the session's Milvus 2.3 standalone (a minute to start,
# another to stop, and two cannot run side by side) and Ray clusters. Every other test goes with
# its module, so that module fixtures are built once, except in the modules of `PER_TEST` (no module
# fixtures, long tests), whose tests are groups of their own that the workers share out. `RAY` names
# the tests that start a Ray. The groups come from test ids alone (the
# scheduler sees nothing else): a test that uses the Milvus 2.3 server says so in its name or
# parameter (`milvus_2_3`, `milvus-2.3`), and `pytest_runtest_setup` fails one that does not.
MILVUS_2_3 = ("milvus-2.3", "milvus_2_3")
# The longest groups are handed out first, so that no worker is left with one at the end.
LONG_FIRST = ("milvus-2.3", "ray", "tests/embedder/test_torchrun.py", "tests/reliability/test_faults.py",
              "tests/service/test_serve.py", "tests/embedder/test_training.py", "tests/test_bench_smoke.py",
              "tests/embedder/test_runtimes.py", "tests/embedder/test_streaming.py", "tests/reliability/test_misuse.py",
              "tests/milvus_store/test_filtered_recall.py", "tests/milvus_store/test_store.py")

PER_TEST = ("tests/test_bench_smoke.py",)
# Tests that start a Ray of their own (a local Ray takes the machine's cores and is slow to start beside another).
RAY = ("tests/scaleout/", "tests/test_bench_smoke.py::test_ingest_scale_smoke")

LEVELS = ("department", "category", "item")
LEAVES = ("clothing/tops/shirt", "clothing/tops/coat", "clothing/bottoms/trouser", "footwear/boots/boot")


def needs(module: str, reason: str) -> pytest.MarkDecorator:
    """Skip where `module` is not installed, without importing it to find out: every pytest-xdist worker collects
    every test module, and FiftyOne or LlamaIndex take 3-4 s each to import (the tests import them)."""
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=reason)


@pytest.fixture(scope="session", autouse=True)
def export_cache(tmp_path_factory) -> Path:
    """Models exported for ONNX Runtime and OpenVINO (`--runtime`) go to a folder of this run, not ~/.cache."""
    folder = tmp_path_factory.mktemp("export-cache")
    os.environ["HIERVEC_CACHE"] = str(folder)  # also for the `hiervec serve` processes tests start
    return folder


@pytest.fixture
def torch_threads():
    """`torch.set_num_threads`, for a test that sets the count to see who changes it; the count this
    process had is given back after the test (the worker's later tests run on it)."""
    import torch

    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """An untrained, seeded resnet18 checkpoint (32 px, 8 dims per level) for `LEAVES`: fast, deterministic.

    Its classifiers' scale is 1, so its untrained predictions are unsure (no probability
    of 1), as routing and relabel tests need.
    """
    import torch

    from embedder import EmbedderConfig, Hierarchy, PyramidEmbedder, save_checkpoint

    hierarchy = Hierarchy.from_paths(list(LEAVES), LEVELS)
    torch.manual_seed(0)
    config = EmbedderConfig.for_hierarchy(hierarchy, dim=8, backbone="resnet18", image_size=32, fpn_channels=16,
                                          classifier_scale=1.0)
    path = tmp_path_factory.mktemp("tiny-model") / "model.pt"
    save_checkpoint(path, PyramidEmbedder(config), hierarchy)
    return path


@pytest.fixture(scope="session")
def lite_server(tmp_path_factory):
    """A `milvus-lite server` on a free loopback port, for client/server tests."""
    from .servers import LiteServer

    with LiteServer(tmp_path_factory.mktemp("milvus-lite-server")) as server:
        yield server.uri


@pytest.fixture(scope="session")
def embedded_milvus_server(tmp_path_factory):
    """The real Milvus 2.3 standalone of PyPI's `milvus` package (`milvus-server`), without Docker:
    one for the session (it takes a minute to start and to stop)."""
    from .servers import EmbeddedMilvus

    if EmbeddedMilvus.executable() is None:
        pytest.skip("PyPI's `milvus` package (milvus-server, Milvus 2.3 standalone) is not installed; "
                    "pip install 'milvus==2.3.5' (x86_64 Linux)")
    with EmbeddedMilvus(tmp_path_factory.mktemp("milvus-server")) as server:
        GROUP_END.setdefault("milvus-2.3", []).append(server.stop)  # idle, it still takes a tenth of a core
        yield server


@pytest.fixture(scope="session")
def embedded_milvus(embedded_milvus_server) -> str:
    """The address of `embedded_milvus_server`."""
    return embedded_milvus_server.uri


@pytest.fixture(scope="session")
def s3_catalogue(tmp_path_factory):
    """A catalogue in an S3 stand-in (moto's server on loopback) and a manifest of it.

    Three images of each of `LEAVES` under ``s3://catalogue/images/<leaf>/``, one more the
    reader is denied (``denied.png``, first leaf), and a CSV manifest listing them with an
    object that does not exist (second leaf), a local file (third leaf) and a ``file://`` URL
    (fourth leaf). Tests set `server.environment` (the ``AWS_*`` variables) to read it.
    """
    pytest.importorskip("moto", reason="moto is not installed: pip install 'moto[server]' (the dev extra has it)")
    pytest.importorskip("s3fs", reason="s3fs is not installed: pip install 'hiervec[s3]' (the dev extra has it)")
    import csv
    import io
    from types import SimpleNamespace

    from PIL import Image

    from .servers import S3StandIn

    rng = np.random.default_rng(11)

    def png() -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, size=(40, 40, 3), dtype=np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    objects = {f"images/{leaf}/{i}.png": png() for leaf in LEAVES for i in range(3)}
    objects["images/denied.png"] = png()
    folder = tmp_path_factory.mktemp("s3-catalogue")
    local, via_url = folder / "local.png", folder / "local via url.png"
    local.write_bytes(png())
    via_url.write_bytes(png())
    with S3StandIn("catalogue", objects, denied=("images/denied.png",)) as server:
        rows = [(server.url(key), key.split("/", 1)[1].rsplit("/", 1)[0]) for key in objects if key != "images/denied.png"]
        rows += [(server.url("images/denied.png"), LEAVES[0]), (server.url("images/missing.png"), LEAVES[1]),
                 (str(local), LEAVES[2]), (via_url.as_uri(), LEAVES[3])]
        manifest = folder / "manifest.csv"
        with open(manifest, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "category"])
            writer.writerows(rows)
        yield SimpleNamespace(server=server, manifest=manifest, rows=rows, denied=server.url("images/denied.png"),
                              missing=server.url("images/missing.png"), local=local, via_url=via_url)


@pytest.fixture
def s3_environment(s3_catalogue, monkeypatch):
    """The credentials and endpoint of `s3_catalogue`'s reader in this process's environment, as s3fs reads them."""
    for key, value in s3_catalogue.server.environment.items():
        monkeypatch.setenv(key, value)
    return s3_catalogue


def xdist_group(nodeid: str) -> str:
    """The group a pytest-xdist worker runs the test `nodeid` in: "milvus-2.3", "ray", its module, or
    itself in a module of `PER_TEST`."""
    if any(name in nodeid for name in MILVUS_2_3):
        return "milvus-2.3"
    if nodeid.startswith(RAY):
        return "ray"
    module = nodeid.split("::", 1)[0]
    return nodeid if module in PER_TEST else module


def pytest_xdist_make_scheduler(config, log):
    """Hand whole groups (`xdist_group`) to the workers, in collection order (longest first)."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid)

    config.option.loadscopereorder = False
    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """The longest groups first (stable within a group)."""
    groups = {}
    for item in items:
        groups.setdefault(xdist_group(item.nodeid), []).append(item)
    rank = {group: n for n, group in enumerate(LONG_FIRST)}
    order = sorted(groups, key=lambda group: rank.get(group.split("::", 1)[0], len(rank)))
    items[:] = [item for group in order for item in groups[group]]


GROUP_END: dict[str, list] = {}  # what a group's session fixtures stop once the group's last test has run


@pytest.hookimpl(trylast=True)  # after the test's own fixtures are torn down
def pytest_runtest_teardown(item, nextitem):
    """A group's tests run one after another in one worker (`xdist_group`): when the next test (None: there
    is none) is of another group, stop what only this group uses, not at the end of the whole run."""
    group = xdist_group(item.nodeid)
    if nextitem is None or xdist_group(nextitem.nodeid) != group:
        for stop in GROUP_END.pop(group, []):
            stop()


def pytest_runtest_setup(item):
    """A test that starts the Milvus 2.3 server outside its group would start a second one in the other
    worker (which fails): its id must name it."""
    uses = {"embedded_milvus", "embedded_milvus_server"} & set(item.fixturenames)
    if uses and xdist_group(item.nodeid) != "milvus-2.3":
        pytest.fail(f"{item.nodeid} uses {sorted(uses)[0]}: put 'milvus_2_3' in its name (tests/conftest.py, "
                    "MILVUS_2_3) so that one pytest-xdist worker runs every test of that server")
