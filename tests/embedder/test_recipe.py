"""The fine-tuning recipe: epoch 0 validated, the best epoch kept, early stopping, the backbone's own
learning rate and linear probe, and the defaults read from the data."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import embedder.training as training
from embedder import TrainConfig, load_checkpoint, train
from embedder.backbones import build_backbone
from embedder.baseline import BackboneEmbedder
from embedder.data import default_image_size
from embedder.errors import ConfigError
from embedder.model import PyramidEmbedder
from embedder.training import MIN_STEPS_PER_EPOCH, SELECTION_CRITERION, parameter_groups, selection_score

from .test_training import LEVELS, tiny_data
from .test_training import tiny_config as _tiny_config

pytestmark = pytest.mark.unit

TC = TrainConfig(epochs=6, steps_per_epoch=2, classes_per_batch=2, per_class=2, val_fraction=0.34, log_every=1,
                 patience=2)


def tiny_config(hierarchy, **kwargs):
    """test_training's tiny model on resnet18: the backbone `random_resnet18` holds weights for."""
    return _tiny_config(hierarchy, **{"backbone": "resnet18", **kwargs})


@pytest.fixture
def random_resnet18(tmp_path):
    """A 'pretrained' backbone file: resnet18 with seeded random weights (nothing to download)."""
    torch.manual_seed(123)
    path = tmp_path / "resnet18.pt"
    torch.save(build_backbone("resnet18").state_dict(), path)
    return path


class ScriptedValidation:
    """Stands in for `training.evaluate`: the n-th validation scores `scores[n]` on every metric the
    selection reads, and a copy of the model it was shown is kept, to compare with the checkpoint."""

    def __init__(self, scores):
        self.scores = list(scores)
        self.seen: list[dict[str, torch.Tensor]] = []

    def __call__(self, model, images, labels, batch_size=128):
        self.seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        score = self.scores[len(self.seen) - 1]
        if not isinstance(score, float):
            raise TypeError(f"scripted to fail: {score}")
        return {"recall@1": score, "recall@10": score, "map@r": score, "hier_distance@10": 1.0,
                **{f"consistency@10/{name}": score for name in LEVELS}}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_selection_score_is_the_mean_of_leaf_recall_and_every_levels_consistency():
    metrics = {"recall@1": 0.9, "consistency@10/department": 0.6, "consistency@10/category": 0.3,
               "consistency@10/item": 0.2, "map@r": 0.0}
    assert selection_score(metrics, LEVELS) == pytest.approx((0.9 + 0.6 + 0.3 + 0.2) / 4)


def test_the_best_epoch_is_kept_and_training_stops_after_patience_epochs_without_a_better_one(tmp_path, monkeypatch):
    images, labels, hierarchy = tiny_data()
    script = ScriptedValidation([0.30, 0.50, 0.40, 0.45, 0.90])  # epoch 0 (start), 1, 2, 3: stop; 4 never runs
    monkeypatch.setattr(training, "evaluate", script)
    lines = []
    result = train(images, labels, hierarchy, tiny_config(hierarchy), TC, out=tmp_path / "m.pt", log=lines.append)
    assert [h["epoch"] for h in result.history] == [0, 1, 2, 3]
    assert len(script.seen) == 4
    assert "stopping early after epoch 3: no better validation score since epoch 1 (patience 2)" in lines
    saved = load_checkpoint(tmp_path / "m.pt")
    assert same_weights(saved.state_dict, script.seen[1])  # epoch 1's weights, not the last epoch's
    assert not same_weights(saved.state_dict, script.seen[3])
    assert saved.epoch == 3 and saved.metrics["val/score"] == pytest.approx(0.5)
    assert saved.selection == {"criterion": SELECTION_CRITERION, "best_epoch": 1, "best_score": 0.5,
                               "start_score": 0.3, "backbone_score": None, "beats_start": True,
                               "stopped_early": True}
    assert any(line.startswith("the checkpoint holds epoch 1 (validation score 0.5000; the pretrained start "
                               "scored 0.3000)") for line in lines)


def test_when_no_epoch_beats_the_start_the_checkpoint_holds_the_start_and_says_so(tmp_path, monkeypatch):
    images, labels, hierarchy = tiny_data()
    script = ScriptedValidation([0.60, 0.50, 0.55])
    monkeypatch.setattr(training, "evaluate", script)
    lines = []
    train(images, labels, hierarchy, tiny_config(hierarchy), replace(TC, epochs=2, patience=None),
          out=tmp_path / "m.pt", log=lines.append)
    saved = load_checkpoint(tmp_path / "m.pt")
    assert same_weights(saved.state_dict, script.seen[0])
    assert saved.selection["best_epoch"] == 0 and saved.selection["beats_start"] is False
    assert ("no epoch beat the pretrained start (validation score 0.6000 at epoch 0): the checkpoint holds the "
            "start's weights") in lines


def test_a_backbone_that_scores_as_well_as_the_trained_model_is_named_in_the_last_line(tmp_path, monkeypatch,
                                                                                       random_resnet18):
    images, labels, hierarchy = tiny_data()
    monkeypatch.setattr(training, "evaluate", ScriptedValidation([0.40, 0.30]))
    monkeypatch.setattr(training, "backbone_score", lambda *args: 0.45)
    lines = []
    train(images, labels, hierarchy, tiny_config(hierarchy), replace(TC, epochs=1), out=tmp_path / "m.pt",
          log=lines.append, backbone_weights=random_resnet18)
    assert ("no epoch beat the pretrained start (validation score 0.4000 at epoch 0): the checkpoint holds the "
            "start's weights; the untrained backbone scores 0.4500 here, as well or better: check your catalogue "
            "with `hiervec eval DATA --baseline imagenet` before you ingest") in lines
    assert load_checkpoint(tmp_path / "m.pt").selection["backbone_score"] == 0.45


def test_epoch_0_is_validated_and_logged_with_the_untrained_backbones_score(tmp_path, random_resnet18):
    images, labels, hierarchy = tiny_data()
    lines = []
    result = train(images, labels, hierarchy, tiny_config(hierarchy), replace(TC, epochs=1), out=tmp_path / "m.pt",
                   log=lines.append, backbone_weights=random_resnet18)
    start = result.history[0]
    assert start["epoch"] == 0 and "loss" not in start
    assert 0 <= start["val/score"] <= 1 and 0 <= start["backbone/score"] <= 1
    epoch0 = [line for line in lines if line.startswith("epoch 0 (the pretrained start) validation recall@1 ")]
    assert len(epoch0) == 1 and f"score {start['val/score']:.4f}" in epoch0[0]
    assert any(line.startswith(f"the untrained backbone (its pooled features, no new layers) scores "
                               f"{start['backbone/score']:.4f}") for line in lines)
    saved = load_checkpoint(tmp_path / "m.pt")
    assert saved.history[0] == start
    assert saved.selection["start_score"] == start["val/score"]
    assert saved.selection["backbone_score"] == start["backbone/score"]


def test_the_untrained_backbone_score_is_that_of_its_pooled_features(tmp_path, random_resnet18):
    images, labels, hierarchy = tiny_data()
    model = PyramidEmbedder(tiny_config(hierarchy), backbone_weights=random_resnet18)
    baseline = BackboneEmbedder(level_names=LEVELS, image_size=32, backbone="resnet18", weights=str(random_resnet18))
    vectors = baseline.embed(images).concat
    torch_vectors = build_backbone("resnet18", random_resnet18).eval()
    mean, std = model.mean, model.std
    with torch.no_grad():
        body = torch.nn.Sequential(*list(torch_vectors.children())[:-2])  # resnet18 up to layer4
        expected = torch.nn.functional.normalize(body((images.float() / 255 - mean) / std).mean((2, 3)), dim=1)
    assert vectors.shape == (len(images), 512)
    assert np.allclose(vectors, expected.numpy(), atol=1e-5)
    assert training.backbone_score(model, images, labels) == pytest.approx(
        selection_score(training._leave_one_out(vectors, labels, LEVELS), LEVELS))


def test_the_backbone_learns_at_its_own_rate_after_a_frozen_linear_probe(tmp_path, random_resnet18):
    images, labels, hierarchy = tiny_data()
    config = tiny_config(hierarchy)
    model = PyramidEmbedder(config, backbone_weights=random_resnet18)
    groups = parameter_groups(model, 1e-3, 0.1)
    assert [(g["name"], g["lr"]) for g in groups] == [("new layers", 1e-3), ("backbone", pytest.approx(1e-4))]
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == {id(p) for p in model.parameters()}
    assert {id(p) for p in model.body.parameters()} == ids[1]

    start = {k: v.clone() for k, v in model.body.state_dict().items()}
    probe = replace(TC, epochs=1, probe_epochs=1, patience=None, val_fraction=0.0)
    out = tmp_path / "probe.pt"
    train(images, labels, hierarchy, config, probe, out=out, backbone_weights=random_resnet18)
    probed = load_checkpoint(out).state_dict
    body = {k.removeprefix("body."): v for k, v in probed.items() if k.startswith("body.")}
    assert same_weights(body, start)  # weights and batch-norm statistics alike: the backbone was frozen
    assert not torch.equal(probed["heads.item.weight"], model.state_dict()["heads.item.weight"])

    out = tmp_path / "tuned.pt"
    train(images, labels, hierarchy, config, replace(probe, probe_epochs=0), out=out, backbone_weights=random_resnet18)
    tuned = load_checkpoint(out).state_dict
    assert not torch.equal(tuned["body.conv1.weight"], start["conv1.weight"])


def test_the_backbones_schedule_starts_after_the_probe():
    factor = training._schedule(100, 0.1, start=20)
    assert [factor(s) for s in (0, 19)] == [0.0, 0.0]
    assert factor(20) == pytest.approx(1 / 8) and factor(27) == pytest.approx(1.0)
    assert factor(99) < 0.01
    new_layers = training._schedule(100, 0.1)
    assert new_layers(0) == pytest.approx(0.1) and new_layers(9) == pytest.approx(1.0)


def test_a_backbone_from_random_weights_trains_at_the_full_rate_from_the_first_step(tmp_path):
    images, labels, hierarchy = tiny_data()
    lines = []
    train(images, labels, hierarchy, tiny_config(hierarchy), replace(TC, epochs=1, val_fraction=0.0),
          out=tmp_path / "m.pt", log=lines.append)
    assert any("lr 0.001 for the new layers, 0.001 for the backbone (random initial weights: no linear probe" in line
               for line in lines)
    assert not any("(linear probe)" in line for line in lines)


def test_resume_after_a_worse_epoch_continues_from_the_last_weights_not_the_best(tmp_path, monkeypatch):
    images, labels, hierarchy = tiny_data()
    config, tc = tiny_config(hierarchy), replace(TC, epochs=3, patience=None)
    monkeypatch.setattr(training, "evaluate", ScriptedValidation([0.1, 0.5, 0.3, 0.9]))
    whole = train(images, labels, hierarchy, config, tc, out=tmp_path / "whole.pt").checkpoint

    out = tmp_path / "split.pt"
    monkeypatch.setattr(training, "evaluate", ScriptedValidation([0.1, 0.5, 0.3, "killed"]))
    with pytest.raises(TypeError):  # dies validating epoch 3, after epoch 2's checkpoint
        train(images, labels, hierarchy, config, tc, out=out)
    interrupted = load_checkpoint(out)
    assert interrupted.epoch == 2
    assert interrupted.selection["best_epoch"] == 1 and interrupted.train_state["resume_weights"] is not None
    monkeypatch.setattr(training, "evaluate", ScriptedValidation([0.9]))
    resumed = train(images, labels, hierarchy, config, tc, out=out, resume=True).checkpoint
    assert resumed.selection["best_epoch"] == whole.selection["best_epoch"] == 3
    assert same_weights(resumed.state_dict, whole.state_dict)


def test_the_schedule_scales_with_the_data():
    tc = TrainConfig()  # 32 images a step
    assert tc.schedule(20_000) == (625, 3)  # Fashion-MNIST's demo: three passes, as before
    assert tc.schedule(1_648) == (51, 10)  # openclipart: one pass is 51 steps; 500 steps in all
    assert tc.schedule(245) == (MIN_STEPS_PER_EPOCH, 10)  # 5 images per category: 7 steps a pass
    assert tc.schedule(1_000_000, world_size=8) == (3906, 3)
    assert replace(tc, epochs=2, steps_per_epoch=7).schedule(245) == (7, 2)
    assert "a pass is 7 steps; at least 50 between validations" in training.describe_schedule(tc, 245)


@pytest.mark.parametrize("field, value, message", [
    ("backbone_lr_scale", 1.5, "backbone_lr_scale must be in [0, 1], got 1.5"),
    ("probe_epochs", -1, "probe_epochs must be 0 or more, got -1"),
    ("patience", 0, "patience must be at least 1 (or None for the default), got 0"),
    ("epochs", 0, "epochs must be at least 1 (or None for the default), got 0"),
])
def test_recipe_values_out_of_range_are_named(field, value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        TrainConfig(**{field: value})


def test_the_default_image_size_is_read_from_the_data(tmp_path):
    def images(sides, folder):
        folder.mkdir()
        paths = []
        for i, (w, h) in enumerate(sides):
            paths.append(folder / f"{i}.png")
            Image.new("RGB", (w, h), (200, 10, 10)).save(paths[-1])
        return paths

    medium = images([(100, 300), (140, 200), (150, 150)], tmp_path / "medium")
    size, why = default_image_size(medium)
    assert size == 128 and "median shorter side of 3 sampled images is 140 px" in why
    assert default_image_size(images([(28, 28)] * 3, tmp_path / "small"))[0] == 64
    assert default_image_size(images([(800, 600)] * 3, tmp_path / "large"))[0] == 224
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert default_image_size([broken, *medium])[0] == 128  # what cannot be opened is left out
    assert default_image_size([broken])[0] == 64


def principal_vectors(pooled: torch.Tensor, dims: list[int], weights: list[float]) -> torch.Tensor:
    """The reference for the backbone start: each level the pooled features projected on their top
    `dims[i]` singular directions (uncentred), unit length, concatenated with the level weights."""
    pooled = pooled.double()
    _, _, vh = torch.linalg.svd(pooled, full_matrices=False)
    parts = [w * torch.nn.functional.normalize(pooled @ vh[:d].T, dim=1) for d, w in zip(dims, weights)]
    return torch.cat(parts, dim=1).float()


@pytest.mark.parametrize("mode", ["pyramid", "flat"])
def test_the_backbone_start_searches_with_the_backbones_principal_components(mode, random_resnet18):
    images, labels, hierarchy = tiny_data()
    model = PyramidEmbedder(tiny_config(hierarchy, mode=mode), backbone_weights=random_resnet18).eval()
    x = images.float() / 255
    with torch.no_grad():
        pooled = model.body((x - model.mean) / model.std)[model.stages[-1]].mean((2, 3))
    taken = model.start_from_backbone(pooled, torch.from_numpy(labels))
    with torch.no_grad():
        levels, concat = model.vectors(x)
        logits = model.classify(levels, concat)
    if mode == "pyramid":
        assert taken == 16  # the pyramid's width (fpn_channels), below the 24 images
        expected = principal_vectors(pooled, [8, 8, 8], list(model.level_weights))
    else:
        assert taken == 24  # the flat head's width (3 levels x 8)
        expected = principal_vectors(pooled, [24], [1.0])
    assert torch.allclose(concat @ concat.T, expected @ expected.T, atol=1e-5)
    # every classifier starts at its classes' mean vectors: the level vectors then pick their own class
    for name, level_logits in logits.items():
        column = LEVELS.index(name)
        vectors = concat if mode == "flat" else levels[name]
        for label in np.unique(labels[:, column]):
            mean = torch.nn.functional.normalize(vectors[labels[:, column] == label].mean(0), dim=0)
            weight = model.classifiers[name].weight[label]
            assert torch.allclose(torch.nn.functional.normalize(weight, dim=0), mean, atol=1e-5)
        assert level_logits.shape == (len(images), hierarchy.num_classes[column])


def test_the_backbone_start_needs_average_pooling_and_features_of_the_deepest_map(random_resnet18):
    images, labels, hierarchy = tiny_data()
    gem = PyramidEmbedder(tiny_config(hierarchy, pooling="gem"))
    with pytest.raises(ConfigError, match="the backbone start needs average pooling"):
        gem.start_from_backbone(torch.rand(10, 512))
    with pytest.raises(ConfigError, match=r"expected \(n >= 2, 512\) pooled features, got \(10, 256\)"):
        PyramidEmbedder(tiny_config(hierarchy)).start_from_backbone(torch.rand(10, 256))


def test_training_starts_from_the_backbone_unless_asked_for_random_new_layers(tmp_path, random_resnet18):
    images, labels, hierarchy = tiny_data()
    config = tiny_config(hierarchy)
    starts = {}
    for head_init in ("backbone", "random"):
        lines = []
        result = train(images, labels, hierarchy, config, replace(TC, epochs=1, head_init=head_init),
                       out=tmp_path / f"{head_init}.pt", log=lines.append, backbone_weights=random_resnet18)
        starts[head_init] = result.history[0]
        said = [line for line in lines if line.startswith("the new layers start as the backbone")]
        assert len(said) == (head_init == "backbone")
        assert load_checkpoint(tmp_path / f"{head_init}.pt").train_state["train_config"]["head_init"] == head_init
    assert said == [] and starts["backbone"]["val/score"] != starts["random"]["val/score"]

    # the validation of epoch 0 is that of the principal components of the training images' pooled features
    train_idx, val_idx = training.split_validation(labels[:, -1], TC.val_fraction, TC.seed)
    model = PyramidEmbedder(config, backbone_weights=random_resnet18)
    training.start_from_backbone(model, images[train_idx], labels[train_idx], TC.seed)
    assert training.evaluate(model, images[val_idx], labels[val_idx])["recall@1"] == starts["backbone"]["val/recall@1"]


def test_the_backbone_start_reads_a_listing_as_it_reads_decoded_images(tmp_path, random_resnet18, monkeypatch):
    from embedder.streaming import ImageFiles

    from .test_streaming import write_files

    images, labels, hierarchy = tiny_data()
    files = ImageFiles(write_files(images, tmp_path / "files"), 32)
    monkeypatch.setattr(training, "HEAD_INIT_SAMPLE", 10)  # a seeded sample of the training images
    models = [PyramidEmbedder(tiny_config(hierarchy), backbone_weights=random_resnet18) for _ in range(2)]
    assert training.start_from_backbone(models[0], images, labels, seed=3) == 10
    assert training.start_from_backbone(models[1], files, labels, seed=3) == 10
    assert same_weights(models[0].state_dict(), models[1].state_dict())


def test_head_init_is_one_of_the_named_starts():
    with pytest.raises(ConfigError, match="head_init must be one of backbone, random, got 'pca'"):
        TrainConfig(head_init="pca")
