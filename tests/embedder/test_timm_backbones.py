"""timm backbones (``--backbone timm:NAME``): stages and strides from timm's ``feature_info``, a
plain ViT through the simple feature pyramid, weights from a state dict of the whole timm model
(made and checked with timm's own API) or from the Hugging Face cache, never a silent random start."""

import os

import pytest
import torch

from embedder import ConfigError, EmbedderConfig, PyramidEmbedder
from embedder.backbones import build_body, check_backbone
from embedder.errors import WeightsNotFoundError

timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'hiervec[timm]'; make venv installs it)")
pytestmark = pytest.mark.unit
CONVNET, VIT = "convnext_atto", "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def whole_model_files(tmp_path_factory):
    """State dicts of the whole timm models with random weights, as a user saves a fine-tuned one."""
    folder = tmp_path_factory.mktemp("timm-weights")
    files = {}
    for name in (CONVNET, VIT):
        torch.manual_seed(1)
        files[name] = folder / f"{name}.pt"
        torch.save(timm.create_model(name, pretrained=False).state_dict(), files[name])
    return files


def test_a_convnet_gives_its_deepest_stages_with_timms_strides_and_channels():
    body = build_body(f"timm:{CONVNET}", None, 3, 64)
    info = timm.create_model(CONVNET, features_only=True).feature_info
    assert body.stages == tuple(info.module_name()[-3:]) == ("stages.1", "stages.2", "stages.3")
    assert body.strides == tuple(info.reduction()[-3:]) == (8, 16, 32)
    maps = body.module(torch.zeros(2, 3, 64, 64))
    assert [tuple(maps[s].shape) for s in body.stages] == [(2, c, 64 // r, 64 // r) for c, r in
                                                          zip(info.channels()[-3:], info.reduction()[-3:])]
    with pytest.raises(ConfigError, match=f"timm:{CONVNET} has 4 feature stages, 5 levels asked"):
        build_body(f"timm:{CONVNET}", None, 5, 64)


def test_a_plain_vit_gets_a_simple_pyramid_on_its_last_map():
    body = build_body(f"timm:{VIT}", None, 4, 64)
    assert body.stages == ("stride4", "stride8", "stride16", "stride32") and body.strides == (4, 8, 16, 32)
    assert body.mean == (0.5, 0.5, 0.5) and body.std == (0.5, 0.5, 0.5)  # the ViT's own normalisation
    maps = body.module(torch.rand(2, 3, 64, 64))
    assert {s: tuple(m.shape) for s, m in maps.items()} == {
        "stride4": (2, 192, 16, 16), "stride8": (2, 192, 8, 8), "stride16": (2, 192, 4, 4), "stride32": (2, 192, 2, 2)}
    # the native map is the ViT's last block, unchanged; the coarser one its 2x2 max-pool
    assert torch.allclose(maps["stride32"], torch.nn.functional.max_pool2d(maps["stride16"], 2))
    with pytest.raises(ConfigError, match="simple pyramid has 4 maps, 5 levels asked"):
        build_body(f"timm:{VIT}", None, 5, 64)


@pytest.mark.parametrize("name", [CONVNET, VIT])
def test_weights_from_a_whole_model_state_dict_are_timms_own_features(name, whole_model_files):
    depth, size = 2, 64
    body = build_body(f"timm:{name}", whole_model_files[name], depth, size)
    kwargs = {"img_size": size} if name == VIT else {}
    reference = timm.create_model(name, features_only=True, pretrained=True, **kwargs,
                                  pretrained_cfg_overlay={"file": str(whole_model_files[name])}).eval()
    body.module.eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        ours, theirs = body.module(x), reference(x)
    deepest = ours[body.stages[-1]] if name == CONVNET else ours["stride16"]
    assert torch.allclose(deepest, theirs[-1], atol=1e-6)
    random = build_body(f"timm:{name}", None, depth, size).module.eval()
    with torch.no_grad():
        assert not torch.allclose(random(x)[body.stages[-1]], ours[body.stages[-1]], atol=1e-3)


def test_a_file_that_does_not_fit_is_an_error_naming_the_keys(whole_model_files, tmp_path):
    state = torch.load(whole_model_files[VIT], weights_only=True)
    state.pop("blocks.11.mlp.fc2.bias")
    state["extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(WeightsNotFoundError, match=r"partial.pt does not fit timm:vit_tiny_patch16_224 .*"
                                                   r"missing keys: blocks.11.mlp.fc2.bias; unexpected keys: extra.weight"):
        build_body(f"timm:{VIT}", tmp_path / "partial.pt", 2, 64)
    with pytest.raises(WeightsNotFoundError, match="'nope.pt' for timm:convnext_atto are neither 'imagenet' nor"):
        build_body(f"timm:{CONVNET}", "nope.pt", 2, 64)


def test_imagenet_weights_come_from_the_hugging_face_cache(whole_model_files, tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = timm.models.get_pretrained_cfg(CONVNET).hf_hub_id  # timm/convnext_atto.d2_in1k
    snapshot = tmp_path / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    os.link(whole_model_files[CONVNET], snapshot / "pytorch_model.bin")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    cached = build_body(f"timm:{CONVNET}", "imagenet", 2, 64).module
    from_file = build_body(f"timm:{CONVNET}", whole_model_files[CONVNET], 2, 64).module
    assert all(torch.equal(a, b) for a, b in zip(cached.state_dict().values(), from_file.state_dict().values()))


def test_names_are_checked_before_anything_is_built():
    check_backbone(f"timm:{CONVNET}")
    with pytest.raises(ConfigError, match=r"unknown timm model 'convnext_atoo' .*close names: "):
        check_backbone("timm:convnext_atoo")
    with pytest.raises(ConfigError, match="unknown backbone .convnext.; choose one of .* or timm:NAME for a timm model"):
        EmbedderConfig(("a", "b"), (2, 2), (4, 4), backbone="convnext")


@pytest.mark.parametrize("name", [CONVNET, VIT])
def test_the_pyramid_model_on_a_timm_backbone(name):
    config = EmbedderConfig(("dept", "cat", "item"), (2, 3, 4), (8, 8, 16), backbone=f"timm:{name}", image_size=64)
    model = PyramidEmbedder(config)
    out = model(torch.rand(2, 3, 64, 64))
    assert tuple(out.concat.shape) == (2, 32) and torch.allclose(out.concat.norm(dim=1), torch.ones(2), atol=1e-5)
    assert model.level_maps["dept"][1] == 32 and model.level_maps["item"][1] == 8  # coarsest level, deepest map
    assert {k: tuple(v.shape) for k, v in out.logits.items()} == {"dept": (2, 2), "cat": (2, 3), "item": (2, 4)}
