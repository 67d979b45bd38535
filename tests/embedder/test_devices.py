"""Device choice, mixed precision and thread counts: every path on an explicit device, nothing
process-wide changed by the library, vectors back on the host as float32."""

import numpy as np
import pytest
import torch

from embedder import ConfigError, Embedder, PyramidEmbedder, TrainConfig, load_checkpoint, save_checkpoint, train
from embedder import devices
from embedder.devices import Precision, default_threads, resolve_device, set_threads

from .test_training import TINY_TRAIN, tiny_config, tiny_data

pytestmark = pytest.mark.unit


def test_resolve_device_names_and_refusals(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    with pytest.raises(ConfigError, match="device 'cuda' asked for, but torch sees no CUDA GPU here"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="device 'mps' asked for, but torch's MPS backend is not available"):
        resolve_device("mps")
    with pytest.raises(ConfigError, match=r"device must be one of auto, cpu, cuda, cuda:N, mps, got 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match="got 'cuda:x'"):
        resolve_device("cuda:x")


def test_auto_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="this machine has 2 CUDA device"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")


def test_precision_per_device(monkeypatch):
    cpu = Precision.for_device(torch.device("cpu"), amp=True)
    assert cpu.dtype == torch.bfloat16 and not cpu.scales_loss and str(cpu) == "bfloat16 autocast"
    assert Precision.for_device(torch.device("cpu"), amp=False).dtype is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    old_gpu = Precision.for_device(torch.device("cuda"), amp=True)
    assert old_gpu.dtype == torch.float16 and old_gpu.scales_loss
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert not Precision.for_device(torch.device("cuda"), amp=True).scales_loss


def test_threads_are_set_by_the_caller_never_by_building_an_embedder(tmp_path, torch_threads):
    images, _, hierarchy = tiny_data()
    save_checkpoint(tmp_path / "m.pt", PyramidEmbedder(tiny_config(hierarchy)), hierarchy)
    set_threads(1)
    Embedder.from_checkpoint(tmp_path / "m.pt", device="cpu").embed(images[:2])
    assert torch.get_num_threads() == 1
    with pytest.raises(ConfigError, match="threads must be at least 1, got 0"):
        set_threads(0)
    assert default_threads(1) >= default_threads(2) >= 1


class DeviceTensor(torch.Tensor):
    """Stands in for a tensor on an accelerator: `.numpy()` and arithmetic with host tensors
    fail, as on a GPU, until `.cpu()` brought it home."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.numpy:
            raise AssertionError(".numpy() called on a device tensor")
        given = (*args, *(kwargs or {}).values())
        flat = [a for arg in given for a in (arg if isinstance(arg, (list, tuple)) else [arg])]
        if any(type(a) is torch.Tensor and a.ndim > 0 for a in flat):
            raise AssertionError(f"{getattr(func, '__name__', func)} mixes a device tensor with a host tensor")
        result = super().__torch_function__(func, types, args, kwargs or {})
        if func is torch.Tensor.cpu:
            return result.as_subclass(torch.Tensor)
        return result


def on_device(tensor):
    return tensor.as_subclass(DeviceTensor) if isinstance(tensor, torch.Tensor) else tensor


def test_nothing_reads_a_device_tensor_without_bringing_it_to_the_host(tmp_path, monkeypatch):
    images, _, hierarchy = tiny_data()
    save_checkpoint(tmp_path / "m.pt", PyramidEmbedder(tiny_config(hierarchy)), hierarchy)
    embedder = Embedder.from_checkpoint(tmp_path / "m.pt", device="cpu")
    expected = embedder.embed(images[:3])
    model = embedder.model
    vectors = model.vectors
    monkeypatch.setattr(model, "vectors", lambda x: ({k: on_device(v) for k, v in vectors(x)[0].items()},
                                                     on_device(vectors(x)[1])))
    for classifier in model.classifiers.values():
        forward = classifier.forward
        monkeypatch.setattr(classifier, "forward", lambda x, forward=forward: on_device(forward(x)))
    out = embedder.embed(images[:3])
    assert type(out.concat) is np.ndarray and np.array_equal(out.concat, expected.concat)
    predictions = embedder.predict_vectors(out)
    assert len(predictions) == 3 and all(0 < p.confidence() <= 1 for p in predictions)


def test_mixed_precision_embedding_returns_float32_unit_vectors_close_to_float32(tmp_path):
    images, _, hierarchy = tiny_data()
    save_checkpoint(tmp_path / "m.pt", PyramidEmbedder(tiny_config(hierarchy)), hierarchy)
    exact = Embedder.from_checkpoint(tmp_path / "m.pt", device="cpu")
    mixed = Embedder.from_checkpoint(tmp_path / "m.pt", device="cpu", amp=True)
    assert mixed.fingerprint == exact.fingerprint and mixed.precision.dtype == torch.bfloat16
    a, b = exact.embed(images[:8]), mixed.embed(images[:8])
    assert b.concat.dtype == np.float32 and b.levels["item"].dtype == np.float32
    assert np.allclose(np.linalg.norm(b.concat, axis=1), 1, atol=1e-6)
    assert np.allclose(np.linalg.norm(b.levels["item"], axis=1), 1, atol=1e-6)
    assert not np.array_equal(a.concat, b.concat)  # bfloat16 really ran
    assert np.abs(a.concat - b.concat).max() < 0.05
    assert (a.concat * b.concat).sum(1).min() > 0.999  # cosine of each image's two vectors


def test_the_traced_cpu_path_refuses_other_devices_and_mixed_precision(tmp_path):
    _, _, hierarchy = tiny_data()
    save_checkpoint(tmp_path / "m.pt", PyramidEmbedder(tiny_config(hierarchy)), hierarchy)
    with pytest.raises(ConfigError, match="optimize=True is the traced float32 path for CPUs; got device cpu with "
                                          "amp=True"):
        Embedder.from_checkpoint(tmp_path / "m.pt", device="cpu", optimize=True, amp=True)


def test_training_on_an_explicit_device_with_mixed_precision(tmp_path):
    images, labels, hierarchy = tiny_data()
    lines = []
    result = train(images, labels, hierarchy, tiny_config(hierarchy), TINY_TRAIN, out=tmp_path / "m.pt",
                   device="cpu", amp=True, log=lines.append)
    assert "device cpu, bfloat16 autocast" in lines
    assert all(np.isfinite(h["loss"]) for h in result.history if h["epoch"] > 0)  # epoch 0 only validates
    saved = load_checkpoint(tmp_path / "m.pt")
    assert all(t.dtype in (torch.float32, torch.int64) for t in saved.state_dict.values())
    assert all(t.device.type == "cpu" for t in saved.state_dict.values())


def test_explicit_cpu_training_is_the_default_training(tmp_path):
    images, labels, hierarchy = tiny_data()
    config = tiny_config(hierarchy)
    default = train(images, labels, hierarchy, config, TINY_TRAIN, out=tmp_path / "a.pt")
    explicit = train(images, labels, hierarchy, config, TINY_TRAIN, out=tmp_path / "b.pt", device="cpu")
    assert default.checkpoint.fingerprint == explicit.checkpoint.fingerprint
    assert TrainConfig().batch_norm == "auto"
