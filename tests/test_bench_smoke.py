"""The benchmark scripts run in seconds with --smoke, so they cannot rot."""

import os
import re
import subprocess
import sys
import time

import pytest

from bench import search_latency, speed


@pytest.mark.lite
def test_search_latency_smoke(capsys):
    assert search_latency.main(["--smoke", "--indexes", "FLAT,HNSW"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| 2,000 \| (FLAT|HNSW) \| none \| [\d.]+ \| (.+?) \| ([\d.]+)% \| [\d.]+ \| [\d.]+ \| "
                      r"([\d.]+) \|$", out, re.M)
    assert len(rows) == 6
    assert {(index, share) for index, _, share, _ in rows} >= {("FLAT", "100.0"), ("HNSW", "20.0"), ("HNSW", "2.0")}
    assert all(recall == "1.000" for index, _, _, recall in rows if index == "FLAT")  # exact search
    e2e = re.search(r"^\| 2,000 \| HNSW \| (.+) \|$", out.split("end to end")[1], re.M)
    parts = [tuple(map(float, cell.split(" / "))) for cell in e2e.group(1).split(" | ")]
    assert len(parts) == 4 and all(0 < p50 <= p99 for p50, p99 in parts)


@pytest.mark.lite
def test_search_latency_compares_layouts_with_and_without_the_partition_key(capsys):
    assert search_latency.main(["--smoke", "--indexes", "FLAT", "--partition-key", "both", "--level-vectors", "none",
                                "--no-end-to-end"]) == 0
    out = capsys.readouterr().out
    assert "the 192-d image vector only" in out
    rows = re.findall(r"^\| 2,000 \| FLAT \| (none|department) \| [\d.]+ \| (.+?) \| [\d.]+% \| [\d.]+ \| [\d.]+ \| "
                      r"([\d.]+) \|$", out, re.M)
    assert sorted(key for key, _, _ in rows) == ["department"] * 3 + ["none"] * 3
    assert all(recall == "1.000" for _, _, recall in rows)  # exact search, with the key or not


@pytest.mark.unit
def test_search_latency_settles_when_files_go_quiet_and_at_most_the_limit(tmp_path):
    import os
    import time

    import numpy as np

    (tmp_path / "db").mkdir()
    segment = tmp_path / "db" / "segment.idx"
    segment.write_bytes(b"x")
    waited = search_latency.settle(tmp_path / "db", at_most_s=5, quiet_s=0.3, poll_s=0.05)
    assert 0.2 <= waited < 2  # a fresh file: waits for the quiet period, not the limit
    os.utime(segment, (time.time() + 60, time.time() + 60))  # "still being written" for the next minute
    assert 0.4 <= search_latency.settle(tmp_path / "db", at_most_s=0.5, quiet_s=0.3, poll_s=0.05) < 2
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(500, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    pool, queries = np.arange(0, 500, 3), vectors[:4] + 0.01
    top = search_latency.exact_top(vectors, pool, queries, 5, chunk=37)
    for query, ids in zip(queries, top):
        assert set(ids) == set(pool[np.argsort(((vectors[pool] - query) ** 2).sum(1))[:5]])


@pytest.mark.lite
def test_speed_smoke(capsys):
    assert speed.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    row = re.search(r"^\| 64 \| (\d+) \| (\d+) \| ([\d.]+) \| (\d+) \| (\d+) \| ([\d.]+) \|$", out, re.M)
    assert row and all(float(v) > 0 for v in row.groups())
    flops = re.search(r"^\| 64 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| (\d+) \| ([\d.]+) \|$",
                      out, re.M)
    backbone, embedder = float(flops.group(1)), float(flops.group(2))
    assert 0.01 < backbone < embedder < 1  # MobileNetV2 at 64 px: tens of MFLOPs; the pyramid adds to it
    effect = dict(re.findall(r"^\| (eager|optimized|onnxruntime|openvino) \| ([\d.]+) \|", out, re.M))
    assert {"eager", "optimized"} <= effect.keys()
    assert all(abs(float(effect["eager"]) - float(r1)) < 0.02 for r1 in effect.values())
    from embedder.runtimes import installed

    for runtime in ("torch", "onnxruntime", "openvino"):
        if installed(runtime):  # CI installs both CPU runtimes: each has its row, near eager torch
            row = re.search(rf"^\| 64 \| {runtime} \| (\d+) \| ([\d.]+) \| [\d.]+ \| [\d.]+ \| ([\d.e+-]+) "
                            r"\| (\d+) \| (\d+) \| ([\d.]+) \|$", out, re.M)
            assert row and float(row.group(1)) > 0 and float(row.group(3)) < 1e-4, (runtime, out)
            assert float(row.group(4)) > 0 and float(row.group(5)) > 0  # files embedded, then ingested


@pytest.mark.lite
def test_serve_load_smoke(capsys):
    """Eager torch on Milvus Lite (a second runtime is the Milvus 2.3 smoke's: each runtime's offline
    child and server start up the torch stack again, 23 s a runtime here)."""
    from bench import serve_load

    assert serve_load.main(["--smoke", "--runtime", "torch"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (\w+) \| process \| (\d+) \| 24 \| 0 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| "
                      r"([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", out, re.M)
    assert [(r[0], r[1]) for r in rows] == [("torch", "1"), ("torch", "4")]
    assert all(float(qps) > 0 and float(p50) <= float(p99) for _, _, qps, p50, p99, *_ in rows)
    assert all(float(row[5]) == float(row[6]) == 1.0 for row in rows if row[1] == "1")  # one client never shares
    # CPU per query: the server's, its Lite process's (a number: the child was found) and offline's
    assert all(float(row[8]) > 0 and float(row[10]) > 0 for row in rows)


@pytest.mark.server
def test_serve_load_smoke_on_a_milvus_2_3_server(capsys, embedded_milvus_server):
    """--uri: the offline path and the service both search the server's collection, and the
    server's CPU per query is its own column (a number: its process was read). With ONNX Runtime
    where it is installed (CI installs it): the Lite smoke has eager torch."""
    from bench import serve_load
    from embedder.runtimes import installed

    runtime = "onnxruntime" if installed("onnxruntime") else "torch"
    assert serve_load.main(["--smoke", "--runtime", runtime, "--uri", embedded_milvus_server.uri,
                            "--level-vectors", "none", "--store-pid", str(embedded_milvus_server.process.pid)]) == 0
    out = capsys.readouterr().out
    assert f"48 images stored (a Milvus server at {embedded_milvus_server.uri}, HNSW)" in out
    rows = re.findall(rf"^\| {runtime} \| server \| (\d+) \| 24 \| 0 \| ([\d.]+) \| .* \| ([\d.]+) \| "
                      r"([\d.]+) \+ ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", out, re.M)
    assert [r[0] for r in rows] == ["1", "4"], out
    assert all(float(qps) > 0 for _, qps, *_ in rows), out
    # the server's CPU was read (numbers, not "-"); /proc counts in 10 ms ticks, so one figure may be 0
    assert sum(float(store) + float(offline_store) for _, _, store, _, offline_store, _, _ in rows) > 0, out


@pytest.mark.unit
@pytest.mark.parametrize("argv, culprit", [
    (["--smoke", "--uri", "catalogue.db"], "--uri 'catalogue.db'"),
    (["--smoke", "--uri", "127.0.0.1:19530"], "--uri '127.0.0.1:19530'"),
    (["--smoke", "--store-pid", "1"], "--store-pid"),
])
def test_serve_load_refuses_a_store_it_cannot_use(capsys, argv, culprit):
    from bench import serve_load

    with pytest.raises(SystemExit) as exc:
        serve_load.main(argv)
    assert exc.value.code == 2 and culprit in capsys.readouterr().err


@pytest.mark.lite
def test_prediction_smoke(capsys):
    from bench import prediction

    assert prediction.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    levels = re.findall(r"^\| (department|category|item) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", out, re.M)
    assert [row[0] for row in levels] == ["department", "category", "item"]
    searches = re.findall(r"^\| (plain|auto \w+ >= 0.5) \| ([\d.]+)% \|", out, re.M)
    assert [s for s, _ in searches] == ["plain", "auto department >= 0.5", "auto category >= 0.5", "auto item >= 0.5"]
    assert searches[0][1] == "0.0"


@pytest.mark.lite
@pytest.mark.parametrize("benchmark", ["classes", "products"])
def test_quality_smoke(capsys, tmp_path, benchmark):
    from PIL import Image

    from bench import quality

    # every method runs in one of the two (each run trains and searches: 4 s here), the pyramid in both
    products = ("pyramid", "flat", "off-the-shelf")
    methods = ",".join(products if benchmark == "products" else
                       ["pyramid", *(m for m in quality.METHODS if m not in products)])
    assert quality.main(["--smoke", "--benchmark", benchmark, "--methods", methods, "--plot", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| ([\w+-]+) \| (\d) \| (.+) \|$", out, re.M)
    assert [r[0] for r in rows] == methods.split(",")
    assert [r[1] for r in rows] == ["1" if m == "off-the-shelf" else "2" for m in methods.split(",")]
    levels = 4 if benchmark == "products" else 3
    for _, _, cells in rows:
        values = [float(c.strip("*").split(" ± ")[0]) for c in cells.split(" | ")]
        assert len(values) == 4 + levels + 1
        assert all(0 <= v <= 1 for v in values[:-1]) and 0 <= values[-1] <= levels
    assert "where the pyramid model does not win" in out
    with Image.open(tmp_path / "c.png") as plot:
        assert plot.format == "PNG" and plot.width > 400

@pytest.mark.unit
def test_quality_overrides_apply_to_every_method_or_one():
    from bench import quality

    overrides = quality.parse_overrides(["lr=0.0003", "flat:softmax=0,0,0.1", "pyramid:level_weights=0.5,1,1"])
    assert quality.overrides_for(overrides, "flat") == {"lr": 0.0003, "softmax": (0, 0, 0.1)}
    assert quality.overrides_for(overrides, "pyramid") == {"lr": 0.0003, "level_weights": (0.5, 1, 1)}
    with pytest.raises(SystemExit, match="expected \\[METHOD:\\]KEY=VALUE"):
        quality.parse_overrides(["colour=red"])


@pytest.mark.unit
def test_quality_lists_every_method_the_pyramid_does_not_clearly_beat():
    from bench import quality

    def runs(r1, hier):
        return [{"metrics": {**{key: 0.5 for key, _, _ in quality.COLUMNS}, "recall@1": a,
                             **{f"consistency@10/{n}": 0.9 for n in ("department", "item")}, "hier_distance@10": h}}
                for a, h in zip(r1, hier)]

    results = {"pyramid": runs([0.80, 0.82], [0.20, 0.22]), "flat": runs([0.70, 0.72], [0.20, 0.24]),
               "flat+softmax": runs([0.79, 0.81], [0.30, 0.32]), "off-the-shelf": runs([0.90], [0.1])}
    _, losses = quality.table(results, ("department", "item"))
    by_title = {line.split(":")[0]: line for line in losses}
    assert by_title["leaf R@1"] == ("leaf R@1: pyramid 0.8100 ± 0.0141; behind off-the-shelf 0.9000 ± 0.0000; "
                                    "within 2 std of flat+softmax 0.8000 ± 0.0141")
    assert by_title["hier. distance@10"] == ("hier. distance@10: pyramid 0.2100 ± 0.0141; behind off-the-shelf "
                                             "0.1000 ± 0.0000; within 2 std of flat 0.2200 ± 0.0283")
    # a tie is listed against everyone, never counted as a win
    assert "flat 0.9000 ± 0.0000, flat+softmax" in by_title["consistency@10 department"]


@pytest.mark.unit
def test_quality_tables_title_the_h_ap_they_show():
    from bench import quality

    new = {"metrics": {"hap": 0.7, "h_ap": 0.6}}
    old = {"metrics": {"h_ap": 0.6}}  # a result written before HAPPIER's convention
    assert quality.h_ap_key({"pyramid": [new, new]}) == ("hap", "H-AP")
    assert quality.h_ap_key({"pyramid": [new], "flat": [old]}) == ("h_ap", "H-AP (query not counted)")


@pytest.mark.unit
def test_quality_report_only_needs_results(tmp_path):
    from bench import quality

    with pytest.raises(SystemExit, match="no results in"):
        quality.main(["--report-only", "--out", str(tmp_path)])


@pytest.mark.slow
def test_train_scale_smoke(capsys):
    from bench import train_scale

    assert train_scale.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (\d) \| cpu \| 8 \| (\d+) \| ([\d.]+) \| \d+ \| ([\d., ]+) \| (.+) \|$", out, re.M)
    assert [r[0] for r in rows] == ["1", "2"]
    assert rows[0][2] == "1.00" and float(rows[1][2]) > 0
    assert all(len(r[3].split(", ")) == 2 for r in rows)  # R@1 after each of the 2 epochs, from rank 0


@pytest.mark.slow
def test_train_scale_stages_and_memory_smoke(capsys):
    from bench import train_scale

    assert train_scale.main(["--smoke", "--stages", "--memory", "40,120", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    stage = re.findall(r"^\| 32 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| (loader|model step) \|$", out, re.M)
    assert len(stage) == 1 and all(float(rate) > 0 for rate in stage[0][:3])
    memory = re.findall(r"^\| (\d+) \| (\d+) \| ([-\d.]+) \| (\d+) \|$", out, re.M)
    assert [int(row[0]) for row in memory] == [40, 120] and memory[0][2] == "-"
    assert all(int(row[1]) > 100 for row in memory)  # MiB: a torch process


def test_memory_arithmetic_matches_hand_computed_bytes(capsys):
    from bench import memory

    assert memory.index_bytes("FLAT", 192) == (768, 0)
    assert memory.index_bytes("HNSW", 64) == (256 + 128 * (1 + 1 / 16), 0)
    assert memory.index_bytes("IVF_SQ8", 192) == (200, 0)
    assert memory.index_bytes("DISKANN", 192) == (96, 768 + 256)
    image_only = memory.per_image("HNSW", [64, 64, 64], level_vectors=False)
    every = memory.per_image("HNSW", [64, 64, 64], level_vectors=True)
    assert every["vectors"] - image_only["vectors"] == 3 * memory.index_bytes("HNSW", 64)[0]
    assert memory.main(["--images", "1000"]) == 0
    assert "| HNSW | image vector only | 1 |" in capsys.readouterr().out


@pytest.mark.lite
def test_ingest_scale_smoke(capsys, torch_threads):
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'hiervec[ray]' (CI installs it)")
    import torch

    from bench import ingest_scale

    torch_threads(1)  # as in a pytest-xdist worker (tests/conftest.py)
    assert ingest_scale.main(["--smoke"]) == 0
    assert torch.get_num_threads() == 1  # its single-process row takes every core, then gives them back
    out = capsys.readouterr().out
    rows = re.findall(r"^\| 32 px \| 16 \| (.+?) \| ([\d.]+) \| ([\d.]+) \|.*\|$", out, re.M)
    assert [name for name, _, _ in rows] == ["single process", "Ray, 2 actors"]
    assert rows[0][2] == "1.00" and all(float(rate) > 0 for _, rate, _ in rows)
    writes = dict(re.findall(r"^\| (upsert into Milvus Lite \(\+ flush\)|bulk-import Parquet files "
                             r"\(LocalBulkWriter\)) \| ([\d,]+) \|$", out, re.M))
    assert len(writes) == 2 and all(int(v.replace(",", "")) > 0 for v in writes.values())



@pytest.mark.unit
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads another process's CPU time from /proc")
def test_cpu_time_per_image_counts_this_process_and_a_child():
    from bench._machine import child_processes, cpu_seconds
    from bench.ingest_lite_process import rate_and_cpu

    def burn(seconds: float) -> None:  # this thread's CPU time: at least as much wall time, and process time
        started = time.thread_time()
        while time.thread_time() - started < seconds:
            pass

    images_per_s, cpu_ms = rate_and_cpu(lambda: burn(0.02), images=2, repeats=3)
    assert 10 <= cpu_ms <= 40 and 0 < images_per_s <= 100  # 20 ms of CPU per pass of 2 images
    child = subprocess.Popen([sys.executable, "-c", "import sys, time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.3: pass\nprint(flush=True)\nsys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        child.stdout.readline()  # it has burnt 0.3 s
        assert child.pid in child_processes(os.getpid())
        assert 0.25 <= cpu_seconds(child.pid) < 5
    finally:
        child.communicate()
    assert cpu_seconds(child.pid) is None  # gone


@pytest.mark.unit
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads other processes' CPU time from /proc")
def test_a_servers_cpu_time_counts_its_children():
    """A Milvus server's launcher does no work itself: `--store-pid` must count the server it starts."""
    from bench._machine import tree_cpu_seconds

    burner = ("import sys, time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
              "print(flush=True)\nsys.stdin.read()")
    launcher = subprocess.Popen([sys.executable, "-c", "import subprocess, sys\n"
                                 f"subprocess.run([sys.executable, '-c', {burner!r}])"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        launcher.stdout.readline()  # its child has burnt 0.3 s
        assert 0.25 <= tree_cpu_seconds(launcher.pid) < 5
        assert tree_cpu_seconds(None) == 0.0
    finally:
        launcher.communicate()


@pytest.mark.unit
def test_ingest_lite_process_refuses_a_server_pid_without_a_server(capsys):
    from bench import ingest_lite_process

    with pytest.raises(SystemExit) as exc:
        ingest_lite_process.main(["--store-pid", "1"])
    assert exc.value.code == 2 and "--store-pid" in capsys.readouterr().err


@pytest.mark.lite
def test_reindex_smoke(capsys, tmp_path):
    from bench import reindex

    assert reindex.main(["--smoke", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    rates = re.findall(r"^round 0: ingest ([\d.]+) img/s, reindex ([\d.]+) img/s, ratio ([\d.]+)$", out, re.M)
    assert len(rates) == 1 and all(float(v) > 0 for v in rates[0])
    assert "over 1 round(s), 16 images at 32 px (noise PNGs)" in out
