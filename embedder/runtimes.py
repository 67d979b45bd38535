"""CPU inference runtimes for the vector part of a model: torch, ONNX Runtime, OpenVINO.

Each runtime runs the same function, `PyramidEmbedder.vectors`: float images in [0, 1]
``(n, 3, s, s)`` in, the image vector and each level's vector out. Exported graphs take
any batch size at the model's input size; vectors agree with eager torch within 1e-4
(float32 everywhere: OpenVINO is told to keep float32, its default on some CPUs is a
lower precision that moves vectors by 1e-3), so one collection serves every runtime and
the model's fingerprint stays the same. The classifiers (category prediction) are tiny
and stay in torch, reading the vectors whichever runtime made them.

ONNX Runtime and OpenVINO are optional extras (`pip install hiervec[onnx]`,
`hiervec[openvino]`); asking for one that is not installed names the extra.

>>> resolve_runtime("torch", "cpu")
'torch'
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from hiervec_core.names import EXPORT_FORMATS, RUNTIMES

from .checkpoint import vector_fingerprint
from .errors import ConfigError
from .model import PyramidEmbedder

# Fastest first, as bench/speed.py measured them on CPUs (float32, batch 64): ONNX Runtime
# 1.96-2.27x eager torch, OpenVINO 1.90-2.06x.
PREFERENCE = ("onnxruntime", "openvino", "torch")
EXTRAS = {"onnxruntime": "onnx", "openvino": "openvino"}
FORMATS = dict(zip(EXPORT_FORMATS, ("onnxruntime", "openvino")))  # export format -> the runtime that runs it
EXPORT_MANIFEST = "hiervec-export.json"
INPUT, OUTPUT_CONCAT = "images", "concat"

logger = logging.getLogger(__name__)
Runner = Callable[[torch.Tensor], tuple[dict[str, torch.Tensor], torch.Tensor]]


def installed(runtime: str) -> bool:
    return runtime == "torch" or importlib.util.find_spec(runtime) is not None


def resolve_runtime(runtime: str | None, device_type: str, *, torch_only: bool = False) -> str:
    """``auto`` (or None): torch on GPUs or when `torch_only` (mixed precision, the traced path
    are torch's), else the fastest runtime installed; a named runtime must be installed (the
    error names the extra that installs it) and runs on CPUs."""
    if runtime in (None, "auto"):
        if device_type != "cpu" or torch_only:
            return "torch"
        return next(r for r in PREFERENCE if installed(r))
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be auto or one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if not installed(runtime):
        raise ConfigError(f"the {runtime} runtime is not installed: pip install 'hiervec[{EXTRAS[runtime]}]'")
    if runtime != "torch" and device_type != "cpu":
        raise ConfigError(f"the {runtime} runtime runs on CPUs; got device {device_type!r} (use device='cpu', "
                          f"or torch on the GPU)")
    return runtime


class VectorsOnly(torch.nn.Module):
    """`model.vectors` as a module with flat outputs: (concat, level_1, ..., level_L)."""

    def __init__(self, model: PyramidEmbedder):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        levels, concat = self.model.vectors(images)
        return (concat, *levels.values())


def output_names(model: PyramidEmbedder) -> list[str]:
    levels = [] if model.config.mode == "flat" else list(model.config.level_names)
    return [OUTPUT_CONCAT, *(f"level_{name}" for name in levels)]


def export(model: PyramidEmbedder, out: str | os.PathLike, fmt: str) -> Path:
    """Write the vector part of `model` as `fmt` (``onnx``: ``model.onnx``; ``openvino``:
    ``model.xml`` + ``model.bin``) into the folder `out`; returns the model file's path."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    resolve_runtime(FORMATS[fmt], "cpu")  # the format's library must be installed
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    module = VectorsOnly(model.eval()).eval()
    size = model.config.image_size
    example = torch.rand(2, 3, size, size)
    names = output_names(model)
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(module, (example,), onnx_path, input_names=[INPUT], output_names=names,
                              dynamic_axes={INPUT: {0: "n"}, **{name: {0: "n"} for name in names}},
                              opset_version=17, dynamo=False)
        if fmt == "onnx":
            target = out / "model.onnx"
            os.replace(onnx_path, target)
            return target
        import openvino as ov

        # OpenVINO reads the ONNX graph with its ONNX frontend, as `ov.convert_model` would; convert_model
        # also sends usage telemetry to Google Analytics unless the machine's user opted out (each event
        # from a forked copy of this process, then a 1 s wait): data leaving the machine that hiervec never
        # asked for, and seconds of each export (tests/embedder/test_runtimes.py: 66.8 s -> 46.1 s). Same vectors.
        converted = _openvino_core().read_model(onnx_path)
        ov.save_model(converted, Path(tmp) / "model.xml", compress_to_fp16=False)
        for name in ("model.xml", "model.bin"):
            os.replace(Path(tmp) / name, out / name)
        return out / "model.xml"


def _rounded(values: torch.Tensor) -> list[float]:
    return [round(float(v), 4) for v in values.flatten()]


def write_manifest(out: str | os.PathLike, fmt: str, model: PyramidEmbedder, hierarchy, fingerprint: str,
                   vector_fingerprint: str) -> Path:
    """What a deployment needs beside the graph: the input contract, outputs, fingerprints, hierarchy."""
    config = model.config
    manifest = {
        "format": fmt,
        "runtime": FORMATS[fmt],
        "input": {"name": INPUT, "shape": ["n", 3, config.image_size, config.image_size], "dtype": "float32",
                  "range": [0.0, 1.0], "layout": "NCHW", "colour": "RGB",
                  "preprocessing": f"decode, EXIF-rotate, convert to RGB, resize to {config.image_size}x"
                                   f"{config.image_size} (embedder.data.image_to_tensor), divide by 255; "
                                   f"the graph normalises with the backbone's mean {_rounded(model.mean)} and std "
                                   f"{_rounded(model.std)} itself"},
        "outputs": {name: ("image vector, unit length" if name == OUTPUT_CONCAT else "level vector, unit length")
                    for name in output_names(model)},
        "fingerprint": fingerprint,
        "vector_fingerprint": vector_fingerprint,
        "config": config.to_dict(),
        "hierarchy": hierarchy.to_dict(),
    }
    path = Path(out) / EXPORT_MANIFEST
    path.write_text(json.dumps(manifest, indent=2))
    return path


CACHE_RECORD = "hiervec-cache.json"  # the digests of an export's files, written with them
PROBE_TOLERANCE = 1e-4  # how far an export's vectors may be from eager torch's (float32 everywhere)


def cached_export(model: PyramidEmbedder, runtime: str, *, fresh: bool = False) -> Path:
    """The model exported for `runtime`, written once per weights under the cache folder
    ($HIERVEC_CACHE, else $XDG_CACHE_HOME/hiervec, else ~/.cache/hiervec). The folder is named by
    the vector fingerprint computed from the model itself, never by a name a caller gave it, and
    holds the SHA-256 of every file it wrote: files that no longer match (altered, truncated,
    replaced) are exported again, as they are with `fresh`."""
    fmt = {v: k for k, v in FORMATS.items()}[runtime]
    root = Path(os.environ.get("HIERVEC_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                / "hiervec")
    folder = root / f"{vector_fingerprint(model.config, model.state_dict())}-{fmt}"
    target = folder / ("model.onnx" if fmt == "onnx" else "model.xml")
    recorded = _recorded_digests(folder)
    if fresh or not target.is_file() or recorded != _digests(folder, fmt):
        if target.is_file() and not fresh:
            logger.warning("the cached %s export in %s does not match the digests written with it (altered or "
                           "corrupt): exporting it again", fmt, folder)
        export(model, folder, fmt)
        _write_atomically(folder / CACHE_RECORD, json.dumps({"sha256": _digests(folder, fmt)}, indent=1))
    return target


def _files(fmt: str) -> tuple[str, ...]:
    return ("model.onnx",) if fmt == "onnx" else ("model.xml", "model.bin")


def _digests(folder: Path, fmt: str) -> dict[str, str] | None:
    import hashlib

    found = {}
    for name in _files(fmt):
        try:
            digest = hashlib.sha256()
            with open(folder / name, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            found[name] = digest.hexdigest()
        except OSError:
            return None
    return found


def _recorded_digests(folder: Path) -> dict[str, str] | None:
    try:
        return json.loads((folder / CACHE_RECORD).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def runner_for(runtime: str, model: PyramidEmbedder) -> Runner | None:
    """A function from float images to (level vectors, image vector) on `runtime`; None for torch.

    Before it is handed out, it embeds a fixed probe batch and must give eager torch's vectors
    (within `PROBE_TOLERANCE`): a cached export that cannot be loaded, or that computes another
    model's vectors (a file swapped in the cache, a flipped byte), is exported again once, and
    refused with one line if it still does not match.
    """
    if runtime == "torch":
        return None
    problem = None
    for fresh in (False, True):
        path = cached_export(model, runtime, fresh=fresh)
        try:
            run = _load(runtime, path, model)
            problem = _probe_problem(run, model)
        except Exception as exc:  # a corrupt graph: each runtime has its own errors
            problem = f"cannot be loaded ({' '.join(str(exc).split())[:200] or type(exc).__name__})"
        if problem is None:
            return run
        if not fresh:
            logger.warning("the cached %s export in %s %s: exporting it again", runtime, path.parent, problem)
    raise ConfigError(f"the {runtime} export of this model (in {path.parent}) {problem}; run with runtime='torch', "
                      f"or remove that folder")


def _probe_problem(run: Runner, model: PyramidEmbedder) -> str | None:
    """None when `run` gives eager torch's vectors on a fixed probe batch, else what differs."""
    size = model.config.image_size
    probe = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        levels, concat = model.eval().vectors(probe)
        got_levels, got_concat = run(probe)
    pairs = [(concat, got_concat)] + [(levels[name], got_levels[name]) for name in got_levels]
    if any(a.shape != b.shape for a, b in pairs) or set(got_levels) != set(levels if model.config.mode != "flat"
                                                                                    else {}):
        return "computes vectors of another shape than this model's"
    worst = max(float((a - b).abs().max()) for a, b in pairs)
    if worst > PROBE_TOLERANCE:
        return f"computes other vectors than this model (they differ by {worst:.2g} from torch's on a probe batch)"
    return None


def _load(runtime: str, path: Path, model: PyramidEmbedder) -> Runner:
    names = list(model.config.level_names) if model.config.mode != "flat" else []
    threads = torch.get_num_threads()  # the process's thread count (--threads) holds for every runtime
    if runtime == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle worker threads sleep instead of spinning: a spinning worker took more CPU than the
        # service's event loop and starved it and Milvus Lite (BENCHMARKS.md, "profile").
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def run(images: torch.Tensor):
            outputs = session.run(None, {INPUT: images.contiguous().numpy()})
            return _split(outputs, names)
    else:
        compiled = _openvino_core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                             "INFERENCE_NUM_THREADS": threads})
        request = compiled.create_infer_request()

        def run(images: torch.Tensor):
            result = request.infer({INPUT: images.contiguous().numpy()})
            return _split([result[output] for output in compiled.outputs], names)

    return run


@functools.cache
def _openvino_core():
    """The process's one OpenVINO `Core`, kept until the process ends.

    OpenVINO's CPU plugin gives the thread that creates it an alternate signal stack of its
    own and unmaps it when the plugin is destroyed, restoring the stack it replaced only if
    its own is still the current one. With a `Core` per model, two models freed in another
    order than they were made leave the thread's alternate stack on unmapped memory, and the
    process dies silently (SIGSEGV) at the next signal a Python handler catches (SIGCHLD for
    a DataLoader, SIGTERM for the service): the test suite died this way three times. One
    `Core`, hence one CPU plugin, never restores anything out of order.
    """
    import openvino as ov

    return ov.Core()


def _split(outputs, names: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    concat, *levels = (torch.from_numpy(o.copy()) for o in outputs)
    return dict(zip(names, levels)), concat
