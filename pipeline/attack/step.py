"""Step rules: how the gradient of the objective moves v (conf/attack/step_rule/).

- `FGSM`: the paper's step. Each stepping image's FGSM (L-inf: sign) or FGM (L2: unit L2) direction
  of the objective's gradient on its input x + v, averaged over the 3 channels (v is one grayscale
  image), summed over the images of the step, times the step length; `scales` gives the candidate
  multiples of that sum that the acceptance rule chooses from.
- `Optimizer`: a torch optimiser on v (Adam, SGD with momentum, ...) over the mean objective of the
  batch, its learning rate relative to eps per pixel, with an optional learning-rate schedule.

Projection onto the Lp ball (`norms.project`) follows every step.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch

from pipeline.attack.norms import per_pixel
from pipeline.errors import ConfigError


def fgsm_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """FGSM / FGM step direction of each image (B, C, H, W), averaged over channels -> (B, 1, H, W).

    The step is taken on the 3-channel input x+v; the UAP is one grayscale image, so the new v is the
    channel mean of (x+v+step) - x, as in the paper (projection "after averaging over channels").
    """
    if norm == "linf":
        d = grad.sign()
    else:
        d = grad / grad.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
    return d.mean(1, keepdim=True)


class FGSM:
    """FGSM steps summed over the stepping images; `step` is one image's step length (L-inf in pixel
    units, the paper's 0.001; L2 relative to sqrt(H*W), the same per-pixel size at every resolution).

    `scales`: the candidate updates are `scale x` the summed step, one per scale (the acceptance rule
    keeps the best). `adaptive: true` (one scale): the scale halves after a rejected candidate (down to
    `min_scale`) and doubles after an accepted one (up to the configured scale): one candidate per step
    that still takes large steps while they pay.
    """

    input_grad = True  # needs each image's gradient on its own input x + v

    def __init__(self, step: float = 0.001, scales: Sequence[float] = (1.0,), adaptive: bool = False,
                 min_scale: float = 1.0):
        scales = [float(s) for s in scales]
        if float(step) <= 0:
            raise ConfigError(f"attack.step={step}: expected a positive FGSM step")
        if not scales or any(s <= 0 for s in scales):
            raise ConfigError(f"attack.step_rule.scales={scales}: expected a non-empty list of positive numbers")
        if adaptive and (len(scales) != 1 or not 0 < float(min_scale) <= scales[0]):
            raise ConfigError(f"attack.step_rule.adaptive=true needs one scale >= attack.step_rule.min_scale > 0, "
                              f"got scales={scales}, min_scale={min_scale}")
        self.step, self.scales, self.adaptive, self.min_scale = float(step), scales, bool(adaptive), float(min_scale)
        self.scale = scales[0]

    def setup(self, eps: float, norm: str, numel: int, total_steps: int) -> None:
        self.norm = norm
        self.size = self.step * (math.sqrt(numel) if norm == "l2" else 1.0)
        self.scale = self.scales[0]

    def candidates(self, v: torch.Tensor, grad: torch.Tensor, stepping: torch.Tensor) -> torch.Tensor:
        """Candidate v's (K, 1, H, W), unprojected: v minus the scaled sum of the stepping images' steps."""
        steps = -self.size * fgsm_direction(grad, self.norm)  # descend the objective
        total = steps[stepping].sum(0)
        scales = [self.scale] if self.adaptive else self.scales
        return torch.stack([v + s * total for s in scales])

    def feedback(self, accepted: bool) -> None:
        if self.adaptive:
            self.scale = min(self.scale * 2, self.scales[0]) if accepted else max(self.scale / 2, self.min_scale)


class Optimizer:
    """A torch optimiser on v over the batch's mean objective. `optimizer`: a partial of a torch.optim
    class (Adam, SGD with momentum, ...); `lr`: relative to eps per pixel (eps for L-inf, eps/sqrt(H*W)
    for L2); `scheduler`: null or a partial of a torch.optim.lr_scheduler class, stepped every batch
    (its `T_max` / `total_steps` set to the search's length)."""

    input_grad = False

    def __init__(self, optimizer: Callable, lr: float = 0.1, scheduler: Callable | None = None):
        if float(lr) <= 0:
            raise ConfigError(f"attack.step_rule.lr={lr}: expected a positive number (relative to eps per pixel)")
        self.make_optimizer, self.lr_rel, self.make_scheduler = optimizer, float(lr), scheduler

    def setup(self, eps: float, norm: str, numel: int, total_steps: int) -> None:
        self.lr = self.lr_rel * per_pixel(eps, norm, numel)
        self.total_steps = max(1, int(total_steps))

    def configure(self, params) -> dict | torch.optim.Optimizer:
        opt = self.make_optimizer(params, lr=self.lr)
        if self.make_scheduler is None:
            return opt
        names = inspect.signature(self.make_scheduler.func).parameters
        kw = {k: self.total_steps for k in ("T_max", "total_steps")
              if k in names and k not in self.make_scheduler.keywords}
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.make_scheduler(opt, **kw), "interval": "step"}}
