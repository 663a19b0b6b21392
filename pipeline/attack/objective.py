"""Objectives: the per-image loss a UAP search minimises (conf/attack/objective/).

Each is called as `objective(logits, clean_pred, pred, target)` on the logits of x + v, with the clean
predictions, the current predictions (`logits.argmax(1)`) and the target class index (None when
non-targeted), and returns one loss per image (B,). Lower is more fooled.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError


def target_labels(logits: torch.Tensor, target: int) -> torch.Tensor:
    return torch.full((len(logits),), target, dtype=torch.long, device=logits.device)


class CrossEntropy:
    """Targeted: the cross-entropy of the target. Non-targeted: minus the cross-entropy of a label, capped
    at `clamp` per image (so that images already far from it stop pulling), the label being the clean
    prediction (`label: clean`, SGD-UAP) or the current one (`label: current`, ART's FGSM)."""

    def __init__(self, label: str = "clean", clamp: float | None = None):
        if label not in ("clean", "current"):
            raise ConfigError(f"attack.objective.label={label!r}: expected 'clean' or 'current'")
        if clamp is not None and float(clamp) <= 0:
            raise ConfigError(f"attack.objective.clamp={clamp}: expected null or a positive number")
        self.label, self.clamp = label, None if clamp is None else float(clamp)

    def __call__(self, logits, clean_pred, pred, target):
        if target is not None:
            return F.cross_entropy(logits, target_labels(logits, target), reduction="none")
        ce = F.cross_entropy(logits, clean_pred if self.label == "clean" else pred, reduction="none")
        return -(ce if self.clamp is None else ce.clamp(max=self.clamp))


class LeaveClass:
    """Non-targeted: -log(1 - p_clean), minus the log-probability of *any other* class than the clean one
    under x + v: it pulls hardest where the clean class is surest and fades once another class wins.
    Targeted: the cross-entropy of the target."""

    def __call__(self, logits, clean_pred, pred, target):
        if target is not None:
            return F.cross_entropy(logits, target_labels(logits, target), reduction="none")
        others = logits.scatter(1, clean_pred[:, None], float("-inf"))
        return logits.logsumexp(1) - others.logsumexp(1)


class Margin:
    """The C&W margin, capped at -kappa: non-targeted, the clean class's logit minus the best other logit;
    targeted, the best non-target logit minus the target's. An image fooled by more than kappa stops pulling."""

    def __init__(self, kappa: float = 5.0):
        if float(kappa) < 0:
            raise ConfigError(f"attack.objective.kappa={kappa}: expected a number >= 0")
        self.kappa = float(kappa)

    def __call__(self, logits, clean_pred, pred, target):
        cls = clean_pred if target is None else target_labels(logits, target)
        own = logits.gather(1, cls[:, None])[:, 0]
        other = logits.scatter(1, cls[:, None], float("-inf")).amax(1)
        margin = own - other if target is None else other - own
        return margin.clamp(min=-self.kappa)


class SoftCount:
    """A smooth count of the images not yet fooled: sigmoid(margin / temperature), the margin as in
    `Margin` (uncapped). Its gradient is largest for images near the decision boundary, those one
    perturbation can still flip, so minimising it maximises the fooling rate itself, not a proxy."""

    def __init__(self, temperature: float = 1.0):
        if float(temperature) <= 0:
            raise ConfigError(f"attack.objective.temperature={temperature}: expected a positive number")
        self.temperature = float(temperature)
        self.margin = Margin(kappa=float("inf"))

    def __call__(self, logits, clean_pred, pred, target):
        return torch.sigmoid(self.margin(logits, clean_pred, pred, target) / self.temperature)
