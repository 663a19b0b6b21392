"""Universal adversarial perturbations (UAPs) as LightningModules whose only trainable parameter is `v`.

`v` is one grayscale image (1 x H x W) added to every input, tiled over the 3 channels. The
classifier is frozen inside the attack (eval mode, no gradient to its weights). Fitting the attack on
the input set (a loader of (x, y, index) batches) yields the UAP.

- `FGSMUAP`: the paper's algorithm (Moosavi-Dezfooli et al. 2017 as implemented in ART, FGSM
  inner attacker): passes over the shuffled set; for each image not yet fooled an FGSM step on x+v,
  kept only if it flips that image (reaches the target); projection onto the Lp ball; early stop at
  fooling rate >= 1 - delta. `mode: faithful` does it one image at a time, `mode: batched` steps the
  not-yet-fooled images of a minibatch together and keeps the candidate update that flips the most.
- `SGDUAP`: stochastic gradient UAP (Shafahi et al. 2020): an optimiser on v over minibatches of a
  clamped cross-entropy, projection after each step.
- `RandomUAP`: the control: uniform on the Lp sphere of radius eps.

`project` is the one projection onto the Lp ball that every attack uses.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Sequence

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from pipeline.errors import ConfigError
from pipeline.evaluate import eval_batch

log = logging.getLogger(__name__)

NORMS = ("linf", "l2")


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ConfigError(f"attack.norm={norm!r}: expected one of {list(NORMS)} (norm=linf or norm=l2)")
    return norm


def lp_norms(x: torch.Tensor, norm: str) -> torch.Tensor:
    """The Lp norm of each row of x (N, ...) -> (N,)."""
    flat = x.flatten(1)
    return flat.abs().amax(1) if check_norm(norm) == "linf" else flat.norm(p=2, dim=1)


def project(v: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project each row of v (N, ...) onto the Lp ball of radius eps; points inside are unchanged."""
    if check_norm(norm) == "linf":
        return v.clamp(-eps, eps)
    n = lp_norms(v, norm).view(-1, *[1] * (v.ndim - 1))
    return v * torch.where(n > eps, eps / n.clamp(min=1e-12), torch.ones_like(n))


def zeta_to_eps(images: torch.Tensor, zeta: float, norm: str) -> float:
    """eps = zeta/100 x mean Lp norm of the single-channel images (N, 1, H, W) of the input set."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected single-channel images (N, 1, H, W), got {tuple(images.shape)}")
    return float(zeta) / 100.0 * lp_norms(images.double(), norm).mean().item()


def random_uap(shape: Sequence[int], eps: float, norm: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """A perturbation uniform on the Lp sphere of radius eps (its norm is exactly eps).

    L2: a normalised Gaussian. L-inf: uniform in the cube, then one coordinate pushed to a face (a
    uniform point on the cube's surface has exactly one coordinate at +-eps, the face chosen uniformly).
    """
    if check_norm(norm) == "l2":
        g = torch.randn(shape, generator=generator, dtype=torch.float64)
        return (g * (eps / g.norm())).float()
    v = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * eps
    flat = v.view(-1)
    i = torch.randint(flat.numel(), (1,), generator=generator)
    flat[i] = eps if torch.rand(1, generator=generator).item() < 0.5 else -eps
    return v.float()


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


def indexed(images: torch.Tensor, labels: torch.Tensor) -> TensorDataset:
    """(x, y, index) items: the attacks track per-image state (clean prediction, fooled) by index."""
    return TensorDataset(images, labels, torch.arange(len(labels)))


class UAPAttack(pl.LightningModule):
    """Base class: holds v, the frozen classifier, eps, target and the fooling-rate bookkeeping."""

    def __init__(self, classifier: nn.Module, image_size: int, classes: Sequence[str], norm: str = "linf",
                 zeta: float = 2.0, eps: float | None = None, step: float = 0.001, target: str | None = None,
                 clip: bool = False, max_iter: int = 15, delta: float = 0.2, batch_size: int = 32,
                 exact_fr: bool = False, input_split: str = "train", input_limit: int | None = None,
                 record_fr: bool = False):
        super().__init__()
        self.classes = list(classes)
        self.norm = check_norm(norm)
        if not 0 < float(zeta) <= 100:
            raise ConfigError(f"attack.zeta={zeta}: expected a percentage in (0, 100]")
        if int(max_iter) < 1:
            raise ConfigError(f"attack.max_iter={max_iter}: expected an integer >= 1")
        if not 0 <= float(delta) < 1:
            raise ConfigError(f"attack.delta={delta}: expected a number in [0, 1)")
        if int(batch_size) < 1:
            raise ConfigError(f"attack.batch_size={batch_size}: expected an integer >= 1")
        if target is not None and target not in self.classes:
            raise ConfigError(f"attack.target={target!r}: expected null (non-targeted) or one of {self.classes}")
        self.zeta, self.eps = float(zeta), eps
        self.target = None if target is None else self.classes.index(target)
        self.target_name = target
        self.clip, self.max_iter, self.delta = bool(clip), int(max_iter), float(delta)
        self.batch_size, self.exact_fr = int(batch_size), bool(exact_fr)
        # measurement only (benchmarks): the exact input-set FR after every pass, its time not counted
        self.record_fr = bool(record_fr)
        self.n_inputs = 0  # set by pipeline.experiment.build_attack
        self.input_split, self.input_limit = input_split, input_limit
        # step: L-inf in pixel units; L2 relative to sqrt(H*W) (the same per-pixel size at every resolution)
        self.step = float(step) * (math.sqrt(image_size * image_size) if self.norm == "l2" else 1.0)
        self.v = nn.Parameter(torch.zeros(1, image_size, image_size))
        self.classifier = classifier.eval()
        self.classifier.requires_grad_(False)
        self.automatic_optimization = False
        self.history: list[dict] = []  # per pass: seconds since fit start, input-set fooling rate
        self.register_buffer("clean_pred", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("fooled", torch.zeros(0, dtype=torch.bool), persistent=False)

    # -- the frozen classifier stays in eval mode whatever Lightning does with .train()
    def train(self, mode: bool = True):
        super().train(mode)
        self.classifier.eval()
        return self

    @property
    def targeted(self) -> bool:
        return self.target is not None

    def perturb(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x + v, v (1, H, W) or (K, 1, H, W) broadcast over the channels; clipped to [0, 1] if `clip`."""
        xv = x + v
        return xv.clamp(0, 1) if self.clip else xv

    def is_fooled(self, pred: torch.Tensor, clean_pred: torch.Tensor) -> torch.Tensor:
        return pred == self.target if self.targeted else pred != clean_pred

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.perturb(x, self.v))

    # -- fitting
    def make(self, images: torch.Tensor, labels: torch.Tensor, trainer_kwargs: dict | None = None,
             seed: int = 0) -> torch.Tensor:
        """Fit on the input set (float images (N, 3, H, W)) and return the UAP (1, H, W)."""
        if self.eps is None:
            self.eps = zeta_to_eps(images[:, :1], self.zeta, self.norm)
        gen = torch.Generator().manual_seed(seed)
        loader = DataLoader(indexed(images, labels), batch_size=self.batch_size, shuffle=True, generator=gen)
        kw = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                  enable_model_summary=False, num_sanity_val_steps=0)
        kw.update(trainer_kwargs or {})
        kw.update(max_epochs=self.max_iter, limit_val_batches=0)
        pl.seed_everything(seed, workers=True)
        self.trainer_ = pl.Trainer(**kw)
        self.trainer_.fit(self, train_dataloaders=loader)
        return self.uap()

    def uap(self) -> torch.Tensor:
        return self.v.detach().cpu().clone()

    @torch.no_grad()
    def predict_all(self, loader, v: torch.Tensor | None) -> torch.Tensor:
        preds = torch.empty(len(loader.dataset), dtype=torch.long, device=self.device)
        for x, _, idx in loader:
            x = x.to(self.device)
            preds[idx.to(self.device)] = self.classifier(x if v is None else self.perturb(x, v)).argmax(1)
        return preds

    def on_train_start(self):
        # a fixed-order loader for whole-set predictions (leaves the shuffling generator untouched)
        self.eval_loader = DataLoader(self.trainer.train_dataloader.dataset, batch_size=eval_batch(self.device))
        self.clean_pred = self.predict_all(self.eval_loader, None)
        self.fooled = torch.zeros_like(self.clean_pred, dtype=torch.bool)
        self.t_start = time.perf_counter()
        self.unclocked = 0.0  # seconds of measurement-only work, left out of the history's times
        self.history = []
        log.info("%s: eps=%.5g (%s, zeta=%g%%), %s, %d input images, up to %d passes", type(self).__name__,
                 self.eps, self.norm, self.zeta, f"target {self.target_name}" if self.targeted else "non-targeted",
                 len(self.clean_pred), self.max_iter)

    def fooling_rate(self) -> float:
        """On the input set: exact (a pass with the current v) or running (each image's last measured state)."""
        if self.exact_fr:
            self.fooled = self.is_fooled(self.predict_all(self.eval_loader, self.v), self.clean_pred)
        return self.fooled.float().mean().item()

    def on_train_epoch_end(self):
        fr = self.fooling_rate()
        seconds = time.perf_counter() - self.t_start - self.unclocked
        fr_exact = fr if self.exact_fr else None
        if self.record_fr and not self.exact_fr:  # benchmark: an exact pass, off the clock
            t0 = time.perf_counter()
            fr_exact = self.is_fooled(self.predict_all(self.eval_loader, self.v), self.clean_pred).float().mean().item()
            self.unclocked += time.perf_counter() - t0
        self.history.append({"pass": self.current_epoch + 1, "seconds": seconds, "fr": fr, "fr_exact": fr_exact})
        self.log("fr", fr, prog_bar=True)
        self.log("uap_norm", lp_norms(self.v.detach()[None], self.norm).item(), prog_bar=True)
        if fr >= 1 - self.delta:
            log.info("fooling rate %.3f >= 1 - delta after %d passes: stopping", fr, self.current_epoch + 1)
            self.trainer.should_stop = True

    @property
    def passes(self) -> int:
        return len(self.history)

    def configure_optimizers(self):
        return None

    def labels_for_loss(self, pred: torch.Tensor) -> torch.Tensor:
        """FGSM's label: the target (targeted) or the current prediction on x+v (non-targeted, as ART)."""
        return torch.full_like(pred, self.target) if self.targeted else pred


class FGSMUAP(UAPAttack):
    """The paper's UAP algorithm with FGSM steps; `mode` faithful (one image at a time) or batched."""

    def __init__(self, *args, mode: str = "batched", step_scales: Sequence[float] = (8.0, 1.0), **kw):
        super().__init__(*args, **kw)
        if mode not in ("faithful", "batched"):
            raise ConfigError(f"attack.mode={mode!r}: expected 'faithful' or 'batched'")
        if not step_scales or any(s <= 0 for s in step_scales):
            raise ConfigError(f"attack.step_scales={list(step_scales)}: expected a non-empty list of positive numbers")
        self.mode, self.step_scales = mode, [float(s) for s in step_scales]

    def signed_steps(self, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions on x+v and each image's FGSM step on v (B, 1, H, W), signed to fool."""
        with torch.enable_grad():
            xv = self.perturb(x, v).detach().requires_grad_(True)
            logits = self.classifier(xv)
            pred = logits.argmax(1)
            loss = F.cross_entropy(logits, self.labels_for_loss(pred), reduction="sum")
            grad, = torch.autograd.grad(loss, xv)
        sign = -1.0 if self.targeted else 1.0  # targeted: descend the loss of the target
        return pred, sign * self.step * fgsm_direction(grad, self.norm)

    def training_step(self, batch, batch_idx):
        x, _, idx = batch
        if self.mode == "faithful":
            for i in range(len(idx)):
                self.faithful_step(x[i:i + 1], idx[i:i + 1])
        else:
            self.batched_step(x, idx)

    @torch.no_grad()
    def faithful_step(self, x, idx):
        v = self.v.data
        pred, steps = self.signed_steps(x, v)
        cp = self.clean_pred[idx]
        if self.is_fooled(pred, cp).item():
            self.fooled[idx] = True
            return
        cand = project(v + steps[0], self.eps, self.norm)
        flipped = self.is_fooled(self.classifier(self.perturb(x, cand)).argmax(1), cp).item()
        if flipped:
            self.v.data.copy_(cand)
        self.fooled[idx] = flipped

    @torch.no_grad()
    def batched_step(self, x, idx):
        v = self.v.data
        cp = self.clean_pred[idx]
        pred, steps = self.signed_steps(x, v)
        fooled = self.is_fooled(pred, cp)
        self.fooled[idx] = fooled
        todo = ~fooled
        if not todo.any():
            return
        # candidates: the summed steps of the not-yet-fooled images (what taking each image's step in
        # turn would give), at a few scales; keep the one that fools the most images of the batch,
        # if it fools more than v does (images already fooled count too, so nothing is undone unseen)
        total = steps[todo].sum(0)
        cands = project(torch.stack([v + s * total for s in self.step_scales]), self.eps, self.norm)
        k, b = len(cands), len(x)
        preds = self.classifier(self.perturb(x.repeat(k, 1, 1, 1), cands.repeat_interleave(b, 0))).argmax(1)
        fools = self.is_fooled(preds.view(k, b), cp.expand(k, -1))
        best = int(fools.sum(1).argmax())
        if fools[best].sum() > fooled.sum():
            self.v.data.copy_(cands[best])
            self.fooled[idx] = fools[best]


class SGDUAP(UAPAttack):
    """Stochastic gradient UAP (Shafahi et al. 2020): an optimiser on v, projection after each step.

    Non-targeted: maximise the cross-entropy against the clean prediction, clamped at `loss_clamp`
    per image (so that already-fooled images stop pulling). Targeted: minimise the cross-entropy
    to the target. `lr` is relative to eps (per pixel: eps for L-inf, eps / sqrt(H*W) for L2).
    """

    def __init__(self, *args, lr: float = 0.1, loss_clamp: float = 5.0, optimizer: str = "adam", **kw):
        super().__init__(*args, **kw)
        if optimizer not in ("adam", "sgd"):
            raise ConfigError(f"attack.optimizer={optimizer!r}: expected 'adam' or 'sgd'")
        if lr <= 0 or loss_clamp <= 0:
            raise ConfigError(f"attack.lr={lr}, attack.loss_clamp={loss_clamp}: expected positive numbers")
        self.lr_rel, self.loss_clamp, self.opt_name = float(lr), float(loss_clamp), optimizer

    def configure_optimizers(self):
        per_pixel = self.eps if self.norm == "linf" else self.eps / math.sqrt(self.v.numel())
        lr = self.lr_rel * per_pixel
        if self.opt_name == "adam":
            return torch.optim.Adam([self.v], lr=lr)
        return torch.optim.SGD([self.v], lr=lr, momentum=0.9)

    def training_step(self, batch, batch_idx):
        x, _, idx = batch
        opt = self.optimizers()
        logits = self(x)
        pred = logits.argmax(1)
        cp = self.clean_pred[idx]
        self.fooled[idx] = self.is_fooled(pred.detach(), cp)
        if self.targeted:
            loss = F.cross_entropy(logits, torch.full_like(pred, self.target))
        else:
            loss = -F.cross_entropy(logits, cp, reduction="none").clamp(max=self.loss_clamp).mean()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        with torch.no_grad():
            self.v.copy_(project(self.v[None], self.eps, self.norm)[0])
        self.log("loss", loss.detach(), prog_bar=True)


class RandomUAP(UAPAttack):
    """The random control as an attack: uniform on the Lp sphere of radius eps, no fitting."""

    def make(self, images, labels, trainer_kwargs=None, seed: int = 0):
        if self.eps is None:
            self.eps = zeta_to_eps(images[:, :1], self.zeta, self.norm)
        t0 = time.perf_counter()
        with torch.no_grad():
            self.v.copy_(random_uap(self.v.shape, self.eps, self.norm, torch.Generator().manual_seed(seed)))
        self.history = [{"pass": 0, "seconds": time.perf_counter() - t0, "fr": float("nan")}]
        return self.uap()

    @property
    def passes(self) -> int:
        return 0
