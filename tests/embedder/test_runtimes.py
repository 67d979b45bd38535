"""ONNX Runtime and OpenVINO run the model's vector part with eager torch's vectors (within 1e-4)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from embedder import ConfigError, Embedder, EmbedderConfig, Hierarchy, PyramidEmbedder, save_checkpoint
from embedder import runtimes
from embedder.data import decode_image, image_to_tensor

pytestmark = pytest.mark.unit
HIERARCHY = Hierarchy.from_paths(["a/x/1", "a/y/2", "b/z/3", "b/z/4"], ("dept", "cat", "item"))
CPU_RUNTIMES = ("onnxruntime", "openvino")


def need(runtime: str) -> None:
    if not runtimes.installed(runtime):
        pytest.skip(f"{runtime} is not installed (pip install 'hiervec[{runtimes.EXTRAS[runtime]}]'; CI installs it)")


@pytest.fixture(scope="module", params=["pyramid", "flat"])
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    config = EmbedderConfig.for_hierarchy(HIERARCHY, dim=8, backbone="mobilenet_v2", image_size=64,
                                          mode=request.param, classifier_scale=4.0)
    path = tmp_path_factory.mktemp("runtimes") / f"{request.param}.pt"
    save_checkpoint(path, PyramidEmbedder(config), HIERARCHY)
    return path


@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
def test_vectors_and_predictions_match_eager_torch(checkpoint, runtime):
    need(runtime)
    images = (torch.rand(7, 3, 80, 80) * 255).to(torch.uint8)  # resized to 64 px on the way in
    eager = Embedder.from_checkpoint(checkpoint, device="cpu")
    other = Embedder.from_checkpoint(checkpoint, device="cpu", runtime=runtime, batch_size=3)  # batches of 3, 3, 1
    expected, got = eager.embed(images), other.embed(images)
    assert other.runtime == runtime and other.fingerprint == eager.fingerprint
    assert got.concat.dtype == np.float32 and got.concat.shape == expected.concat.shape
    assert np.abs(got.concat - expected.concat).max() < 1e-4
    assert got.levels.keys() == expected.levels.keys()
    for level, vectors in expected.levels.items():
        assert np.abs(got.levels[level] - vectors).max() < 1e-4, level
    assert np.allclose(np.linalg.norm(got.concat, axis=1), 1, atol=1e-5)
    ours, theirs = other.predict_vectors(got), eager.predict_vectors(expected)
    assert [p.path for p in ours] == [p.path for p in theirs]
    for a, b in zip(ours, theirs):
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-4)


def test_runtime_choice_names_what_is_missing_or_impossible(monkeypatch):
    assert runtimes.resolve_runtime("auto", "cuda") == "torch"
    assert runtimes.resolve_runtime("auto", "cpu", torch_only=True) == "torch"
    assert runtimes.resolve_runtime("auto", "cpu") == next(r for r in runtimes.PREFERENCE if runtimes.installed(r))
    with pytest.raises(ConfigError, match="runtime must be auto or one of torch, onnxruntime, openvino, got 'tvm'"):
        runtimes.resolve_runtime("tvm", "cpu")
    monkeypatch.setattr(runtimes, "installed", lambda name: name == "torch")
    assert runtimes.resolve_runtime("auto", "cpu") == "torch"
    with pytest.raises(ConfigError, match=r"the openvino runtime is not installed: pip install 'hiervec\[openvino\]'"):
        runtimes.resolve_runtime("openvino", "cpu")
    monkeypatch.setattr(runtimes, "installed", lambda name: True)
    with pytest.raises(ConfigError, match="runs on CPUs; got device 'cuda'"):
        runtimes.resolve_runtime("onnxruntime", "cuda")


def test_torch_only_options_refuse_another_runtime(checkpoint):
    need("onnxruntime")
    with pytest.raises(ConfigError, match="optimize and amp are torch's"):
        Embedder.from_checkpoint(checkpoint, device="cpu", runtime="onnxruntime", optimize=True)


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_export_writes_the_graph_and_its_contract(checkpoint, tmp_path, fmt):
    need(runtimes.FORMATS[fmt])
    result = CliRunner().invoke(cli, ["export", str(checkpoint), "--format", fmt, "--out", str(tmp_path / "out"),
                                      "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    manifest = json.loads((tmp_path / "out" / runtimes.EXPORT_MANIFEST).read_text())
    eager = Embedder.from_checkpoint(checkpoint, device="cpu")
    assert summary["fingerprint"] == manifest["vector_fingerprint"] == eager.fingerprint
    assert Hierarchy.from_dict(manifest["hierarchy"]) == HIERARCHY
    assert manifest["input"]["shape"] == ["n", 3, 64, 64] and manifest["input"]["range"] == [0.0, 1.0]
    # A deployment without hiervec: preprocess as the contract says, run the graph with the runtime alone.
    image = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    from PIL import Image

    batch = image_to_tensor(decode_image(Image.fromarray(image)), 64)[None].float().div(255).numpy()
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(summary["graph"], providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        outputs = dict(zip(names, session.run(None, {manifest["input"]["name"]: batch})))
    else:
        # the process's one Core, as hiervec's own runner uses (see the next test)
        compiled = runtimes._openvino_core().compile_model(summary["graph"], "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        result = compiled({manifest["input"]["name"]: batch})
        outputs = {o.get_any_name(): result[o] for o in compiled.outputs}
    assert list(outputs) == list(manifest["outputs"])
    expected = eager.embed([Image.fromarray(image)])
    assert np.abs(outputs["concat"] - expected.concat).max() < 1e-4
    for level, vectors in expected.levels.items():
        assert np.abs(outputs[f"level_{level}"] - vectors).max() < 1e-4


def test_an_openvino_export_sends_no_telemetry(tmp_path, monkeypatch):
    """OpenVINO's converter (`ov.convert_model`) reports each conversion to Google Analytics unless the
    user opted out (`import openvino` reports itself once, whoever imports it); hiervec's export reads
    the ONNX graph with OpenVINO's frontend and sends nothing more."""
    need("openvino")
    import openvino  # noqa: F401  (its own import event, before the count starts)
    import openvino_telemetry

    sent = []
    monkeypatch.setattr(openvino_telemetry.Telemetry, "send_event", lambda self, *args, **kw: sent.append(args))
    monkeypatch.setattr(openvino_telemetry.Telemetry, "start_session", lambda self, *args, **kw: sent.append(args))
    torch.manual_seed(3)
    model = PyramidEmbedder(EmbedderConfig.for_hierarchy(HIERARCHY, dim=8, backbone="resnet18", image_size=32,
                                                         fpn_channels=16)).eval()
    graph = runtimes.export(model, tmp_path / "out", "openvino")
    assert sent == [] and graph.name == "model.xml" and graph.with_suffix(".bin").stat().st_size > 0
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = model.vectors(images)[1]
    compiled = runtimes._openvino_core().compile_model(str(graph), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert np.abs(compiled(images.numpy())[0] - expected.numpy()).max() < 1e-4


def test_export_of_a_missing_model_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "none.pt"), "--format", "onnx", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "does not exist" in result.output


OUT_OF_ORDER = """
import gc, os, signal
from embedder import EmbedderConfig, Hierarchy, PyramidEmbedder
from embedder.runtimes import runner_for
hierarchy = Hierarchy.from_paths(["a/x/1", "a/y/2", "b/z/3"], ("dept", "cat", "item"))
config = EmbedderConfig.for_hierarchy(hierarchy, dim=8, backbone="resnet18", image_size=32, fpn_channels=16)
model = PyramidEmbedder(config).eval()
first, second = runner_for("openvino", model), runner_for("openvino", model)
del first; gc.collect()  # freed in another order than they were made
del second; gc.collect()
signal.signal(signal.SIGUSR1, lambda *_: print("handled", flush=True))
os.kill(os.getpid(), signal.SIGUSR1)
print("alive", flush=True)
"""


def test_openvino_models_freed_in_any_order_leave_signal_handling_intact(tmp_path):
    """Each OpenVINO CPU plugin swaps the creating thread's alternate signal stack and unmaps
    its own when destroyed: with one plugin per model, freeing two models out of order left
    the main thread on unmapped memory and the next handled signal killed the process
    silently (SIGSEGV, the suite died this way). hiervec keeps one Core per process."""
    need("openvino")
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(OUT_OF_ORDER)], cwd=root, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "HIERVEC_CACHE": str(tmp_path)})
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.split() == ["handled", "alive"]


def _cache_folder(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("HIERVEC_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
def test_a_cached_export_that_was_swapped_corrupted_or_truncated_is_exported_again(runtime, tmp_path, monkeypatch,
                                                                                   caplog):
    """The cache is trusted by what its files compute, not by their name: another model's export
    swapped in (with a matching digest record), a flipped byte and a truncated file are each found,
    exported again, and the runtime then gives eager torch's vectors."""
    need(runtime)
    cache = _cache_folder(tmp_path, monkeypatch)
    torch.manual_seed(1)
    mine = PyramidEmbedder(EmbedderConfig.for_hierarchy(HIERARCHY, dim=8, backbone="resnet18", image_size=32,
                                                        fpn_channels=16)).eval()
    other = PyramidEmbedder(EmbedderConfig.for_hierarchy(HIERARCHY, dim=8, backbone="resnet18", image_size=32,
                                                         fpn_channels=16)).eval()
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = mine.vectors(images)[1]
    target = runtimes.cached_export(mine, runtime)
    data_file = target if runtime == "onnxruntime" else target.with_suffix(".bin")
    record = target.parent / runtimes.CACHE_RECORD

    def vectors_now():
        return runtimes.runner_for(runtime, mine)(images)[1]

    # 1. another model's export under this model's name, its digests recorded too (a poisoned cache)
    foreign = runtimes.cached_export(other, runtime)
    for name in ("model.onnx",) if runtime == "onnxruntime" else ("model.xml", "model.bin"):
        (target.parent / name).write_bytes((foreign.parent / name).read_bytes())
    record.write_text((foreign.parent / runtimes.CACHE_RECORD).read_text())
    with caplog.at_level("WARNING", logger="embedder.runtimes"):
        assert torch.allclose(vectors_now(), expected, atol=1e-4)
    assert "computes other vectors than this model" in caplog.text
    # 2. one flipped byte in the weights (the record now disagrees): exported again
    data = bytearray(data_file.read_bytes())
    data[len(data) // 2] ^= 0x40
    data_file.write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level("WARNING", logger="embedder.runtimes"):
        assert torch.allclose(vectors_now(), expected, atol=1e-4)
    assert "does not match the digests written with it" in caplog.text
    # 3. a truncated file, and an empty one
    for size in (len(data) // 3, 0):
        data_file.write_bytes(data_file.read_bytes()[:size])
        assert torch.allclose(vectors_now(), expected, atol=1e-4)
    assert cache.is_dir()


@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
def test_an_export_that_never_matches_torch_is_refused_in_one_line(runtime, tmp_path, monkeypatch):
    need(runtime)
    _cache_folder(tmp_path, monkeypatch)
    torch.manual_seed(2)
    model = PyramidEmbedder(EmbedderConfig.for_hierarchy(HIERARCHY, dim=8, backbone="resnet18", image_size=32,
                                                         fpn_channels=16)).eval()
    real_export = runtimes.export

    def broken_export(model_, out, fmt):  # an exporter that writes garbage every time
        target = real_export(model_, out, fmt)
        (Path(out) / ("model.onnx" if fmt == "onnx" else "model.bin")).write_bytes(b"garbage")
        return target

    monkeypatch.setattr(runtimes, "export", broken_export)
    with pytest.raises(ConfigError, match=f"the {runtime} export of this model .* cannot be loaded .*; run with "
                                          "runtime='torch', or remove that folder"):
        runtimes.runner_for(runtime, model)
