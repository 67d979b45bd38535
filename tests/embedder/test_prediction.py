"""Category prediction: joint decoding over the tree and temperature calibration."""

import numpy as np
import pytest
import torch

from embedder import ConfigError, Hierarchy, calibrate, decode_paths, expected_calibration_error, fit_temperature

pytestmark = pytest.mark.unit

TREE = Hierarchy.from_paths(["bags/bags/bag", "clothing/tops/shirt", "clothing/tops/coat", "clothing/bottoms/trouser",
                             "footwear/boots/boot"], ("department", "category", "item"))


def log_probs(*rows_per_level):
    return [torch.log(torch.tensor(rows, dtype=torch.float32)) for rows in rows_per_level]


def code(level, path):
    return TREE.vocabularies[level].index(path)


def one_hot_ish(level, favourite, p):
    """A distribution over `level`'s categories putting `p` on `favourite`, the rest spread evenly."""
    n = TREE.num_classes[level]
    row = np.full(n, (1 - p) / (n - 1))
    row[code(level, favourite)] = p
    return row.tolist()


def test_joint_decoding_never_picks_a_child_outside_its_parent():
    # Level by level: department clothing (0.5), category footwear/boots (0.6) and item
    # footwear/boots/boot (0.4) -- clothing's child is not boots: an impossible path.
    levels = log_probs([one_hot_ish(0, "clothing", 0.5)], [one_hot_ish(1, "footwear/boots", 0.6)],
                       [one_hot_ish(2, "footwear/boots/boot", 0.4)])
    argmax_path = [TREE.vocabularies[i][int(lp.argmax())] for i, lp in enumerate(levels)]
    assert argmax_path == ["clothing", "footwear/boots", "footwear/boots/boot"]
    [prediction] = decode_paths(dict(zip(TREE.level_names, levels)), TREE)
    assert prediction.path == "footwear/boots/boot"
    p = prediction.probabilities
    assert list(p) == ["department", "category", "item"]
    assert p["department"] >= p["category"] >= p["item"] > 0.5  # the whole path's mass, never more deep down
    # the path scores, by hand: product of the three levels' probabilities, normalised over the 5 paths
    scores = {leaf: np.prod([np.exp(float(levels[i][0, code(i, "/".join(leaf.split("/")[: i + 1]))]))
                             for i in range(3)]) for leaf in TREE.leaves}
    total = sum(scores.values())
    assert p["item"] == pytest.approx(scores["footwear/boots/boot"] / total, rel=1e-5)
    clothing = sum(v for leaf, v in scores.items() if leaf.startswith("clothing/"))
    assert prediction.alternatives[0][1] == pytest.approx(max(v for k, v in scores.items()
                                                              if k != "footwear/boots/boot") / total, rel=1e-5)
    assert clothing / total < p["department"]
    assert prediction.prefix("category") == "footwear/boots" and prediction.confidence() == p["item"]


def test_a_level_without_a_classifier_is_decided_by_the_others():
    leaf_only = {"item": torch.log(torch.tensor([one_hot_ish(2, "clothing/tops/coat", 0.7)]))}
    [prediction] = decode_paths(leaf_only, TREE)
    assert prediction.path == "clothing/tops/coat"
    assert prediction.probabilities["item"] == pytest.approx(0.7, rel=1e-5)
    assert prediction.probabilities["department"] == pytest.approx(0.7 + 2 * 0.075, rel=1e-5)
    with pytest.raises(ConfigError, match=r"log-probabilities for unknown levels \['leaf'\]"):
        decode_paths({"leaf": leaf_only["item"]}, TREE)
    with pytest.raises(ConfigError, match="no level has a classifier"):
        decode_paths({}, TREE)


def overconfident(n, classes, seed):
    """Logits 4x too sharp for how often they are right."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes))
    logits[np.arange(n), labels] += 1.0
    return torch.tensor(logits * 4, dtype=torch.float32), labels


def test_calibration_lowers_held_out_nll_and_ece():
    fit_logits, fit_labels = overconfident(2000, 5, seed=0)
    test_logits, test_labels = overconfident(2000, 5, seed=1)
    t = fit_temperature(fit_logits, torch.from_numpy(fit_labels))
    assert 2.5 < t < 6  # undoes most of the 4x sharpening
    before = torch.nn.functional.cross_entropy(test_logits, torch.from_numpy(test_labels))
    after = torch.nn.functional.cross_entropy(test_logits / t, torch.from_numpy(test_labels))
    assert after < before - 0.3
    assert expected_calibration_error(torch.softmax(test_logits / t, 1), test_labels) < 0.5 * \
        expected_calibration_error(torch.softmax(test_logits, 1), test_labels)

    report = calibrate({"a": fit_logits}, np.stack([fit_labels, fit_labels], 1), ("a", "b"))
    assert list(report["temperatures"]) == ["a", "b"]  # keyed by level name
    assert report["temperatures"]["a"] == pytest.approx(t) and report["temperatures"]["b"] == 1.0
    assert report["nll_after"]["a"] < report["nll_before"]["a"] and "b" not in report["ece_before"]


def test_expected_calibration_error_by_hand():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 1, 0, 0])  # bin 0.9: accuracy 0.5; bin 0.6: accuracy 1.0
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)


def test_temperatures_are_keyed_by_level_and_older_files_lists_still_read():
    from embedder.checkpoint import temperatures_by_level

    levels = ("department", "category", "item")
    assert temperatures_by_level([2.0, 1.5, 3.0], levels) == {"department": 2.0, "category": 1.5, "item": 3.0}
    assert temperatures_by_level({"item": 3.0}, levels) == {"department": 1.0, "category": 1.0, "item": 3.0}
    assert temperatures_by_level(None, levels) == dict.fromkeys(levels, 1.0)
    with pytest.raises(ConfigError, match=r"temperatures name levels the model does not have: \['size'\]"):
        temperatures_by_level({"size": 2.0}, levels)
    with pytest.raises(ConfigError, match="expected 3 temperatures, one per level, got \\[2.0\\]"):
        temperatures_by_level([2.0], levels)
