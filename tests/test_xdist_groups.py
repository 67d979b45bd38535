"""`make test`'s pytest-xdist workers take whole groups (tests/conftest.py): the groups follow from
test ids, and the ordering table names only groups that exist."""

from pathlib import Path

import pytest

from .conftest import GROUP_END, LONG_FIRST, pytest_runtest_setup, pytest_runtest_teardown, xdist_group

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]


def test_tests_of_the_milvus_2_3_server_and_of_ray_share_a_group_and_the_rest_go_by_module():
    assert xdist_group("tests/milvus_store/test_store.py::TestStoreContract::test_iterator[milvus-2.3]") == "milvus-2.3"
    assert xdist_group("tests/milvus_store/test_store.py::test_filters[milvus-2.3-not]") == "milvus-2.3"
    assert xdist_group("tests/test_bench_smoke.py::test_serve_load_smoke_on_a_milvus_2_3_server") == "milvus-2.3"
    assert xdist_group("tests/scaleout/test_ray_ingest.py::test_the_cli_runs_the_ray_engine") == "ray"
    assert xdist_group("tests/test_bench_smoke.py::test_ingest_scale_smoke") == "ray"  # it starts a local Ray
    assert xdist_group("tests/milvus_store/test_store.py::TestStoreContract::test_iterator[lite]") == \
        "tests/milvus_store/test_store.py"
    assert xdist_group("tests/test_defaults.py::test_registries_cover_exactly_the_names") == "tests/test_defaults.py"
    # the benchmark smokes share no module fixture: each is a group, so that the workers share them out
    assert xdist_group("tests/test_bench_smoke.py::test_speed_smoke") == "tests/test_bench_smoke.py::test_speed_smoke"


def test_every_group_named_first_exists():
    modules = [group for group in LONG_FIRST if group not in ("milvus-2.3", "ray")]
    assert len(set(LONG_FIRST)) == len(LONG_FIRST)
    assert [m for m in modules if not (ROOT / m).is_file()] == []


def test_a_test_that_uses_the_milvus_2_3_server_without_naming_it_fails_at_setup():
    class Item:
        def __init__(self, nodeid, fixturenames):
            self.nodeid, self.fixturenames = nodeid, fixturenames

    with pytest.raises(pytest.fail.Exception, match=r"tests/a.py::test_x uses embedded_milvus: put 'milvus_2_3' in"):
        pytest_runtest_setup(Item("tests/a.py::test_x", ["tmp_path", "embedded_milvus"]))
    pytest_runtest_setup(Item("tests/a.py::test_x_on_milvus_2_3", ["embedded_milvus"]))
    pytest_runtest_setup(Item("tests/a.py::test_x[milvus-2.3]", ["target"]))  # the store fixture's parameter
    pytest_runtest_setup(Item("tests/a.py::test_x", ["tmp_path"]))


def test_what_a_group_started_stops_after_its_last_test_not_at_the_end_of_the_run(monkeypatch):
    class Item:
        def __init__(self, nodeid):
            self.nodeid = nodeid

    stopped = []
    monkeypatch.setitem(GROUP_END, "milvus-2.3", [lambda: stopped.append("server")])
    first, last = Item("tests/a.py::test_x[milvus-2.3]"), Item("tests/b.py::test_y_on_milvus_2_3")
    pytest_runtest_teardown(first, last)  # the next test is of the same group
    assert stopped == [] and "milvus-2.3" in GROUP_END
    pytest_runtest_teardown(last, Item("tests/b.py::test_z"))
    assert stopped == ["server"] and "milvus-2.3" not in GROUP_END
    pytest_runtest_teardown(Item("tests/b.py::test_z"), None)  # the run's last test: its group started nothing
    assert stopped == ["server"]
