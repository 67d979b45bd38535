"""`Embedder`: a trained checkpoint, ready to turn images into per-level and image vectors.

>>> embedder = Embedder.from_checkpoint("model.pt")            # doctest: +SKIP
>>> out = embedder.embed(["a.jpg", "b.png"])                   # doctest: +SKIP
>>> out.concat.shape, out.dims                                 # doctest: +SKIP
((2, 192), {'department': 64, 'category': 64, 'item': 64})
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from hiervec_core.vectors import LevelVectors

from .checkpoint import load_checkpoint, restore_weights, temperatures_by_level
from .config import EmbedderConfig
from .data import decode_image, image_to_tensor, load_images
from .devices import Precision, resolve_device
from .errors import ConfigError, ImageDecodeError
from .hierarchy import Hierarchy
from .model import PyramidEmbedder
from .prediction import Prediction, decode_paths
from .runtimes import Runner, VectorsOnly, resolve_runtime, runner_for

ImageInput = str | os.PathLike | bytes | Image.Image


def frozen_for_cpu(model: PyramidEmbedder) -> Runner:
    """`model.vectors`, traced and frozen for inference: a faster path on CPUs.

    `torch.jit.freeze` folds batch norms into convolutions and constants into the graph,
    and `torch.jit.optimize_for_inference` hands convolutions to oneDNN with fused
    activations; `bench/speed.py` measures the speed-up and the effect on retrieval.
    The trace holds any batch size at the model's input size.
    """
    model = model.eval()
    size = model.config.image_size
    example = torch.rand(2, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's own deprecation notice; the path is measured, not assumed
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(VectorsOnly(model).eval(), example)))

    names = model.config.level_names

    def run(images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        concat, *levels = frozen(images)
        return dict(zip(names, levels)), concat

    return run


def forward_batches(
    model: PyramidEmbedder,
    images: torch.Tensor,
    batch_size: int = 64,
    runner: Runner | None = None,
    precision: Precision | None = None,
) -> LevelVectors:
    """Run `model` (or `runner`, e.g. `frozen_for_cpu(model)`) over uint8 ``(n, 3, H, W)`` images
    in eval mode, on the model's device: float32 vectors on the CPU.

    Under mixed `precision` the vectors come back as float32 and are normalised again in
    float32, so they keep unit length whatever the model computed in.
    """
    was_training = model.training
    if was_training:  # eval() walks every module: a cost per call the service's small batches felt
        model.eval()
    run = runner or model.vectors
    device = next(model.parameters()).device
    autocast = precision.autocast() if precision is not None else contextlib.nullcontext()
    levels: dict[str, list[np.ndarray]] = {}
    concat: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(device).float().div_(255)
            with autocast:
                level_vectors, image_vectors = run(batch.contiguous(memory_format=torch.channels_last))
            concat.append(_host_float32(image_vectors))
            for name, vector in level_vectors.items():
                levels.setdefault(name, []).append(_host_float32(vector))
    if was_training:
        model.train()
    config = model.config
    if not concat:  # no images: empty arrays of the right widths
        dims = {} if config.mode == "flat" else dict(zip(config.level_names, config.level_dims))
        return LevelVectors({n: np.empty((0, d), np.float32) for n, d in dims.items()}, np.empty((0, config.dim), np.float32))
    return LevelVectors({name: np.concatenate(parts) for name, parts in levels.items()}, np.concatenate(concat))


def _host_float32(vectors: torch.Tensor) -> np.ndarray:
    """Unit vectors as a float32 numpy array on the CPU (renormalised when computed in lower precision)."""
    if vectors.dtype != torch.float32:
        vectors = torch.nn.functional.normalize(vectors.float(), dim=1)
    return vectors.cpu().numpy()


class Embedder:
    """Inference over a `PyramidEmbedder`: batched, `torch.inference_mode`, channels_last.

    `device` is ``auto`` (CUDA, else MPS, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``;
    `amp=True` computes in bfloat16 (float16 on older GPUs and MPS) and still returns
    float32 unit vectors. `runtime` runs the vector part on CPUs through ``onnxruntime`` or
    ``openvino`` (exported once per model into a cache folder; vectors within 1e-4 of eager
    torch, see `embedder.runtimes`), ``torch`` (the default), or ``auto`` (the fastest
    installed on CPUs, torch on GPUs). `optimize=True` embeds through `frozen_for_cpu`
    (torch traced and frozen, about twice eager's speed on CPUs, float32; vectors agree
    with the eager model to float rounding). Thread counts are the caller's:
    `embedder.devices.set_threads` (every runtime uses torch's).

    Satisfies `hiervec_app.ImageEmbedder` (`level_names`, `level_dims`, `fingerprint`, `embed`)
    and `hiervec_app.CategoryPredictor` (`categories`, `predict_vectors`). `fingerprint` is the checkpoint's vector
    fingerprint: what a collection records, unchanged by retrained or recalibrated heads.
    """

    def __init__(
        self,
        model: PyramidEmbedder,
        hierarchy: Hierarchy,
        fingerprint: str,
        *,
        batch_size: int = 64,
        temperatures: Mapping[str, float] | Sequence[float] | None = None,
        optimize: bool = False,
        device: str | torch.device | None = "auto",
        amp: bool = False,
        runtime: str = "torch",
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        self.device = resolve_device(device)
        if optimize and (self.device.type != "cpu" or amp):
            raise ConfigError(f"optimize=True is the traced float32 path for CPUs; got device {self.device} "
                              f"with amp={amp} (use amp=True alone on GPUs)")
        self.runtime = resolve_runtime(runtime, self.device.type, torch_only=optimize or amp)
        if self.runtime != "torch" and (optimize or amp):
            raise ConfigError(f"optimize and amp are torch's; the {self.runtime} runtime computes in float32 "
                              f"on its own graph (choose one)")
        self.precision = Precision.for_device(self.device, amp)
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.optimized = optimize
        self._runner = frozen_for_cpu(self.model) if optimize else runner_for(self.runtime, self.model)
        self.hierarchy = hierarchy
        self.fingerprint = fingerprint
        self.location: str | None = None  # the checkpoint file, when loaded from one (ingest records it)
        self.batch_size = batch_size
        self.temperatures = temperatures_by_level(temperatures, model.config.level_names)  # {level: T}
        if min(self.temperatures.values()) <= 0:
            raise ConfigError(f"temperatures must be positive, got {self.temperatures}")

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, device: str | torch.device | None = "auto",
                        **kwargs) -> Embedder:
        """The model of a checkpoint file, read onto the CPU (files are device-independent), then moved to `device`."""
        checkpoint = load_checkpoint(path)
        model = PyramidEmbedder(checkpoint.config)
        restore_weights(model, checkpoint, path)
        kwargs.setdefault("temperatures", checkpoint.temperatures)
        embedder = cls(model, checkpoint.hierarchy, checkpoint.vector_fingerprint, device=device, **kwargs)
        embedder.location = str(Path(path).resolve())
        return embedder

    @property
    def config(self) -> EmbedderConfig:
        return self.model.config

    @property
    def level_names(self) -> tuple[str, ...]:
        return self.config.level_names

    @property
    def level_dims(self) -> tuple[int, ...]:
        """Per-level vector sizes; empty for a flat model, which has only the image vector."""
        return () if self.config.mode == "flat" else self.config.level_dims

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def categories(self) -> dict[str, set[str]]:
        """The category paths the model knows, per level."""
        return {name: set(vocab) for name, vocab in zip(self.hierarchy.level_names, self.hierarchy.vocabularies)}

    def prepare(self, image: ImageInput) -> torch.Tensor:
        """Decode and resize one image: a ``(3, s, s)`` uint8 tensor, or `ImageDecodeError`."""
        return image_to_tensor(decode_image(image), self.config.image_size)

    def embed(self, images: Sequence[ImageInput] | torch.Tensor) -> LevelVectors:
        """Vectors for PIL images, paths, encoded bytes, prepared uint8 tensors or a batch tensor.

        A batch tensor is ``(n, 3, H, W)``: uint8, or float in [0, 1]; it is resized to the
        model's input size. An image that cannot be decoded raises `ImageDecodeError`
        naming it; use `prepare` per file to skip such files instead.
        """
        return forward_batches(self.model, self._to_batch(images), self.batch_size, self._runner, self.precision)

    def predict(self, images: Sequence[ImageInput] | torch.Tensor, *, top: int = 3) -> list[Prediction]:
        """The most probable category path of each image, decoded jointly over the tree, calibrated."""
        return self.predict_vectors(self.embed(images), top=top)

    def predict_vectors(self, vectors: LevelVectors, *, top: int = 3) -> list[Prediction]:
        """Predictions from vectors this model made (e.g. read back from a collection): no image needed.

        The classifiers read the level vectors (the image vector for a flat model), so
        stored vectors are enough to predict again after the heads changed.
        """
        def on_device(array: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.asarray(array, np.float32)).to(self.device)

        temperature = self.temperatures
        with torch.inference_mode():
            logits = self.model.classify({name: on_device(v) for name, v in vectors.levels.items()},
                                         on_device(vectors.concat))
            log_probs = {name: torch.log_softmax(value / temperature[name], dim=1).cpu()
                         for name, value in logits.items()}
        return decode_paths(log_probs, self.hierarchy, top=top)

    def _to_batch(self, images: Sequence[ImageInput] | torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise ConfigError(f"expected a (n, 3, H, W) tensor, got shape {tuple(images.shape)}")
            if images.dtype != torch.uint8:
                if images.numel() and (images.min() < 0 or images.max() > 1):
                    raise ConfigError("float image tensors must hold values in [0, 1]")
                images = (images * 255).round().to(torch.uint8)
            if images.shape[-2:] != (size, size):
                images = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear",
                                                         antialias=True, align_corners=False)
                images = images.round().clamp(0, 255).to(torch.uint8)
            return images
        if all(isinstance(x, torch.Tensor) for x in images) and images:
            return torch.stack(list(images))
        batch, _, failures = load_images(list(images), size)
        if failures:
            raise ImageDecodeError(failures[0].source, failures[0].reason)
        return batch
