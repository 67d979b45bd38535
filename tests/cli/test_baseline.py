"""`hiervec eval --baseline imagenet`: the untrained backbone through the same protocol as a checkpoint,
and `hiervec train`'s defaults read from the data."""

import numpy as np
import pytest

from embedder import Hierarchy, read_source
from embedder.baseline import BackboneEmbedder
from embedder.metrics import agreement, exact_neighbours, others_in_category, retrieval_report

from ..commands import run, run_json
from .conftest import LEAVES, PER_LEAF


@pytest.mark.lite
def test_eval_baseline_scores_the_pooled_imagenet_features_through_milvus(workspace):
    _, tree, _ = workspace
    report = run_json("eval", tree, "--baseline", "imagenet", "--image-size", "32")
    assert report["queries"] == report["collection"] == len(LEAVES) * PER_LEAF

    items = sorted(read_source(tree).items, key=lambda item: str(item.path))
    hierarchy = Hierarchy.from_paths([item.category for item in items])
    labels = hierarchy.encode_many([item.category for item in items])
    vectors = BackboneEmbedder(level_names=hierarchy.level_names, image_size=32).embed([i.path for i in items]).concat
    same = agreement(labels, exact_neighbours(vectors, 10))
    expected = retrieval_report(same, hierarchy.level_names, ks=(1, 10), r=others_in_category(labels))
    assert report["recall@k"] == [{"k": 1, "recall": pytest.approx(expected["recall@1"], abs=1e-9)},
                                  {"k": 10, "recall": pytest.approx(expected["recall@10"], abs=1e-9)}]
    assert report["map@r"] == pytest.approx(expected["map@r"], abs=1e-9) and report["map@r_reason"] is None
    assert report["consistency@k"] == {name: pytest.approx(expected[f"consistency@10/{name}"], abs=1e-9)
                                       for name in hierarchy.level_names}
    assert report["hier_distance@k"] == pytest.approx(expected["hier_distance@10"], abs=1e-9)


@pytest.mark.lite
def test_eval_baseline_reads_the_image_size_from_the_data(workspace):
    _, tree, _ = workspace
    result = run("eval", tree, "--baseline", "imagenet", "-k", "3")
    assert "image size 64 px: the median shorter side of 24 sampled images is 40 px" in result.stderr
    assert "consistency@3/level1" in result.stdout


@pytest.mark.unit
@pytest.mark.parametrize("args", [[], ["--model", "m.pt", "--baseline", "imagenet"]])
def test_eval_takes_a_model_or_the_baseline(workspace, args):
    _, tree, _ = workspace
    result = run("eval", tree, *args, ok=False)
    assert result.exit_code == 2 and "give either --model or --baseline" in result.stderr


@pytest.mark.unit
def test_train_prints_the_size_and_schedule_it_chose_and_why(workspace, tmp_path):
    _, tree, _ = workspace
    result = run("train", tree, "--out", tmp_path / "m.pt", "--backbone", "resnet18", "--weights", "none",
                 "--steps-per-epoch", "1", "--epochs", "1", "--dim", "8", "--val-fraction", "0.3")
    lines = result.stderr.splitlines()
    assert lines[0] == ("image size 64 px: the median shorter side of 24 sampled images is 40 px (rounded to a "
                        "multiple of 32, within 64..224) (--image-size to choose)")
    assert any(line.startswith("schedule: 1 epochs of 1 steps (steps: as set; epochs: as set)") for line in lines)
    assert any(line.startswith("epoch 0 (the pretrained start) validation") for line in lines)
    assert ", the weights of epoch " in result.stdout
