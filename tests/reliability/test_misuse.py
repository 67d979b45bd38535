"""Misuse: a model of another collection, unknown levels, filter values crafted to alter the expression,
and secrets: each gets a clear error or an exact result, nothing is written, no token shows."""

from __future__ import annotations

import json
import logging
import subprocess

import numpy as np
import pytest

from embedder import EmbedderConfig, Hierarchy, PyramidEmbedder, save_checkpoint
from milvus_store import CollectionSpec, Eq, FilterError, HierStore, Record, StoreConnectionError

from ..conftest import LEAVES, LEVELS
from ..servers import LiteServer
from .test_faults import make_tree, stored_ids

CRAFTED = [
    'clothing" or department != "',
    "clothing' or 1==1 or '",
    "clothing\\",
    'clothing\\" or 1==1 or \\"',
    "clothing\n or 1==1",
    "clothing) or (1==1",
    "clothing\u2028or 1==1",
]


def model(tmp_path, name, *, dim=8, levels=LEVELS, leaves=LEAVES, seed=0):
    import torch

    hierarchy = Hierarchy.from_paths(list(leaves), levels)
    torch.manual_seed(seed)
    config = EmbedderConfig.for_hierarchy(hierarchy, dim=dim, backbone="resnet18", image_size=32, fpn_channels=16)
    path = tmp_path / f"{name}.pt"
    save_checkpoint(path, PyramidEmbedder(config), hierarchy)
    return path


def hiervec(*args) -> subprocess.CompletedProcess:
    """The CLI in this process (click's runner, stdout and stderr apart): what a user's shell shows, without
    the seconds each new process spends importing torch."""
    from click.testing import CliRunner

    from cli.main import cli

    result = CliRunner().invoke(cli, list(map(str, args)), prog_name="hiervec")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback in the test, as a process would have printed one
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


@pytest.fixture(scope="module")
def filled(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("misuse")
    make_tree(root / "tree", per_leaf=6)
    db = root / "misuse.db"
    assert hiervec("ingest", root / "tree", "--model", tiny_model, "--uri", db).returncode == 0
    return root, db, sorted(stored_ids(str(db)))


@pytest.mark.lite
@pytest.mark.parametrize("variant, field", [
    ({"dim": 4}, "dim"),
    ({"levels": ("department", "item"), "leaves": ("clothing/shirt", "footwear/boot")}, "level_names"),
    ({"seed": 1}, "model fingerprint"),
])
def test_a_model_of_another_collection_is_refused_and_nothing_is_written(filled, tmp_path, variant, field,
                                                                        monkeypatch):
    import uvicorn

    def listens(*args, **kwargs):
        raise AssertionError("serve started uvicorn before it refused the model")

    monkeypatch.setattr(uvicorn, "run", listens)
    root, db, before = filled
    other = model(tmp_path, "other", **variant)
    query = next((root / "tree").rglob("*.png"))
    for args in (("ingest", root / "tree"), ("search", query)):
        result = hiervec(*args, "--model", other, "--uri", db)
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr.startswith("Error: collection 'images' does not match: ") and field in result.stderr
        assert result.stderr.count("\n") == 1
    serve = hiervec("serve", "--model", other, "--uri", db, "--port", "0")  # refused before it listens
    assert serve.returncode == 1 and "does not match" in serve.stderr and field in serve.stderr
    assert sorted(stored_ids(str(db))) == before


BAD_FILTERS = [
    (("--where", "colour=red"), "unknown level 'colour' in where"),
    (("--under", "clothing/tops/shirt/extra"), "not a category path of at most 3 levels"),
    (("--under", "clothing/hats"), "unknown category 'clothing/hats' for under"),
    *[(("--where", f"department={value}"), "unknown category") for value in CRAFTED],
    *[(("--under", value), "for under") for value in CRAFTED],
]


@pytest.mark.lite
def test_bad_and_crafted_filters_delete_nothing(filled):
    _, db, before = filled
    for args, message in BAD_FILTERS:
        result = hiervec("delete", *args, "--uri", db)
        assert result.returncode == 1 and result.stderr.startswith("Error: "), args
        assert message in result.stderr and result.stderr.count("\n") == 1, (args, result.stderr)
    assert sorted(stored_ids(str(db))) == before


@pytest.mark.lite
def test_crafted_category_names_filter_exactly(tmp_path):
    """Categories whose names are the crafted strings: each filter matches exactly its own records."""
    spec = CollectionSpec(("department", "item"), dim=4, index="FLAT")
    rng = np.random.default_rng(0)
    names = [value.replace("/", "|") for value in CRAFTED] + ["clothing", "plain"]
    records = [Record(f"{name}/leaf{i}", rng.normal(size=4), id=f"r{n}-{i}")
               for n, name in enumerate(names) for i in range(3)]
    with HierStore(str(tmp_path / "crafted.db"), "crafted", spec=spec) as store:
        store.upsert(records)
        store.flush()
        query = rng.normal(size=(1, 4)).astype(np.float32)
        for n, name in enumerate(names):
            hits = store.search(query, 50, where=Eq("department", name))[0]
            assert sorted(h.id for h in hits) == [f"r{n}-{i}" for i in range(3)], repr(name)
            assert store.count(where=Eq("department", name)) == 3
        assert store.delete(where=Eq("department", names[0])) == 3
        assert sorted(h.id for h in store.iterate()) == sorted(r.id for r in records[3:])
        with pytest.raises(FilterError, match="unknown level 'colour'"):
            store.delete(where=Eq("colour", "red"))
        assert store.count() == len(records) - 3


@pytest.mark.server
def test_a_token_never_shows_in_output_errors_logs_or_repr(filled, tmp_path, tiny_model, caplog):
    root, _, _ = filled
    token = "s3cret-T0ken-value"
    with LiteServer(tmp_path / "server") as server:
        ingest = hiervec("ingest", root / "tree", "--model", tiny_model, "--uri", server.uri, "--token", token,
                         "--json", "--report", tmp_path / "report.json")
        assert ingest.returncode == 0, ingest.stderr
        info = hiervec("info", "--uri", server.uri.replace("http://", f"http://bob:{token}@"), "--json")
        shown = ingest.stdout + ingest.stderr + (tmp_path / "report.json").read_text() + info.stdout + info.stderr
        with caplog.at_level(logging.DEBUG):
            with HierStore(server.uri, "images", token=token) as store:
                shown += repr(store) + repr(store.settings)
                store.count()
            with pytest.raises(StoreConnectionError) as refused:
                HierStore("http://127.0.0.1:9", "images", token=token, timeout=2)
            shown += str(refused.value) + "\n".join(r.getMessage() for r in caplog.records)
        for args in (("info", "--uri", "http://127.0.0.1:9", "--token", token),
                     ("info", "--uri", "http://127.0.0.1:9", "--token", token, "--json"),
                     ("info", "--uri", f"http://bob:{token}@127.0.0.1:9")):
            failed = hiervec(*args)
            assert failed.returncode == 1 and "127.0.0.1:9" in failed.stderr
            shown += failed.stdout + failed.stderr
    assert json.loads(info.stdout)["uri"].startswith("http://***@127.0.0.1:")
    assert token not in shown
