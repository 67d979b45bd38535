import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from cli.filters import build_filter
from milvus_store import FilterError, resolve_category
from cli.main import cli
from embedder import fashion_mnist

pytestmark = pytest.mark.unit

COMMANDS = [["data"], ["data", "fashion-mnist"], ["data", "fashion-mnist-products"], ["data", "openclipart"], ["train"], ["ingest"], ["search"],
            ["eval"], ["info"], ["delete"], ["copy"], ["relabel"], ["serve"], ["export"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c))
def test_every_command_has_help(command):
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output and "--help" in result.output
    if command not in (["data"], ["serve"]):  # serve prints no result: it serves
        assert "--json" in result.output


def test_help_does_not_import_torch():
    code = ("import sys; from click.testing import CliRunner; from cli.main import cli; "
            "r = CliRunner().invoke(cli, ['search', '--help']); assert r.exit_code == 0; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "args, message",
    [
        (["search"], "give query IMAGES, or stored images with --id"),
        (["search", "--id", "x", "--fuse", "mean"], "'mean' is not one of 'rrf', 'weighted'"),
        (["search", "--id", "x", "--level-weights", "item=heavy"], "level weights must be LEVEL=WEIGHT,..., got 'item=heavy'"),
        (["search", "x.png", "--model", "m.pt", "-k", "0"], "0 is not in the range 1<=x<=16384"),
        (["train", "no-such-dir", "--out", "m.pt"], "does not exist"),
        (["train", ".", "--out", "m.pt", "--leaf-softmax", "-1"], "-1.0 is not in the range x>=0"),
        (["delete"], "give either IDS or --where/--under"),
        (["ingest", ".", "--model", "m.pt", "--batch-size", "5000"], "5000 is not in the range 1<=x<=4096"),
        (["data", "fashion-mnist", "out", "--split", "val"], "'val' is not one of"),
        (["data", "fashion-mnist-products", "out", "--photos", "0"], "0 is not in the range x>=1"),
    ],
)
def test_option_validation_is_a_usage_error(args, message):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_library_errors_become_one_line(tmp_path):
    (tmp_path / "m.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "q.png").write_bytes(b"")
    result = CliRunner().invoke(cli, ["search", str(tmp_path / "missing.png"), "--model", str(tmp_path / "m.pt")])
    assert result.exit_code == 1
    assert result.stderr == f"Error: query image '{tmp_path / 'missing.png'}' does not exist\n"
    result = CliRunner().invoke(cli, ["search", str(tmp_path / "q.png"), "--model", str(tmp_path / "m.pt")])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: cannot read checkpoint") and result.stderr.count("\n") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(cli, ["train", str(empty), "--out", str(tmp_path / "x.pt")])
    assert (result.exit_code, result.stderr) == (1, f"Error: no labelled images in {empty}\n")
    # a library message that names a library argument reaches the CLI user as the flag to give
    from PIL import Image

    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "m.csv").write_text("path,category\na.png,bags/tote/big\nb.png,bags/tote\n")
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "m.csv"), "--out", str(tmp_path / "x.pt"),
                                      "--levels", "department,category,item"])
    assert result.exit_code == 1 and "has 2 levels, expected 3 (pass --pad to repeat its leaf)" in result.stderr


KNOWN = {
    "gender": {"men", "women"},
    "kind": {"men/accessories", "women/accessories", "women/dresses"},
}


def test_where_values_resolve_paths_and_unique_names():
    assert resolve_category("kind", "women/dresses", KNOWN["kind"]) == "women/dresses"
    assert resolve_category("kind", "dresses", KNOWN["kind"]) == "women/dresses"
    with pytest.raises(FilterError, match="'accessories' is ambiguous at level 'kind': it could be "
                                                   "men/accessories, women/accessories"):
        resolve_category("kind", "accessories", KNOWN["kind"])
    with pytest.raises(FilterError, match="unknown category 'hats' at level 'kind'"):
        resolve_category("kind", "hats", KNOWN["kind"])


def test_where_and_under_build_one_filter():
    from milvus_store import And, Eq, In, Under

    assert build_filter([], None, KNOWN) is None
    assert build_filter(["gender=men"], None, KNOWN) == Eq("gender", "men")
    assert build_filter(["kind=dresses", "kind=men/accessories"], "women", KNOWN) == And(
        (In("kind", ("women/dresses", "men/accessories")), Under("women")))
    with pytest.raises(FilterError, match="unknown level 'colour' in where"):
        build_filter(["colour=red"], None, KNOWN)
    with pytest.raises(click.BadParameter, match="where must be LEVEL=CATEGORY"):
        build_filter(["gender"], None, KNOWN)
    with pytest.raises(FilterError, match="unknown category 'women/hats' for under"):
        build_filter([], "women/hats", KNOWN)


def test_unreachable_server_is_one_line_naming_the_uri():
    result = CliRunner().invoke(cli, ["info", "--uri", "http://127.0.0.1:9", "--token", "s3cret"])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: cannot open Milvus at 'http://127.0.0.1:9'")
    assert result.stderr.count("\n") == 1 and "s3cret" not in result.stderr


@pytest.mark.skipif(not fashion_mnist.DEBIAN_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist package")
def test_fashion_mnist_products_export(tmp_path):
    import json

    from embedder import read_folder_tree

    result = CliRunner().invoke(cli, ["data", "fashion-mnist-products", str(tmp_path / "p"), "--split", "train",
                                      "--products", "3", "--photos", "2", "--offset", "10", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"out": str(tmp_path / "p"), "split": "train", "products": 3, "photos": 6,
                                         "levels": ["department", "category", "item", "product"]}
    labels = fashion_mnist.load("train")[1][10:13]
    categories = sorted(item.category for item in read_folder_tree(tmp_path / "p").items)
    assert categories == sorted(f"{fashion_mnist.CLASS_PATHS[c]}/train-{10 + i:05d}" for i, c in enumerate(labels)
                                for _ in range(2))


TORCH_COMMANDS = ["train", "ingest", "search", "eval", "relabel", "serve"]


@pytest.mark.parametrize("command", TORCH_COMMANDS)
def test_every_command_that_runs_the_model_takes_device_amp_and_threads(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--device DEVICE", "--amp", "--threads"):
        assert option in result.output
    if command not in ("train", "relabel"):  # those that embed images choose the runtime
        assert "--runtime [auto|torch|onnxruntime|openvino]" in result.output


def test_threads_option_sets_this_process_and_a_bad_device_is_one_line(tmp_path, tiny_model, torch_threads):
    import torch

    from cli.main import compute_options

    seen = {}

    @click.command()
    @compute_options
    def probe(device, amp):
        seen.update(device=device, amp=amp, threads=torch.get_num_threads())

    torch_threads(3)  # not the value asked for, whatever this process started with
    assert CliRunner().invoke(probe, ["--threads", "1", "--device", "cpu", "--amp"]).exit_code == 0
    assert seen == {"device": "cpu", "amp": True, "threads": 1}
    (tmp_path / "q.png").write_bytes(b"")
    result = CliRunner().invoke(cli, ["search", str(tmp_path / "q.png"), "--model", str(tiny_model), "--device", "tpu"])
    assert result.exit_code == 1
    assert result.stderr == "Error: device must be one of auto, cpu, cuda, cuda:N, mps, got 'tpu'\n"


def test_filters_read_the_collections_categories_only_when_the_models_cannot_settle_them():
    from types import SimpleNamespace

    from cli.filters import parse_pairs
    from hiervec_app import ImageIndex, SearchRequest

    reads = []

    class Store:
        spec = SimpleNamespace(level_names=("gender", "kind"))

        def category_counts(self):
            reads.append(1)
            return {"gender": {"women": 1}, "kind": {"women/hoodies": 2}}

    model = SimpleNamespace(categories={"gender": {"men", "women"}, "kind": {"women/dresses", "men/shirts"}},
                            predict_vectors=lambda vectors: [])  # a CategoryPredictor
    index = ImageIndex(Store(), model)
    assert index.known_categories(SearchRequest(where=(("kind", "women/dresses"),), under="men")) == model.categories
    assert not reads
    union = index.known_categories(SearchRequest(where=(("kind", "hoodies"),)))
    assert union["kind"] == {"women/dresses", "men/shirts", "women/hoodies"} and len(reads) == 1
    by_name, by_path = SearchRequest(where=(("kind", "hoodies"),)), SearchRequest(where=(("kind", "women/hoodies"),))
    assert by_name.to_filter(union) == by_path.to_filter(union) == build_filter(["kind=women/hoodies"], None, union)
    assert index.known_categories(SearchRequest(under="women/hoodies"))["kind"] >= {"women/hoodies"}
    with pytest.raises(click.BadParameter, match="where must be LEVEL=CATEGORY, got 'kind'"):
        parse_pairs(["kind"])


def test_unwritable_outputs_and_damaged_models_fail_before_any_work(tmp_path, tiny_model):
    (tmp_path / "file").write_text("a file, not a folder")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "q.png").write_bytes(b"")
    report, out = tmp_path / "file" / "r.json", tmp_path / "file" / "m.pt"
    cases = [
        (["ingest", str(tmp_path), "--model", str(tiny_model), "--uri", str(tmp_path / "h.db"), "--report", str(report)],
         f"--report '{report}': cannot create its folder"),
        (["train", str(tmp_path), "--out", str(out)], f"--out '{out}': cannot create its folder"),
        (["search", str(tmp_path / "q.png"), "--model", str(tmp_path / "empty.pt")],
         f"checkpoint '{tmp_path / 'empty.pt'}' is empty (0 bytes)"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr.startswith(f"Error: {message}") and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "h.db").exists()  # nothing was ingested


def test_train_option_defaults_are_the_librarys():
    from dataclasses import fields

    from embedder import TrainConfig

    defaults = {f.name: f.default for f in fields(TrainConfig)}
    options = {p.name: p.default for p in cli.commands["train"].params}
    for name in ("epochs", "lr", "classes_per_batch", "per_class", "augment", "seed", "val_fraction", "batch_norm",
                 "leaf_softmax", "steps_per_epoch"):
        assert options[name] == defaults[name], name


def test_what_an_engine_prints_goes_to_stderr_and_stdout_keeps_the_json():
    """--engine ray --json: Ray's own lines (printed by Python or written to descriptor 1 by native code)
    must not break the JSON document on stdout."""
    script = """
import json, os, sys
from cli.main import stdout_to_stderr
with stdout_to_stderr():
    print("(raylet) A worker died or was killed while executing a task")
    os.write(1, b"native noise on fd 1\\n")
print(json.dumps({"stored": 3}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == '{"stored": 3}\n'
    assert "A worker died" in done.stderr and "native noise on fd 1" in done.stderr
