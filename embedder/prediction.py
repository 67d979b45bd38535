"""Category paths predicted from the per-level classifiers, decoded jointly and calibrated.

A path is scored as a whole: the sum over levels of the log-probability of its category
at that level, so a child is only ever chosen under its own parent (level-by-level argmax
can pick a category from one branch and its child from another). The path scores are
normalised over every path of the tree; the probability reported at a level is the
total probability of the paths through the chosen category there, so it never grows
with depth.

>>> hierarchy = Hierarchy.from_paths(["a/x", "a/y", "b/z"], ("top", "leaf"))
>>> top = torch.log(torch.tensor([[0.6, 0.4]]))            # a, b
>>> leaf = torch.log(torch.tensor([[0.05, 0.05, 0.9]]))    # a/x, a/y, b/z
>>> [p.path for p in decode_paths({"top": top, "leaf": leaf}, hierarchy)]  # argmax per level: a, then b/z
['b/z']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError
from .hierarchy import Hierarchy


@dataclass(frozen=True)
class Prediction:
    """The most probable category path of one image, with its probability at each level."""

    path: str
    probabilities: dict[str, float]  # level name -> probability of the path's category at that level
    alternatives: tuple[tuple[str, float], ...] = field(default=())  # next most probable paths

    def confidence(self, level: str | None = None) -> float:
        """The probability at `level` (default: the finest level)."""
        return self.probabilities[level] if level is not None else next(reversed(self.probabilities.values()))

    def prefix(self, level: str) -> str:
        """The predicted category at `level` (a path from the root)."""
        depth = list(self.probabilities).index(level) + 1
        return "/".join(self.path.split("/")[:depth])

    def to_dict(self) -> dict:
        return {"path": self.path, "probabilities": self.probabilities,
                "alternatives": [{"path": p, "probability": q} for p, q in self.alternatives]}


def decode_paths(log_probs: Mapping[str, torch.Tensor], hierarchy: Hierarchy, *, top: int = 3) -> list[Prediction]:
    """Joint decoding of per-level log-probabilities ``{level: (n, C_level)}`` (the levels with a classifier)."""
    unknown = [name for name in log_probs if name not in hierarchy.level_names]
    if unknown:
        raise ConfigError(f"log-probabilities for unknown levels {unknown}; levels are {list(hierarchy.level_names)}")
    ancestors = torch.from_numpy(hierarchy.ancestors())  # (n_leaves, depth): each leaf's code at every level
    if not log_probs:
        raise ConfigError("no level has a classifier: nothing to predict from")
    n = next(iter(log_probs.values())).shape[0]
    scores = torch.zeros(n, len(hierarchy.leaves))
    for name, lp in log_probs.items():
        scores += lp.float()[:, ancestors[:, hierarchy.level_names.index(name)]]
    path_probs = torch.softmax(scores, dim=1)  # over every path of the tree
    level_probs = []
    for level in range(hierarchy.depth):  # marginal of each category: sum over its paths
        marginal = torch.zeros(n, hierarchy.num_classes[level])
        marginal.index_add_(1, ancestors[:, level], path_probs)
        # float32 sums of a sure prediction's path probabilities can come out at 1.0000001,
        # which is no probability (the store refuses it): clamp where they are made
        level_probs.append(marginal.clamp_(0.0, 1.0))
    ranked = torch.argsort(path_probs, dim=1, descending=True)[:, : top + 1]
    predictions = []
    for row in range(n):
        best = int(ranked[row, 0])
        probabilities = {name: float(level_probs[level][row, ancestors[best, level]])
                         for level, name in enumerate(hierarchy.level_names)}
        alternatives = tuple((hierarchy.leaves[int(leaf)], float(path_probs[row, leaf])) for leaf in ranked[row, 1:])
        predictions.append(Prediction(hierarchy.leaves[best], probabilities, alternatives))
    return predictions


# -- calibration -------------------------------------------------------------------------
def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, steps: int = 200) -> float:
    """The temperature T > 0 minimising the NLL of ``softmax(logits / T)`` (temperature scaling, Guo et al. 2017)."""
    logits, labels = logits.detach().float(), torch.as_tensor(labels, dtype=torch.long)
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def nll(logits: torch.Tensor, labels, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(logits.float() / temperature, torch.as_tensor(labels, dtype=torch.long)))


def expected_calibration_error(probs: np.ndarray | torch.Tensor, labels, *, bins: int = 15) -> float:
    """ECE: the gap between confidence and accuracy, averaged over equal-width confidence bins."""
    probs = torch.as_tensor(probs, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.long)
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            ece += inside.float().mean() * (confidence[inside].mean() - correct[inside].mean()).abs()
    return float(ece)


def calibrate(logits: Mapping[str, torch.Tensor], labels: np.ndarray, level_names: Sequence[str]) -> dict:
    """Per-level temperatures fitted on held-out `logits` ``{level: (n, C)}``, with ECE and NLL before and after.

    Returns ``{"temperatures": {level: T}, "ece_before": {...}, "ece_after": {...}, "nll_before": ...,
    "nll_after": ...}``, every level keyed by name (a level without a classifier keeps temperature 1).
    """
    report: dict = {"temperatures": {}, "ece_before": {}, "ece_after": {}, "nll_before": {}, "nll_after": {}}
    for level, name in enumerate(level_names):
        level_logits = logits.get(name)
        if level_logits is None:
            report["temperatures"][name] = 1.0
            continue
        y = labels[:, level]
        t = fit_temperature(level_logits, torch.from_numpy(y))
        report["temperatures"][name] = t
        report["ece_before"][name] = expected_calibration_error(torch.softmax(level_logits, 1), y)
        report["ece_after"][name] = expected_calibration_error(torch.softmax(level_logits / t, 1), y)
        report["nll_before"][name] = nll(level_logits, y)
        report["nll_after"][name] = nll(level_logits, y, t)
    return report
