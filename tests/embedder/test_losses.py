import math

import pytest
import torch

from embedder import ContrastiveLoss, HierarchicalLoss, LevelCrossEntropy, LossWeights, PyramidOutput

pytestmark = pytest.mark.unit


def test_contrastive_loss_hand_computed():
    # a=(0,0), b=(0.6,0.8), c=(1,0); labels a,b same, c different.
    x = torch.tensor([[0.0, 0.0], [0.6, 0.8], [1.0, 0.0]])
    labels = torch.tensor([3, 3, 7])
    # positive pair (a,b): d = 1 -> 1. negatives: (a,c) d=1 -> (1.5-1)^2 = 0.25;
    # (b,c) d = sqrt(0.16+0.64) = sqrt(0.8) -> (1.5 - 0.8944)^2 = 0.36675
    expected = 1.0 + (0.25 + (1.5 - math.sqrt(0.8)) ** 2) / 2
    assert float(ContrastiveLoss(margin=1.5)(x, labels)) == pytest.approx(expected, rel=1e-5)


def test_contrastive_loss_averages_only_active_negatives():
    x = torch.tensor([[0.0, 0.0], [0.0, 0.5], [3.0, 0.0]])
    labels = torch.tensor([0, 1, 2])  # no positives; only (0,1) at d=0.5 is inside margin 1
    assert float(ContrastiveLoss(margin=1.0)(x, labels)) == pytest.approx(0.25)


def test_contrastive_loss_gradient_pulls_positives_together():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]], requires_grad=True)
    ContrastiveLoss()(x, torch.tensor([1, 1])).backward()
    assert x.grad[0, 0] < 0 < x.grad[1, 0]  # gradient descent moves them towards each other


def test_contrastive_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="margin must be positive"):
        ContrastiveLoss(margin=0)
    with pytest.raises(ValueError, match="3 embeddings but 2 labels"):
        ContrastiveLoss()(torch.zeros(3, 2), torch.zeros(2))


def test_level_cross_entropy_hand_computed():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1])
    expected = (-math.log(math.e**2 / (math.e**2 + 1)) + math.log(2)) / 2
    assert float(LevelCrossEntropy()(logits, labels)) == pytest.approx(expected, rel=1e-6)


def test_hierarchical_loss_is_the_weighted_sum_of_its_logged_parts():
    levels = (torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    concat = torch.cat(levels, 1) / math.sqrt(2)
    logits = (torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 3.0], [0.0, 3.0]]))
    out = PyramidOutput(dict(zip(("dept", "item"), levels)), concat, dict(zip(("dept", "item"), logits)))
    labels = torch.tensor([[0, 1], [1, 1]])
    weights = LossWeights(contrastive=2.0, level_contrastive=(0.5, 0.0), softmax=(1.0, 3.0))
    total, parts = HierarchicalLoss(("dept", "item"), weights, margin=1.0)(out, labels)
    contrastive = ContrastiveLoss(1.0)
    expected = {
        "contrastive": 2.0 * float(contrastive(concat, labels[:, 1])),
        "contrastive_dept": 0.5 * float(contrastive(levels[0], labels[:, 0])),
        "softmax_dept": float(LevelCrossEntropy()(logits[0], labels[:, 0])),
        "softmax_item": 3.0 * float(LevelCrossEntropy()(logits[1], labels[:, 1])),
    }
    assert parts == pytest.approx(expected)
    assert float(total) == pytest.approx(sum(expected.values()))
    # keyed by level name (a level left out weighs 0): the same loss as the positional form
    keyed = LossWeights(contrastive=2.0, level_contrastive={"dept": 0.5}, softmax={"item": 3.0, "dept": 1.0})
    assert HierarchicalLoss(("dept", "item"), keyed, margin=1.0)(out, labels)[1] == pytest.approx(expected)
    assert keyed.by_level("level_contrastive", ("dept", "item")) == {"dept": 0.5, "item": 0.0}
    assert keyed.to_dict()["softmax"] == {"item": 3.0, "dept": 1.0}  # what a checkpoint records: by name


def test_hierarchical_loss_rejects_wrong_weight_counts_and_all_zero():
    with pytest.raises(ValueError, match="softmax weights need one value per level"):
        HierarchicalLoss(("a", "b"), LossWeights(softmax=(1.0,)))
    with pytest.raises(ValueError, match=r"softmax weights name levels the model does not have: \['c'\] \(its "
                                         r"levels: a, b\)"):
        HierarchicalLoss(("a", "b"), LossWeights(softmax={"c": 1.0}))
    out = PyramidOutput((), torch.zeros(2, 2), (None, None))
    with pytest.raises(ValueError, match="every loss weight is zero"):
        HierarchicalLoss(("a", "b"), LossWeights(contrastive=0.0, softmax=(1.0, 0.0)))(out, torch.zeros(2, 2, dtype=torch.long))


@pytest.mark.parametrize("mode", ["pyramid", "flat"])
def test_classifiers_without_a_softmax_weight_learn_without_moving_the_vectors(mode):
    from embedder import EmbedderConfig, PyramidEmbedder

    config = EmbedderConfig(("dept", "item"), (2, 3), (4, 4), backbone="resnet18", fpn_channels=8, mode=mode)
    model = PyramidEmbedder(config).train()
    weights = LossWeights(contrastive=1.0, softmax=(1.0, 0.0) if mode == "pyramid" else ())
    criterion = HierarchicalLoss(config.level_names, weights, 1.0, model.classify)
    labels = torch.tensor([[0, 0], [0, 1], [1, 2], [1, 2]])
    total, parts = criterion(model(torch.rand(4, 3, 32, 32)), labels)
    assert "probe_item" in parts and "softmax_item" not in parts and "probe_dept" not in parts
    assert float(total.detach()) == pytest.approx(sum(parts.values()), rel=1e-5)
    # the probe's gradient reaches its classifier, never the head that makes the vector
    model.zero_grad()
    out = model(torch.rand(4, 3, 32, 32))
    probe_only = criterion._probes(out, labels, criterion.softmax)["probe_item"]
    probe_only.backward()
    leaf_head = model.heads["item" if mode == "pyramid" else "image"]
    assert model.classifiers["item"].weight.grad.abs().sum() > 0
    assert leaf_head.weight.grad is None or leaf_head.weight.grad.abs().sum() == 0
