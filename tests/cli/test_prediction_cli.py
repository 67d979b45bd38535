"""Predicted categories end to end: unlabelled ingest, filters on predictions, --auto routing, relabel."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cli.main import cli
from embedder import Embedder, PyramidEmbedder, load_checkpoint, save_checkpoint

from ..conftest import LEAVES

pytestmark = pytest.mark.lite


def run_json(*args, ok=True):
    result = CliRunner().invoke(cli, [str(a) for a in args] + ["--json"])
    if ok:
        assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
        return json.loads(result.stdout)
    return result


@pytest.fixture
def catalogue(tmp_path, tiny_model):
    """A labelled tree (4 leaves x 5) and a flat folder of 8 unlabelled images, ingested."""
    rng = np.random.default_rng(3)
    tree, flat = tmp_path / "tree", tmp_path / "unlabelled"
    flat.mkdir()
    for n, leaf in enumerate(LEAVES):
        (tree / leaf).mkdir(parents=True)
        for i in range(5):
            pixels = np.clip(rng.normal(50 * n + 40, 30, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tree / leaf / f"{i}.png")
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(flat / f"u{i}.png")
    db = tmp_path / "p.db"
    given = run_json("ingest", tree, "--model", tiny_model, "--uri", db)
    guessed = run_json("ingest", flat, "--model", tiny_model, "--uri", db)
    assert (given["stored"], given["predicted"]) == (20, 0)
    assert (guessed["stored"], guessed["predicted"], guessed["failed"]) == (8, 8, 0)
    return tree, flat, db


def hits_of(result):
    return result["queries"][0]["hits"]


def test_unlabelled_images_get_flagged_predicted_paths_and_filters_see_them(catalogue, tiny_model):
    tree, flat, db = catalogue
    query = flat / "u0.png"
    everything = hits_of(run_json("search", query, "--model", tiny_model, "--uri", db, "-k", "100"))
    assert len(everything) == 28
    guessed = [h for h in everything if h["predicted"]]
    assert len(guessed) == 8 and all(h["category"] in LEAVES for h in guessed)
    for hit in guessed:  # probabilities of one path: never more at a finer level
        c = hit["confidence"]
        assert 0 < c["item"] <= c["category"] <= c["department"] <= 1
    assert all(set(h["confidence"].values()) == {1.0} for h in everything if not h["predicted"])
    assert hits_of(run_json("search", query, "--model", tiny_model, "--uri", db, "-k", "100", "--predicted",
                            "exclude")) == [h for h in everything if not h["predicted"]]
    assert hits_of(run_json("search", query, "--model", tiny_model, "--uri", db, "-k", "100", "--predicted",
                            "only")) == guessed
    threshold = sorted(h["confidence"]["item"] for h in guessed)[4]
    confident = hits_of(run_json("search", query, "--model", tiny_model, "--uri", db, "-k", "100",
                                 "--min-label-confidence", threshold))
    assert {h["id"] for h in confident} == {h["id"] for h in everything
                                             if not h["predicted"] or h["confidence"]["item"] >= threshold}


def test_auto_restricts_hits_to_the_predicted_category_only_above_the_threshold(catalogue, tiny_model):
    tree, _, db = catalogue
    query = tree / "footwear/boots/boot/0.png"
    routed = run_json("search", query, "--model", tiny_model, "--uri", db, "-k", "100", "--auto", "department",
                      "--min-confidence", "0")["queries"][0]
    route = routed["routing"]
    assert route["routed"] and route["within"] == route["predicted_path"].split("/")[0]
    [expected] = Embedder.from_checkpoint(tiny_model, device="cpu").predict([query])
    assert route["predicted_path"] == expected.path and route["level"] == "department"
    assert route["probabilities"]["department"] == pytest.approx(expected.probabilities["department"], abs=1e-6)
    assert {h["categories"]["department"] for h in routed["hits"]} == {route["within"]}

    everywhere = run_json("search", query, "--model", tiny_model, "--uri", db, "-k", "100", "--auto", "department",
                          "--min-confidence", "1")["queries"][0]
    assert not everywhere["routing"]["routed"] and everywhere["routing"]["within"] is None
    assert everywhere["routing"]["probabilities"]["department"] < 1
    assert len({h["categories"]["department"] for h in everywhere["hits"]}) == 2  # clothing and footwear

    text = CliRunner().invoke(cli, ["search", str(query), "--model", str(tiny_model), "--uri", str(db), "--auto",
                                    "category", "--min-confidence", "1"])
    assert "not routed: searched everywhere (predicted " in text.stdout


def test_relabel_predicts_again_from_stored_vectors_and_never_touches_given_paths(catalogue, tiny_model, tmp_path):
    tree, flat, db = catalogue
    checkpoint = load_checkpoint(tiny_model)
    model = PyramidEmbedder(checkpoint.config)
    model.load_state_dict(checkpoint.state_dict)
    torch.manual_seed(11)
    with torch.no_grad():  # new heads, same vectors: what retraining only the classifiers gives
        for classifier in model.classifiers.values():
            classifier.weight.normal_()
    heads = save_checkpoint(tmp_path / "heads.pt", model, checkpoint.hierarchy)
    assert heads.vector_fingerprint == checkpoint.vector_fingerprint and heads.fingerprint != checkpoint.fingerprint

    before = {h["id"]: h for h in hits_of(run_json("search", flat / "u0.png", "--model", tiny_model, "--uri", db,
                                                   "-k", "100"))}
    report = run_json("relabel", "--model", tmp_path / "heads.pt", "--uri", db, "--device", "cpu")
    assert report["examined"] == 8 and report["changed"] + report["confirmed"] + report["kept"] == 8
    assert report["changed"] > 0 and report["kept"] == 0
    after = {h["id"]: h for h in hits_of(run_json("search", flat / "u0.png", "--model", tmp_path / "heads.pt",
                                                  "--uri", db, "-k", "100"))}
    assert {i for i, h in after.items() if h["predicted"]} == {i for i, h in before.items() if h["predicted"]}
    new_model = Embedder.from_checkpoint(tmp_path / "heads.pt")
    for hit in (h for h in after.values() if h["predicted"]):  # what the new heads say about the image itself
        [prediction] = new_model.predict([hit["uri"]])
        assert hit["category"] == prediction.path
        assert hit["confidence"] == pytest.approx(prediction.probabilities, abs=1e-5)
    assert report["changed"] == sum(1 for i, h in after.items() if h["predicted"]
                                    and h["category"] != before[i]["category"])
    assert {i: h["category"] for i, h in after.items() if not h["predicted"]} == {
        i: h["category"] for i, h in before.items() if not h["predicted"]}

    strict = run_json("relabel", "--model", tiny_model, "--uri", db, "--min-confidence", "1")
    assert (strict["examined"], strict["kept"], strict["changed"]) == (8, 8, 0)  # nothing that sure: all kept

    torch.manual_seed(5)
    other = save_checkpoint(tmp_path / "other.pt", PyramidEmbedder(checkpoint.config), checkpoint.hierarchy)
    refused = run_json("relabel", "--model", tmp_path / "other.pt", "--uri", db, ok=False)
    assert refused.exit_code == 1 and "makes other vectors" in refused.stderr
    assert other.vector_fingerprint in refused.stderr and "ingest the images again" in refused.stderr
