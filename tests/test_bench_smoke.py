"""The benchmark scripts run in seconds with --smoke, so they cannot rot."""

import re

import pytest

from bench import search_latency, speed


@pytest.mark.lite
def test_search_latency_smoke(capsys):
    assert search_latency.main(["--smoke", "--indexes", "FLAT,HNSW"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (FLAT|HNSW) \| [\d.]+ \| (.+?) \| ([\d.]+)% \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|$", out, re.M)
    assert len(rows) == 6
    assert {(index, share) for index, _, share, _ in rows} >= {("FLAT", "100.0"), ("HNSW", "20.0"), ("HNSW", "2.0")}
    assert all(recall == "1.000" for index, _, _, recall in rows if index == "FLAT")  # exact search


@pytest.mark.lite
def test_speed_smoke(capsys):
    assert speed.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    row = re.search(r"^\| 64 \| (\d+) \| (\d+) \| ([\d.]+) \| (\d+) \| (\d+) \| ([\d.]+) \|$", out, re.M)
    assert row and all(float(v) > 0 for v in row.groups())


@pytest.mark.lite
def test_serve_load_smoke(capsys):
    from bench import serve_load

    assert serve_load.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (\d+) \| 24 \| 0 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$",
                      out, re.M)
    assert [r[0] for r in rows] == ["1", "4"]
    assert all(float(qps) > 0 and float(p50) <= float(p99) for _, qps, p50, p99, *_ in rows)
    assert float(rows[0][4]) == float(rows[0][5]) == 1.0  # one client never shares a batch


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
