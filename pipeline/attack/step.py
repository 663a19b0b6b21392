"""Step rules: how the gradient of the objective moves v (conf/attack/step_rule/).

- `FGSM`: the paper's step. Each stepping image's FGSM (L-inf: sign) or FGM (L2: unit L2) direction
  of the objective's gradient on its input x + v, averaged over the 3 channels (v is one grayscale
  image), summed over the images of the step, times the step length; `scales` gives the candidate
  multiples of that sum that the acceptance rule chooses from.
- `Optimizer`: a torch optimiser on v (Adam, SGD with momentum, ...) over the mean objective of the
  batch, its learning rate relative to eps per pixel, with an optional learning-rate schedule; the gradient
  from autograd (white-box) or estimated from the victim's probabilities alone (`gradient: NES`, black-box).
- `SimBA`: U-SimBA's step (Koga & Takemoto 2022), black-box: one coefficient of the low-frequency DCT basis
  per step, tried at -step and +step; the acceptance rule keeps the better if it improves the summed
  probability of the class to leave (or reach).

`needs_gradients` says whether a rule needs the victim's gradients (refused with attack.black_box=true).

Projection onto the Lp ball (`norms.project`) follows every step.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch

from pipeline.attack.dct import Basis, block_order
from pipeline.attack.norms import lp_norms, per_pixel
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
    needs_gradients = True

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

    def setup(self, eps: float, norm: str, numel: int, total_steps: int, generator=None) -> None:
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

    def __init__(self, optimizer: Callable, lr: float = 0.1, scheduler: Callable | None = None, gradient=None):
        if float(lr) <= 0:
            raise ConfigError(f"attack.step_rule.lr={lr}: expected a positive number (relative to eps per pixel)")
        self.make_optimizer, self.lr_rel, self.make_scheduler = optimizer, float(lr), scheduler
        self.gradient = gradient  # None: autograd through the victim; else an estimator (NES)
        self.needs_gradients = gradient is None

    def setup(self, eps: float, norm: str, numel: int, total_steps: int, generator=None) -> None:
        self.lr = self.lr_rel * per_pixel(eps, norm, numel)
        self.total_steps = max(1, int(total_steps))
        if self.gradient is not None:
            self.gradient.setup(eps, norm, numel, generator)

    def configure(self, params) -> dict | torch.optim.Optimizer:
        opt = self.make_optimizer(params, lr=self.lr)
        if self.make_scheduler is None:
            return opt
        names = inspect.signature(self.make_scheduler.func).parameters
        kw = {k: self.total_steps for k in ("T_max", "total_steps")
              if k in names and k not in self.make_scheduler.keywords}
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.make_scheduler(opt, **kw), "interval": "step"}}


class NES:
    """A gradient of the batch's mean objective from the victim's probabilities alone (natural evolution
    strategies, Ilyas et al. 2018), for one v shared by the images: `directions` random directions u_k (Gaussian
    DCT coefficients: every frequency, or the freq_dim x freq_dim lowest; L2 norm 1), each tried at v + sigma u_k and
    v - sigma u_k on every image of the step, in one batched query; the estimate is
    sum_k (L(v + sigma u_k) - L(v - sigma u_k)) / (2 sigma K) u_k. `sigma` is relative to eps per pixel x
    sqrt(H*W) (for L2: eps itself). Costs 2 x directions x batch queries per step."""

    def __init__(self, directions: int = 32, sigma: float = 0.25, freq_dim: int | None = None):
        if not isinstance(directions, int) or directions < 1:
            raise ConfigError(f"attack.step_rule.gradient.directions={directions}: expected an integer >= 1")
        if float(sigma) <= 0:
            raise ConfigError(f"attack.step_rule.gradient.sigma={sigma}: expected a positive number")
        if freq_dim is not None and (not isinstance(freq_dim, int) or freq_dim < 1):
            raise ConfigError(f"attack.step_rule.gradient.freq_dim={freq_dim}: expected null (every frequency) or "
                              f"an integer >= 1")
        self.directions, self.sigma_rel, self.freq_dim = directions, float(sigma), freq_dim

    def setup(self, eps: float, norm: str, numel: int, generator: torch.Generator | None) -> None:
        self.sigma = self.sigma_rel * per_pixel(eps, norm, numel) * math.sqrt(numel)
        self.basis = Basis(int(round(math.sqrt(numel))))
        self.freq = self.basis.size if self.freq_dim is None else self.freq_dim
        self.generator = generator or torch.Generator().manual_seed(0)

    def probes(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The directions (K, 1, H, W) and the points to score (2K, 1, H, W): v + sigma u_k, then v - sigma u_k."""
        u = self.basis.random(self.directions, self.freq, self.generator).to(v.device)
        return u, torch.cat([v + self.sigma * u, v - self.sigma * u])

    def estimate(self, u: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """The gradient (1, H, W) from the probes' mean losses (2K,)."""
        k = len(u)
        diff = (losses[:k] - losses[k:]) / (2 * self.sigma * k)
        return (diff.view(-1, 1, 1, 1) * u).sum(0)


class SimBA:
    """U-SimBA (Koga & Takemoto 2022, kztakemoto/U-SimBA): each step moves v by `step` x eps (in the attack's
    norm) along one coefficient of the DCT basis, taken in U-SimBA's order (the freq_dim x freq_dim lowest
    frequencies first, then shells of `stride`; a new random order when all are used), as two candidates
    v - q and v + q. Their published run: epsilon 0.5 on images in [-1, 1] against an L2 budget of 26.9
    (zeta 4 %), a step of 0.0186 x eps. Black-box: no gradient."""

    input_grad = False
    needs_gradients = False
    proposes = True  # candidates from the step rule alone, judged by the acceptance rule's scores

    def __init__(self, step: float = 0.0186, freq_dim: int = 28, stride: int = 1):
        if not 0 < float(step) <= 1:
            raise ConfigError(f"attack.step_rule.step={step}: expected a fraction of eps in (0, 1]")
        if not isinstance(freq_dim, int) or freq_dim < 1:
            raise ConfigError(f"attack.step_rule.freq_dim={freq_dim}: expected an integer >= 1")
        if not isinstance(stride, int) or stride < 1:
            raise ConfigError(f"attack.step_rule.stride={stride}: expected an integer >= 1")
        self.step, self.freq_dim, self.stride = float(step), freq_dim, stride

    def setup(self, eps: float, norm: str, numel: int, total_steps: int, generator=None) -> None:
        self.eps, self.norm = eps, norm
        self.basis = Basis(int(round(math.sqrt(numel))))
        self.generator = generator or torch.Generator().manual_seed(0)
        self.order, self.next = torch.zeros(0, dtype=torch.long), 0

    def candidates(self, v: torch.Tensor) -> torch.Tensor:
        """(2, 1, H, W), unprojected: v - q and v + q for the next coefficient's basis image q."""
        if self.next >= len(self.order):
            self.order, self.next = block_order(self.basis.size, self.freq_dim, self.stride, self.generator), 0
        q = self.basis.image(int(self.order[self.next])).to(v.device)
        self.next += 1
        q = q * (self.step * self.eps / lp_norms(q[None], self.norm).item())
        return torch.stack([v - q, v + q])

