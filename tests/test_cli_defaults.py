"""Every default the CLI shows is the library's: each option of every command that has a value
default is pinned here to the config field (or library argument) it stands for, and the config
modules the CLI reads those from import neither torch, FastAPI, pymilvus nor Ray."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import click
import pytest

from cli.main import cli

pytestmark = pytest.mark.unit

# Options whose default is the face's own choice, not a library setting: why.
FACE_CHOICES = {
    ("ingest", "engine"): "which executor runs the pipeline (threads here, or Ray): the command's choice",
    ("reindex", "engine"): "which executor runs the pipeline (threads here, or Ray): the command's choice",
}


def commands(group: click.Group = cli, prefix: str = ""):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command


def field_default(cls, name: str):
    [found] = [f for f in dataclasses.fields(cls) if f.name == name]
    assert found.default is not dataclasses.MISSING, f"{cls.__name__}.{name} has no default"
    return found.default


def argument_default(function, name: str):
    return inspect.signature(function).parameters[name].default


def pins() -> dict[tuple[str, str], object]:
    """(command, option) -> the library's default, in the option's unit."""
    from embedder import EmbedderConfig, TrainConfig, fashion_mnist, openclipart, train
    from embedder.baseline import BackboneEmbedder
    from embedder.distributed import process_group
    from embedder.train_config import DEFAULT_WEIGHTS
    from hiervec_app import ImageIndex, SearchRequest, ThreadExecutor
    from hiervec_app.evaluation import evaluate_collection
    from milvus_store import HierStore
    from milvus_store.bucket import S3Bucket
    from milvus_store.copy import copy_collection
    from scaleout import EmbedderRecipe, RayOptions
    from service.settings import MB, MEGAPIXEL, ServerSettings, ServiceSettings

    expected: dict[tuple[str, str], object] = {}
    for command, _ in commands():
        expected[(command, "collection")] = argument_default(HierStore.__init__, "collection")
        expected[(command, "runtime")] = field_default(ServiceSettings, "runtime")
        expected[(command, "device")] = field_default(ServiceSettings, "device")
    assert field_default(EmbedderRecipe, "runtime") == field_default(ServiceSettings, "runtime")
    assert field_default(EmbedderRecipe, "device") == field_default(ServiceSettings, "device")
    assert argument_default(ImageIndex.open, "collection") == field_default(ServiceSettings, "collection")

    config = TrainConfig()
    for option in ("lr", "backbone_lr_scale", "probe_epochs", "head_init", "patience", "classes_per_batch",
                   "per_class", "augment", "seed", "val_fraction", "val_max", "batch_norm"):
        expected[("train", option)] = getattr(config, option)
    assert argument_default(train, "train_config") == config
    expected[("train", "backbone")] = field_default(EmbedderConfig, "backbone")
    expected[("train", "mode")] = field_default(EmbedderConfig, "mode")
    expected[("train", "dim")] = argument_default(EmbedderConfig.for_hierarchy, "dim")
    expected[("train", "weights")] = argument_default(BackboneEmbedder.__init__, "weights")
    assert DEFAULT_WEIGHTS == expected[("train", "weights")]
    expected[("train", "dist_timeout")] = argument_default(process_group, "timeout_s")

    for command in ("ingest", "reindex"):
        expected[(command, "batch_size")] = field_default(RayOptions, "batch_size")
        for option in ("actors", "cpus_per_actor", "gpus_per_actor"):
            expected[(command, option)] = field_default(RayOptions, option)
        expected[(command, "threads_per_actor")] = field_default(EmbedderRecipe, "threads")
    assert field_default(ThreadExecutor, "batch_size") == field_default(RayOptions, "batch_size")
    expected[("ingest", "bulk_endpoint")] = field_default(S3Bucket, "endpoint")
    expected[("ingest", "bulk_bucket")] = field_default(S3Bucket, "bucket")

    for option in ("k", "group_size", "predicted", "min_confidence"):
        expected[("search", option)] = field_default(SearchRequest, option)
    expected[("eval", "k")] = argument_default(evaluate_collection, "k")
    expected[("eval", "backbone")] = argument_default(BackboneEmbedder.__init__, "backbone")
    expected[("relabel", "min_confidence")] = argument_default(ImageIndex.relabel, "min_confidence")
    expected[("copy", "batch_size")] = argument_default(copy_collection, "batch_size")

    for option, name in (("host", "host"), ("port", "port"), ("workers", "workers"),
                         ("header_timeout", "header_timeout_s"),
                         ("max_connections_per_client", "max_connections_per_client")):
        expected[("serve", option)] = field_default(ServerSettings, name)
    for option in ("batch_window_ms", "max_batch", "max_requests", "lite_process"):
        expected[("serve", option)] = field_default(ServiceSettings, option)
    expected[("serve", "store_timeout")] = field_default(ServiceSettings, "store_timeout_s")
    expected[("serve", "max_upload_mb")] = field_default(ServiceSettings, "max_upload_bytes") / MB
    expected[("serve", "max_megapixels")] = field_default(ServiceSettings, "max_pixels") / MEGAPIXEL
    expected[("serve", "media_dir")] = Path(field_default(ServiceSettings, "media_dir"))

    expected[("data fashion-mnist", "split")] = argument_default(fashion_mnist.export_folder_tree, "split")
    for option, name in (("split", "split"), ("products", "count"), ("photos", "photos"), ("offset", "offset"),
                         ("seed", "seed")):
        expected[("data fashion-mnist-products", option)] = argument_default(fashion_mnist.export_products, name)
    for option in ("min_per_leaf", "max_per_leaf", "max_side"):
        expected[("data openclipart", option)] = argument_default(openclipart.export, option)
    return expected


def valued(option: click.Option) -> bool:
    """An option whose default is a setting the command passes on: a value (not unset or None), or
    either side of an --on/--off pair (a lone flag's off is no setting)."""
    if option.multiple:
        return False
    if option.is_flag:
        return bool(option.secondary_opts)
    return option.default is not None and "UNSET" not in repr(option.default)


def test_every_cli_default_is_the_librarys():
    expected = pins()
    unpinned, wrong = [], []
    for command, cmd in commands():
        for option in cmd.params:
            if not isinstance(option, click.Option) or not valued(option):
                continue
            key = (command, option.name)
            if key in FACE_CHOICES:
                continue
            if key not in expected:
                unpinned.append(key)
            elif option.default != expected[key]:
                wrong.append((key, option.default, expected[key]))
    assert not unpinned, f"options with a default no test ties to the library: {unpinned}"
    assert not wrong, f"CLI defaults that differ from the library's: {wrong}"
    # every pin names an option that exists (a renamed option must not leave its pin behind)
    options = {(command, p.name) for command, cmd in commands() for p in cmd.params}
    stale = [key for key in expected if key not in options and key[1] not in ("collection", "runtime", "device")]
    assert not stale, stale


def test_a_drifted_default_is_caught(monkeypatch):
    option = next(p for p in cli.commands["serve"].params if p.name == "lite_process")
    monkeypatch.setattr(option, "default", False)
    with pytest.raises(AssertionError, match="lite_process"):
        test_every_cli_default_is_the_librarys()


def test_the_config_modules_import_no_engine():
    code = ("import sys, cli.main, embedder.train_config, service.settings, scaleout.options, milvus_store.bucket, "
            "hiervec_app.search\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'fastapi', 'uvicorn', 'pymilvus', 'ray') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "[]"
