"""`hiervec ingest --engine ray`: the same collection and report as the single-process ingest.

Ray runs on loopback: a local Ray of 2 CPUs, and a 2-node cluster on this machine
(`ray.cluster_utils.Cluster`). Skipped with the reason where Ray is not installed (CI
installs it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli.main import cli
from embedder import Embedder, read_source
from milvus_store import HierStore, path_uri
from hiervec_app import ImageIndex, IngestItem
from scaleout import EmbedderRecipe, RayOptions, ScaleOutError, ray_ingest
from scaleout.ray_engine import STARTUP_TIMEOUTS, start_local_ray, started_again_after_timeouts

from ..conftest import LEAVES

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'hiervec[ray]' (CI installs it)")

pytestmark = pytest.mark.lite


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """12 images over 4 leaves, a copy of one under another name, a truncated PNG and a copy of it,
    a text file with an image's name, an empty file, and an unlabelled image at the root."""
    root = tmp_path_factory.mktemp("ray-tree")
    rng = np.random.default_rng(3)
    for n, leaf in enumerate(LEAVES):
        (root / leaf).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, size=(36, 36, 3), dtype=np.uint8)
            pixels[:, : 6 * (n + 1)] = (60 * n, 40 * i, 200)
            Image.fromarray(pixels).save(root / leaf / f"{i}.png")
    shutil.copy(root / LEAVES[0] / "0.png", root / LEAVES[1] / "copy-of-shirt-0.png")
    (root / LEAVES[2] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    shutil.copy(root / LEAVES[2] / "broken.png", root / LEAVES[3] / "broken-again.png")
    (root / LEAVES[3] / "text.png").write_text("not an image at all")
    (root / LEAVES[3] / "empty.png").write_bytes(b"")
    Image.fromarray(rng.integers(0, 255, size=(36, 36, 3), dtype=np.uint8)).save(root / "unlabelled.png")
    return root


def items_of(tree):
    listing = read_source(tree)
    return [IngestItem(i.path, i.category, i.id, i.meta, path_uri(i.path.resolve()), i.origin)
            for i in listing.items]


def stored(uri: str, collection: str = "images") -> dict:
    with HierStore(uri, collection, create=False) as store:
        rows = {row["id"]: row for batch in store.row_batches(batch_size=100) for row in batch}
        return rows


def failures_of(report) -> set:
    return {(f.source, f.stage, f.reason) for f in report.failed}


@pytest.fixture(scope="module")
def single(tree, tiny_model, tmp_path_factory):
    """The single-process ingest of the tree: what the Ray engine must reproduce."""
    uri = str(tmp_path_factory.mktemp("single") / "single.db")
    embedder = Embedder.from_checkpoint(tiny_model, runtime="torch")
    with ImageIndex.open(embedder, uri, "images") as index:
        report = index.ingest(items_of(tree), batch_size=4)
    return uri, report


LOCAL_RAY = {"num_cpus": 2, "include_dashboard": False, "_node_ip_address": "127.0.0.1", "log_to_driver": False}


@pytest.fixture
def local_ray():
    """A local Ray of 2 CPUs on loopback (started once, shut down by the 2-node test or at the end), as
    the Ray engine starts one: started again when it did not come up in time."""
    if not ray.is_initialized():
        start_local_ray(ray, **LOCAL_RAY)


@pytest.fixture(scope="module", autouse=True)
def no_ray_left():
    yield
    if ray.is_initialized():
        ray.shutdown()


def run_ray(tree, model, uri, options, **kwargs):
    embedder = Embedder.from_checkpoint(model, runtime="torch")
    with ImageIndex.open(embedder, uri, "images") as index:
        return ray_ingest(index, items_of(tree), EmbedderRecipe(str(model), runtime="torch"), options, **kwargs)


def assert_same_collection(uri: str, single_uri: str, collection: str = "images") -> None:
    got, want = stored(uri, collection), stored(single_uri)
    assert sorted(got) == sorted(want)
    for rid, row in want.items():
        for name in ("uri", "meta", "department", "category", "item", "predicted"):
            assert got[rid][name] == row[name], (rid, name)
        for name in ("conf_department", "conf_category", "conf_item"):
            assert got[rid][name] == pytest.approx(row[name], abs=1e-5)
        for name in ("vec", "vec_department", "vec_category", "vec_item"):
            np.testing.assert_allclose(got[rid][name], row[name], atol=1e-5)


def ray_processes() -> dict[int, str]:
    """This process's Ray node processes (GCS server, raylet) that are running, by pid."""
    import psutil

    found = {}
    for child in psutil.Process().children(recursive=True):
        try:
            if child.name() in ("gcs_server", "raylet") and child.status() != psutil.STATUS_ZOMBIE:
                found[child.pid] = child.name()
        except psutil.NoSuchProcess:
            pass
    return found


def test_a_local_ray_that_did_not_come_up_in_time_is_stopped_and_started_again(monkeypatch):
    """The real timeout of a real start: the first node's raylet "never registers" (Ray's 30 s wait is
    made to pass at once); its processes are stopped and the second start is the Ray the tests use."""
    import time

    from ray._private import node as ray_node
    from ray._private import services

    if ray.is_initialized():
        ray.shutdown()
    real_get_node, first, late = services.get_node, {}, []

    def get_node(gcs_address, node_id):
        if not first:  # the first start: its GCS server and raylet run, and the raylet is "not registered"
            first.update(ray_processes())
            late.append(True)
            raise RuntimeError("node not found (as if the raylet had not registered yet)")
        return real_get_node(gcs_address, node_id)

    class Clock:  # node.py's clock: 31 s pass once, right after the registration check failed
        def __getattr__(self, name):
            return getattr(time, name)

        def monotonic(self):
            return time.monotonic() + (31 if late and late.pop() else 0)

    monkeypatch.setattr(services, "get_node", get_node)
    monkeypatch.setattr(ray_node, "time", Clock())
    start_local_ray(ray, **LOCAL_RAY)
    assert sorted(first.values()) == ["gcs_server", "raylet"]  # the failed start had started both
    assert ray.is_initialized() and ray.cluster_resources()["CPU"] == 2
    now = ray_processes()
    assert sorted(now.values()) == ["gcs_server", "raylet"] and not set(now) & set(first)  # theirs were stopped

    class NotStarted(Exception):
        pass

    tries = []

    def fails(error):
        def init(**_):
            tries.append(1)
            raise error
        return type("FakeRay", (), {"init": staticmethod(init), "shutdown": staticmethod(lambda: None)})

    with pytest.raises(NotStarted):  # not a startup timeout: raised at once
        start_local_ray(fails(NotStarted("bad argument")), num_cpus=1)
    assert len(tries) == 1
    with pytest.raises(NotStarted, match=STARTUP_TIMEOUTS[1]):  # a timeout every time: the last one is raised
        start_local_ray(fails(NotStarted(f"The current node {STARTUP_TIMEOUTS[1]}.")), attempts=3)
    assert len(tries) == 4


def test_ray_ingest_stores_what_the_single_process_ingest_stores(tree, tiny_model, single, local_ray, tmp_path):
    single_uri, want = single
    assert (want.stored, want.predicted, len(want.failed), len(want.duplicates)) == (13, 1, 4, 1)  # the tree
    uri = str(tmp_path / "ray.db")
    seen = []
    report = run_ray(tree, tiny_model, uri, RayOptions(actors=2, cpus_per_actor=0.5, batch_size=4),
                     progress=seen.append)
    assert (report.seen, report.stored, report.skipped_present, report.predicted) == (
        want.seen, want.stored, want.skipped_present, want.predicted)
    assert failures_of(report) == failures_of(want)
    assert [(d.source, d.same_as, d.id) for d in report.duplicates] == [
        (d.source, d.same_as, d.id) for d in want.duplicates]
    assert sorted(report.ids) == sorted(want.ids) and sum(seen) == report.seen
    assert report.items == want.items  # every item's outcome, in listing order: the pipeline's rules, once
    assert {o.status for o in want.items} == {"stored", "duplicate", "failed"}
    assert_same_collection(uri, single_uri)

    again = run_ray(tree, tiny_model, uri, RayOptions(actors=1, batch_size=8))
    assert (again.stored, again.skipped_present, len(again.duplicates)) == (0, 13, 1)
    assert failures_of(again) == failures_of(want)
    assert [o.status for o in again.items] == [
        "present" if o.status == "stored" else o.status for o in want.items]
    assert len(stored(uri)) == 13


def test_ray_ingest_into_a_server_uses_writer_actors(tree, tiny_model, single, local_ray, lite_server):
    from milvus_store import HierStore as Store

    report = run_ray(tree, tiny_model, lite_server, RayOptions(actors=1, writers=2, batch_size=4))
    assert report.stored == 13 and failures_of(report) == failures_of(single[1])
    with Store(lite_server, "images", create=False) as store:
        assert store.count() == 13
        store.drop()


@pytest.mark.unit
def test_bad_options_and_bytes_are_refused_with_their_names(tiny_model, tmp_path):
    for kwargs, name in (({"actors": 0}, "actors"), ({"cpus_per_actor": 0}, "cpus_per_actor"),
                         ({"writers": 100}, "writers"), ({"batch_size": 0}, "batch_size")):
        with pytest.raises(ScaleOutError, match=name):
            RayOptions(**kwargs)
    embedder = Embedder.from_checkpoint(tiny_model, runtime="torch")
    with ImageIndex.open(embedder, str(tmp_path / "x.db"), "images") as index:
        with pytest.raises(ScaleOutError, match="files"):
            ray_ingest(index, [IngestItem(b"bytes", "clothing/tops/shirt")], EmbedderRecipe(str(tiny_model)))


def test_the_cli_runs_the_ray_engine(tree, tiny_model, single, local_ray, tmp_path):
    # on the Ray this process already joined, as a script that calls ray.init first would (a Ray of
    # its own for each command is the S3 test's: 17 s more here, 47 s against 30 s)
    uri = str(tmp_path / "cli.db")
    result = CliRunner().invoke(cli, ["ingest", str(tree), "--model", str(tiny_model), "--uri", uri,
                                      "--collection", "images", "--engine", "ray", "--actors", "2",
                                      "--runtime", "torch", "--batch-size", "4", "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert '"stored": 13' in result.output and '"failed": 4' in result.output
    assert_same_collection(uri, single[0])

    # reindex on the same engine (here with the same model: the same rows, predictions made again)
    result = CliRunner().invoke(cli, ["reindex", "--model", str(tiny_model), "--uri", uri, "--to", "again",
                                      "--engine", "ray", "--actors", "2", "--runtime", "torch", "--batch-size", "4",
                                      "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert '"stored": 13' in result.output and '"complete": true' in result.output
    assert_same_collection(uri, single[0], "again")


def ray_stop() -> None:
    ray_command = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    subprocess.run([ray_command, "stop", "--force"], capture_output=True, timeout=120)


def start_cluster(Cluster, attempts: int = 3, stop=ray_stop):
    """Ray's two-node test cluster, started again (after `ray stop --force`) when a node did not come
    up in time, by the engine's own rule (`started_again_after_timeouts`); any other failure, or the last
    attempt's, is the test's."""
    def start():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        return cluster

    return started_again_after_timeouts(start, lambda _: stop(), attempts)  # stop: what the failed start left


@pytest.mark.unit
def test_the_test_cluster_is_started_again_only_after_a_startup_timeout():
    class Flaky:
        starts = 0

        def __init__(self, fail_with: list[Exception], **_):
            Flaky.starts += 1
            if fail_with:
                raise fail_with.pop(0)

        def add_node(self, **_):
            pass

        def wait_for_nodes(self):
            pass

    stops = []
    timeouts = [Exception("The current node timed out during startup. This could happen ..."),
                RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_y")]
    cluster = start_cluster(lambda **kw: Flaky(timeouts, **kw), stop=lambda: stops.append(1))
    assert isinstance(cluster, Flaky) and Flaky.starts == 3 and len(stops) == 2
    with pytest.raises(ValueError, match="bad argument"):  # not a startup timeout: no second start
        start_cluster(lambda **kw: Flaky([ValueError("bad argument")], **kw), stop=lambda: stops.append(1))
    assert len(stops) == 2
    never = [Exception("The current node timed out during startup.") for _ in range(3)]
    with pytest.raises(Exception, match="timed out during startup"):  # the last attempt's failure is the test's
        start_cluster(lambda **kw: Flaky(never, **kw), stop=lambda: stops.append(1))
    assert len(stops) == 4


def test_a_two_node_ray_cluster_runs_the_same_ingest(tree, tiny_model, single, tmp_path):
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    # Two raylets on this machine; Ray's test cluster binds the machine's own address (its
    # node_ip_address does not reach the GCS), which nothing outside this machine can reach here.
    cluster = start_cluster(Cluster)
    try:
        ray.init(address=cluster.address)
        assert len([node for node in ray.nodes() if node["Alive"]]) == 2
        assert ray.cluster_resources()["CPU"] == 2
        ray.shutdown()
        uri = str(tmp_path / "cluster.db")  # --ray-address: ray_ingest connects, and disconnects at the end
        report = run_ray(tree, tiny_model, uri, RayOptions(address=cluster.address, actors=2, cpus_per_actor=0.5,
                                                           batch_size=4))
        assert not ray.is_initialized()
        assert report.stored == single[1].stored and failures_of(report) == failures_of(single[1])
        assert_same_collection(uri, single[0])
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def test_the_ray_engine_reads_a_manifest_of_s3_urls_and_reports_the_missing_and_the_denied_object(
        s3_environment, tiny_model, tmp_path):
    if ray.is_initialized():
        ray.shutdown()  # Ray's workers take their environment (here the S3 reader's credentials) when Ray starts
    try:
        result = CliRunner().invoke(cli, ["ingest", str(s3_environment.manifest), "--model", str(tiny_model), "--uri",
                                          str(tmp_path / "s3.db"), "--collection", "images", "--engine", "ray",
                                          "--actors", "1", "--runtime", "torch", "--batch-size", "4", "--json"])
    finally:
        ray.shutdown()
    assert result.exit_code == 0, (result.output, result.exception)
    import json

    summary = json.loads(result.stdout)
    assert summary["stored"] == len(s3_environment.rows) - 2
    failures = {f["source"].rsplit(" (", 1)[-1].rstrip(")"): (f["stage"], f["reason"]) for f in summary["failures"]}
    assert failures == {s3_environment.missing: ("read", "cannot read: does not exist"),
                        s3_environment.denied: ("read", "cannot read: permission denied")}
    uris = {row["uri"] for row in stored(str(tmp_path / "s3.db")).values()}
    assert {url for url, _ in s3_environment.rows[:12]} <= uris and str(s3_environment.local) in uris


@pytest.mark.unit
def test_an_address_where_nothing_answers_is_one_line_within_the_timeout(tree, tiny_model, tmp_path):
    import socket
    import time

    from scaleout.ray_engine import check_reachable

    from ..servers import free_port

    if ray.is_initialized():
        ray.shutdown()
    port = free_port()  # nothing listens there
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["ingest", str(tree), "--model", str(tiny_model), "--uri", str(tmp_path / "r.db"),
                                      "--engine", "ray", "--ray-address", f"127.0.0.1:{port}", "--runtime", "torch"])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert f"cannot reach the Ray cluster at '127.0.0.1:{port}' within 10 s" in result.stderr
    assert time.monotonic() - started < 60 and not ray.is_initialized()
    with pytest.raises(ScaleOutError, match=f"at 'ray://127.0.0.1:{port}' within 0.5 s"):
        check_reachable(f"ray://127.0.0.1:{port}", timeout=0.5)
    with socket.socket() as listening:  # an address that answers passes; "auto" is Ray's to resolve
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        check_reachable(f"127.0.0.1:{listening.getsockname()[1]}")
    check_reachable("auto")
