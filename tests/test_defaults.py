"""One source for names and defaults (`hiervec_core.names`): the library's registries and the CLI's
options agree with it, so a default changes in one place."""

import pytest
from click.testing import CliRunner

from cli.main import cli
from hiervec_core import names

pytestmark = pytest.mark.unit


def params(command: str) -> dict:
    return {p.name: p for p in cli.commands[command].params}


def test_registries_cover_exactly_the_names(monkeypatch):
    from embedder.backbones import BACKBONES
    from embedder.config import EmbedderConfig
    from milvus_store.connection import ConnectionSettings
    from milvus_store.spec import index_build_params

    assert sorted(BACKBONES) == sorted(names.BACKBONES) and names.DEFAULT_BACKBONE in names.BACKBONES
    assert EmbedderConfig(("a", "b"), (2, 2), (4, 4)).backbone == names.DEFAULT_BACKBONE
    assert set(names.LITE_INDEXES) <= set(names.SERVER_INDEXES) and names.DEFAULT_INDEX in names.LITE_INDEXES
    assert {index: index_build_params(index, 192) for index in names.SERVER_INDEXES} == {
        "FLAT": {}, "IVF_FLAT": {"nlist": 1024}, "IVF_SQ8": {"nlist": 1024},
        "IVF_PQ": {"nlist": 1024, "m": 48, "nbits": 8},  # m: the largest divisor of dim up to dim / 4
        "HNSW": {"M": 16, "efConstruction": 200}, "DISKANN": {}}
    assert index_build_params("IVF_PQ", 100)["m"] == 25
    with pytest.raises(ValueError, match="index must be one of .* got 'HNSWW'"):
        index_build_params("HNSWW", 8)
    monkeypatch.delenv("HIERVEC_MILVUS_URI", raising=False)
    assert ConnectionSettings.resolve(None).uri == names.DEFAULT_URI


def test_the_cli_reads_its_choices_and_defaults_from_the_names():
    import inspect

    from milvus_store import HierStore
    from hiervec_app import ImageIndex
    from service import ServiceSettings

    assert tuple(params("train")["backbone"].type.choices) == names.BACKBONES
    assert params("train")["backbone"].default == names.DEFAULT_BACKBONE
    assert tuple(params("ingest")["index"].type.choices) == names.SERVER_INDEXES
    assert tuple(params("search")["fuse"].type.choices) == names.FUSIONS
    assert tuple(params("search")["predicted"].type.choices) == names.PREDICTED_CHOICES
    assert params("search")["k"].type.max == names.MAX_TOPK
    for command in ("ingest", "search", "info", "delete", "relabel", "serve"):
        assert params(command)["collection"].default == names.DEFAULT_COLLECTION, command
    assert ServiceSettings(model="m.pt").collection == names.DEFAULT_COLLECTION
    for function in (ImageIndex.open, HierStore.__init__):
        assert inspect.signature(function).parameters["collection"].default == names.DEFAULT_COLLECTION
    help_text = CliRunner().invoke(cli, ["train", "--help"]).output
    assert f"{names.LEAF_SOFTMAX_MIN_IMAGES} or more images" in " ".join(help_text.split())
