"""One checkpoint file: weights, `EmbedderConfig`, `Hierarchy`, metrics, fingerprint.

The fingerprint is a hash of the config, the hierarchy and every weight: two files with
the same fingerprint embed identically, so a Milvus collection records it to refuse
vectors from another model.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import IMAGE, EmbedderConfig, keyed_by_level
from .errors import CheckpointError, ConfigError
from .hierarchy import Hierarchy

FORMAT = "hiervec-checkpoint/1"


@dataclass
class Checkpoint:
    config: EmbedderConfig
    hierarchy: Hierarchy
    state_dict: dict[str, torch.Tensor]
    fingerprint: str
    epoch: int = 0
    metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    train_state: dict | None = None  # optimizer, scheduler, RNG, train config: what `resume` needs
    calibration: dict | None = None  # per-level softmax temperatures and their ECE/NLL (see prediction.calibrate)
    selection: dict | None = None  # which epoch the weights are, by what criterion, against the start (training)

    @property
    def vector_fingerprint(self) -> str:
        return vector_fingerprint(self.config, self.state_dict)

    @property
    def temperatures(self) -> dict[str, float]:
        """The calibrated temperature of each level, by level name (1 where none was fitted). Files
        written before they were keyed by name hold a list, coarsest level first: read as such."""
        return temperatures_by_level((self.calibration or {}).get("temperatures"), self.config.level_names)


def temperatures_by_level(found, level_names: Sequence[str]) -> dict[str, float]:
    """Temperatures as ``{level: T}`` from a mapping, a list (one per level, coarsest first) or None (all 1)."""
    if not found:
        return {name: 1.0 for name in level_names}
    if isinstance(found, Mapping):
        return keyed_by_level(found, level_names, "temperatures", 1.0)
    if len(found) != len(level_names):
        raise ConfigError(f"expected {len(level_names)} temperatures, one per level, got {list(found)}")
    return dict(zip(level_names, (float(t) for t in found)))


PER_LEVEL_PARTS = ("pools", "heads", "classifiers")  # the model's parts keyed by level name


def positional_key(key: str, config: EmbedderConfig) -> str:
    """`key` as the first model format named it, per-level parts by position (``heads.item.weight``
    -> ``heads.2.weight``): fingerprints hash these, so collections filled before the parts were
    keyed by level name keep their fingerprint."""
    part, _, rest = key.partition(".")
    name, _, tail = rest.partition(".")
    if part not in PER_LEVEL_PARTS or not tail:
        return key
    if config.mode == "flat":
        return f"{part}.0.{tail}"
    return f"{part}.{config.level_names.index(name)}.{tail}" if name in config.level_names else key


def named_key(key: str, config: EmbedderConfig) -> str:
    """`key` of a file written before per-level parts were keyed by level name, as the model names it now."""
    part, _, rest = key.partition(".")
    position, _, tail = rest.partition(".")
    if part not in PER_LEVEL_PARTS or not position.isdigit() or not tail:
        return key
    if config.mode == "flat":
        return f"{part}.{config.level_names[-1] if part == 'classifiers' else IMAGE}.{tail}"
    index = int(position)
    return f"{part}.{config.level_names[index]}.{tail}" if index < config.depth else key


def _hash_weights(digest, config: EmbedderConfig, state_dict: dict[str, torch.Tensor], *, classifiers: bool) -> None:
    keyed = sorted((positional_key(key, config), key) for key in state_dict)
    for position, key in keyed:
        if not classifiers and position.startswith("classifiers."):
            continue
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(position.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def fingerprint(config: EmbedderConfig, hierarchy: Hierarchy, state_dict: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    digest.update(repr(sorted(config.to_dict().items())).encode())
    digest.update(hierarchy.to_json().encode())
    _hash_weights(digest, config, state_dict, classifiers=True)
    return digest.hexdigest()[:16]



CLASSIFIER_ONLY = ("num_classes", "classifier_scale")  # config fields that change predictions, not vectors


def vector_fingerprint(config: EmbedderConfig, state_dict: dict[str, torch.Tensor]) -> str:
    """What the vectors depend on: the config and weights without the classifier heads.

    Collections record it: a model whose heads were retrained or recalibrated writes and
    searches the same vectors, so it may use (and relabel) the same collection.
    """
    digest = hashlib.sha256()
    digest.update(repr(sorted((k, v) for k, v in config.to_dict().items() if k not in CLASSIFIER_ONLY)).encode())
    _hash_weights(digest, config, state_dict, classifiers=False)
    return digest.hexdigest()[:16]


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    hierarchy: Hierarchy,
    *,
    epoch: int = 0,
    metrics: dict | None = None,
    history: list | None = None,
    train_state: dict | None = None,
    calibration: dict | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    selection: dict | None = None,
) -> Checkpoint:
    """Write atomically (a crash never leaves a half-written file); returns what was written.

    The weights are `model`'s, or `state_dict` when given (e.g. an earlier, better epoch's)."""
    config: EmbedderConfig = model.config
    state = {k: v.detach().cpu().clone() for k, v in (state_dict or model.state_dict()).items()}
    checkpoint = Checkpoint(
        config, hierarchy, state, fingerprint(config, hierarchy, state), epoch, metrics or {}, history or [], train_state,
        calibration, selection,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "config": config.to_dict(),
        "hierarchy": hierarchy.to_dict(),
        "state_dict": state,
        "fingerprint": checkpoint.fingerprint,
        "epoch": epoch,
        "metrics": checkpoint.metrics,
        "history": checkpoint.history,
        "train_state": train_state,
        "calibration": calibration,
        "selection": selection,
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return checkpoint


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint file; anything missing, damaged or of another format is a `CheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes): an interrupted copy or download?")
    try:
        # Our own files hold optimizer state and plain containers; weights_only keeps
        # arbitrary pickles from running code.
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = " ".join(str(exc).split()) or f"{type(exc).__name__} (a truncated or damaged file)"
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {reason}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a hiervec checkpoint ({FORMAT})")
    missing = [key for key in ("config", "hierarchy", "state_dict", "fingerprint") if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {', '.join(missing)}: it is damaged or was not "
                              f"written by hiervec")
    if not isinstance(payload["state_dict"], dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload["state_dict"].items()):
        raise CheckpointError(f"checkpoint {str(path)!r} has no valid weights (state_dict)")
    try:
        config = EmbedderConfig.from_dict(payload["config"])
        hierarchy = Hierarchy.from_dict(payload["hierarchy"])
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} has an unreadable model description: "
                              f"{' '.join(str(exc).split()) or type(exc).__name__}") from exc
    return Checkpoint(
        config,
        hierarchy,
        {named_key(key, config): value for key, value in payload["state_dict"].items()},
        payload["fingerprint"],
        payload.get("epoch", 0),
        payload.get("metrics", {}),
        payload.get("history", []),
        payload.get("train_state"),
        payload.get("calibration"),
        payload.get("selection"),
    )


def restore_weights(model: torch.nn.Module, checkpoint: Checkpoint, path: str | os.PathLike) -> None:
    """`checkpoint`'s weights into `model`; weights that are missing, extra or of another shape are a
    `CheckpointError` that names them (torch's own message is a page long)."""
    expected = model.state_dict()
    given = checkpoint.state_dict
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    shapes = sorted(k for k in set(expected) & set(given) if tuple(expected[k].shape) != tuple(given[k].shape))
    problems = []
    for what, keys in (("missing", missing), ("unexpected", extra), ("of another shape", shapes)):
        if keys:
            problems.append(f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    if problems:
        raise CheckpointError(f"checkpoint {str(path)!r} does not hold the weights of the model it describes: "
                              f"{'; '.join(problems)} weights")
    model.load_state_dict(given)
