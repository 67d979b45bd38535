"""Collection layouts through the CLI (issue: Milvus servers): `--level-vectors`, `--partition-key`.

An image-vector-only collection (what a server with few vector fields can hold) answers
image-vector searches exactly like the default layout, predicts from its stored vectors,
and refuses a level search naming the option that would allow it.
"""

import pytest

from ..commands import run, run_json
from .conftest import sha256

pytestmark = pytest.mark.lite


@pytest.fixture(scope="module")
def layouts(workspace, tmp_path_factory):
    _, tree, model = workspace
    db = tmp_path_factory.mktemp("layouts") / "h.db"
    run_json("ingest", tree, "--model", model, "--uri", db, "--index", "FLAT", "--collection", "full")
    run_json("ingest", tree, "--model", model, "--uri", db, "--index", "FLAT", "--collection", "lean",
             "--level-vectors", "none", "--partition-key", "department")
    run_json("ingest", tree, "--model", model, "--uri", db, "--index", "FLAT", "--collection", "items",
             "--level-vectors", "item", "--partition-key", "none")
    return tree, model, db


def test_info_shows_the_layout(layouts):
    _, _, db = layouts
    full, lean, items = (run_json("info", "--uri", db, "--collection", name) for name in ("full", "lean", "items"))
    assert full["level_vectors"] == ["department", "category", "item"] and full["partition_key"] is None
    assert lean["level_vectors"] == [] and lean["partition_key"] == "department" and lean["num_partitions"] == 16
    assert items["level_vectors"] == ["item"] and items["partition_key"] is None
    assert full["count"] == lean["count"] == items["count"] == 24


def test_image_searches_and_predictions_are_the_same_in_every_layout(layouts):
    tree, model, db = layouts
    query = tree / "clothing/tops/coat/1.png"

    def search(collection, *extra):
        result = run_json("search", query, "--model", model, "--uri", db, "--collection", collection, "-k", "8", *extra)
        return [(h["id"], round(h["distance"], 5)) for h in result["queries"][0]["hits"]]

    for extra in ((), ("--under", "clothing"), ("--where", "category=tops")):
        assert search("full", *extra) == search("lean", *extra) == search("items", *extra), extra
    # Routing by the stored query's predicted category reads its level vectors: stored in `full`,
    # read back from the image vector in `lean`.
    routed = [run_json("search", "--id", sha256(query), "--model", model, "--uri", db, "--collection", name,
                       "-k", "5", "--auto", "category", "--min-confidence", "0")["queries"][0] for name in ("full", "lean")]
    assert routed[0]["routing"]["routed"] and routed[0]["routing"]["predicted_path"]
    assert routed[0]["routing"]["within"] == routed[1]["routing"]["within"]
    for level, probability in routed[0]["routing"]["probabilities"].items():
        assert routed[1]["routing"]["probabilities"][level] == pytest.approx(probability, abs=1e-5)
    assert [h["id"] for h in routed[0]["hits"]] == [h["id"] for h in routed[1]["hits"]]


def test_a_level_search_needs_that_level_vector_and_says_which_option_gives_it(layouts):
    tree, model, db = layouts
    query = tree / "footwear/boots/boot/0.png"
    run_json("search", query, "--model", model, "--uri", db, "--collection", "items", "--level", "item")
    for collection, extra, message in (
        ("lean", ("--level", "item"), "cannot search at level 'item'"),
        ("items", ("--level", "category"), "cannot search at level 'category'"),
        ("lean", ("--fuse", "rrf"), "cannot fuse level 'department'"),
    ):
        result = run("search", query, "--model", model, "--uri", db, "--collection", collection, *extra, ok=False)
        assert result.exit_code == 1 and message in result.stderr and "--level-vectors" in result.stderr, result.stderr


def test_bad_layout_options_are_usage_errors_and_create_nothing(layouts):
    tree, model, db = layouts
    for option, value, message in (("--level-vectors", "colour", "'colour': use all, none or levels of the model"),
                                   ("--level-vectors", "item,", "use all, none or levels"),
                                   ("--partition-key", "colour", "'colour': use none or a level of the model")):
        result = run("ingest", tree, "--model", model, "--uri", db, "--collection", "bad", option, value, ok=False)
        assert result.exit_code == 2 and option in result.stderr and message in result.stderr, result.stderr
    assert run("info", "--uri", db, "--collection", "bad", ok=False).exit_code == 1
    # An existing collection keeps its layout: asking for another one is a mismatch, nothing is written.
    result = run("ingest", tree, "--model", model, "--uri", db, "--collection", "lean", "--level-vectors", "all",
                 ok=False)
    assert result.exit_code == 1 and "vector_levels" in result.stderr
