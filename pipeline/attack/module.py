"""The UAP as a LightningModule whose only trainable parameter is `v`, searched by config-chosen parts.

`v` is one grayscale image (1 x H x W) added to every input, tiled over the 3 channels. The
classifier is frozen inside (eval mode, no gradient to its weights). `make` fits the module on the
input set (a loader of (x, y, index) batches) and returns the UAP. The parts (pipeline/attack/*.py,
conf/attack/<part>/) do the rest:

- initializer: where the search starts (zeros, a random point on the sphere, a saved UAP);
- objective: the per-image loss to minimise (cross-entropy, margin, ...);
- step: how v moves (FGSM steps summed over images, a torch optimiser on an autograd or estimated gradient,
  U-SimBA's DCT coordinates);
- acceptance: whether a step's candidate replaces v (the paper's accept-if-it-fools-more, always, or
  U-SimBA's if-the-summed-probability-improves);
- stopper: when a start ends (fooling rate >= 1 - delta, max passes, no progress for k passes);

and the module's own switches: one image at a time (`per_image`, the paper's loop) or minibatches,
step only on images not yet fooled (`skip_fooled`), `restarts` from random points of the sphere (with
`restart_objectives`, each restart minimising the next objective of that list),
`targeted_overrides` (attack keys that a targeted search takes instead: its own schedule),
`candidates` (UAPs made elsewhere: the previous zeta's, the targeted ones) measured and, when given,
the start of the first restart (with `start_at_candidate`: of the first start), and what is returned
(`keep`: the last iterate or the best one seen by exact input-set fooling rate). Every iterate is projected
onto the Lp ball (`norms.project`).

The classifier is reached through a `Victim` (pipeline/attack/victim.py) that counts every image it forwards
(`queries`, stopping the search at `max_queries`); with `black_box: true` it gives probabilities only, and a
part that needs gradients is refused when the attack is built.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
import torch.nn as nn
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from pipeline import precision, progress
from pipeline.attack.initializer import Zeros
from pipeline.attack.norms import check_norm, lp_norms, project, random_uap, zeta_to_eps
from pipeline.attack.victim import OutOfQueries, Victim, check_budget_pays_one_pass
from pipeline.data import augment_batch
from pipeline.errors import ConfigError, instantiate

log = logging.getLogger(__name__)

KEEP = ("last", "best")
# attack keys that shape the job around the search (or feed the parts by interpolation), not the module
TASK_KEYS = ("uap_file", "project_uap_file", "warm_start", "input_split", "input_limit", "input_source", "input_root",
             "surrogate_model", "surrogate_seed", "max_iter", "delta", "step")


def new_attack(attack, classifier: nn.Module, image_size: int, classes: Sequence[str], **changes) -> UAP:
    """The UAP module of an `attack` config (its task keys left out, `changes` applied) against `classifier`.
    With a stand-in classifier (nn.Identity) this checks every attack key, the parts' too, before any work."""
    a = OmegaConf.to_container(attack, resolve=True)
    targeted = a.pop("targeted_overrides", None) or {}
    for k in TASK_KEYS:
        a.pop(k, None)
    unknown = sorted(set(targeted) - set(a))
    if unknown:
        raise ConfigError(f"attack.targeted_overrides.{unknown[0]}: not an attack key; expected keys of the attack "
                          f"that a targeted search changes (restarts, start_at_candidate, stopper, ...)")
    if a.get("target") is not None and targeted:  # a targeted search's own schedule (grid_uap)
        a = OmegaConf.to_container(OmegaConf.merge(a, targeted))
    a.update(changes)
    return instantiate(a, classifier=classifier, image_size=image_size, classes=classes)


def indexed(images: torch.Tensor, labels: torch.Tensor) -> TensorDataset:
    """(x, y, index) items: the attacks track per-image state (clean prediction, fooled) by index."""
    return TensorDataset(images, labels, torch.arange(len(labels)))


class UAP(pl.LightningModule):
    """A universal adversarial perturbation and the search that makes it (see the module docstring)."""

    def __init__(self, classifier: nn.Module, image_size: int, classes: Sequence[str], *, stopper,
                 initializer=None, objective=None, step_rule=None, acceptance=None, norm: str = "linf",
                 zeta: float = 2.0, eps: float | None = None, target: str | None = None, clip: bool = False,
                 batch_size: int = 32, per_image: bool = False,
                 skip_fooled: bool = False, keep: str = "last", restarts: int = 0,
                 restart_objectives: Sequence | None = None, start_at_candidate: bool = False,
                 exact_fr: bool = False, black_box: bool = False, max_queries: int | None = None,
                 augment: dict | None = None, adaptive: bool = False, transform=None, name: str | None = None):
        super().__init__()
        self.classes = list(classes)
        self.norm = check_norm(norm)
        try:
            zeta = float(zeta)
        except (TypeError, ValueError):
            raise ConfigError(f"attack.zeta={zeta!r}: expected a percentage in (0, 100]") from None
        if not 0 < zeta <= 100:
            raise ConfigError(f"attack.zeta={zeta:g}: expected a percentage in (0, 100]")
        if batch_size is not None and int(batch_size) < 1:
            raise ConfigError(f"attack.batch_size={batch_size}: expected an integer >= 1 or null (the whole input "
                              f"set)")
        if max_queries is not None and (not isinstance(max_queries, int) or max_queries < 1):
            raise ConfigError(f"attack.max_queries={max_queries}: expected null (no limit) or an integer >= 1")
        if black_box and getattr(step_rule, "needs_gradients", False):
            raise ConfigError(f"attack.step_rule={type(step_rule).__name__} needs the victim's gradients, which "
                              f"attack.black_box=true does not give: choose a gradient-free step rule "
                              f"(attack=simba_uap, attack=nes_uap) or attack.black_box=false")
        if adaptive and not transform:
            raise ConfigError("attack.adaptive=true puts the evaluation's transform inside the attack, but "
                              "transform=none: choose one (transform=jpeg, transform=[resize,jpeg]) or "
                              "attack.adaptive=false")
        if target is not None and target not in self.classes:
            raise ConfigError(f"attack.target={target!r}: expected null (non-targeted) or one of {self.classes}")
        if keep not in KEEP:
            raise ConfigError(f"attack.keep={keep!r}: expected one of {list(KEEP)}")
        if not isinstance(restarts, int) or restarts < 0:
            raise ConfigError(f"attack.restarts={restarts}: expected an integer >= 0")
        self.initializer = initializer or Zeros()
        self.objective, self.step_rule = objective, step_rule
        self.acceptance, self.stopper = acceptance, stopper
        self.zeta, self.eps = float(zeta), eps
        self.target = None if target is None else self.classes.index(target)
        self.target_name, self.name = target, name or type(self).__name__
        self.clip, self.per_image = bool(clip), bool(per_image)
        self.batch_size = None if batch_size is None else int(batch_size)  # None: the whole input set per step
        self.skip_fooled, self.keep, self.restarts = bool(skip_fooled), keep, restarts
        # the restarts' objectives in turn (other objectives find other optima); none: the first one's
        self.restart_objectives = list(restart_objectives or [])
        # the first start begins at the best candidate (when there is one) instead of the initializer's point
        self.start_at_candidate = bool(start_at_candidate)
        self.exact_fr, self.augment = bool(exact_fr), dict(augment) if augment else None
        self.n_inputs = 0  # set by pipeline.attack.build.build_attack
        self.black_box = bool(black_box)
        # adaptive: the attacker knows the hospital's pipeline and attacks through it (pipeline.eval.transforms)
        self.adaptive = bool(adaptive)
        self.victim = Victim(classifier, self.black_box, max_queries, transform if self.adaptive else None)
        self.v = nn.Parameter(torch.zeros(1, image_size, image_size))
        self.classifier = classifier.eval()
        self.classifier.requires_grad_(False)
        self.automatic_optimization = False
        self.history: list[dict] = []  # per pass: start, seconds since the search began, input-set rate
        self.best: dict | None = None  # the best v seen (exact input-set rate) and where it came from
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

    @property
    def passes(self) -> int:
        return sum(h["pass"] > 0 for h in self.history)

    def perturb(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x + v, v (1, H, W) or (K, 1, H, W) broadcast over the channels; clipped to [0, 1] if `clip`."""
        xv = x + v
        return xv.clamp(0, 1) if self.clip else xv

    def is_fooled(self, pred: torch.Tensor, clean_pred: torch.Tensor) -> torch.Tensor:
        return pred == self.target if self.targeted else pred != clean_pred

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.perturb(x, self.v))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's fp32 logits, computed in its attack mode (precision.mode_of: bf16, channels_last);
        white-box only."""
        return self.victim.logits(x)

    @property
    def queries(self) -> int:
        return self.victim.queries

    def uap(self) -> torch.Tensor:
        return self.v.detach().cpu().clone()

    # -- the search
    def make(self, images: torch.Tensor, labels: torch.Tensor, trainer_kwargs: dict | None = None, seed: int = 0,
             candidates: Sequence[torch.Tensor] = (), callbacks: Sequence[pl.Callback] = ()) -> torch.Tensor:
        """Search on the input set (float images (N, 3, H, W)) and return the UAP (1, H, W).

        `callbacks`: Lightning callbacks watching the search (the bench's instruments, pipeline.bench.trace).

        `candidates`: UAPs to weigh against the search (projected onto this budget's ball); the first restart
        begins at the best of them, and with `keep: best` the result fools at least as many input images."""
        if self.eps is None:
            self.eps = zeta_to_eps(images[:, :1], self.zeta, self.norm)
        needs = (self.step_rule, self.acceptance) + (() if getattr(self.step_rule, "proposes", False)
                                                     else (self.objective,))
        if self.stopper.max_passes > 0 and None in needs:
            raise ConfigError(f"attack {self.name}: a search (attack.max_iter={self.stopper.max_passes}) needs an "
                              f"objective, a step_rule and an acceptance rule (attack/objective=..., ...)")
        if getattr(self.step_rule, "proposes", False) and not self.acceptance.scores:
            raise ConfigError(f"attack.step_rule={type(self.step_rule).__name__} proposes candidates that only a "
                              f"score-based acceptance judges: attack/acceptance=if_score_improves")
        self.dataset = indexed(images, labels)
        self.victim.queries = 0
        check_budget_pays_one_pass(self.victim.max_queries, len(labels))
        self.out_of_queries = False
        batch_size = self.batch_size or len(labels)
        self.candidates = [project(c.reshape(1, *self.v.shape), self.eps, self.norm)[0] for c in candidates]
        if self.step_rule is not None:
            steps_per_pass = -(-len(labels) // batch_size)
            self.step_rule.setup(self.eps, self.norm, self.v.numel(), self.stopper.max_passes * steps_per_pass,
                                 generator=torch.Generator().manual_seed(seed + 2))
        self.history, self.best, self.start, self.warm = [], None, 0, None
        self.clock = progress.Stopwatch()  # the search's time; measurements made beside it pause it
        init_gen, shuffle_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.v.copy_(project(self.initializer(self.v.shape, self.eps, self.norm, init_gen)[None],
                                 self.eps, self.norm)[0])
        if self.stopper.max_passes == 0:  # no search: the initializer's point (the random control)
            self.history = [{"start": 0, "pass": 0, "seconds": self.clock.elapsed(), "fr": float("nan"),
                             "queries": 0}]
            return self.uap()
        kw = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                  enable_model_summary=False, num_sanity_val_steps=0)
        kw.update(trainer_kwargs or {})
        kw.update(max_epochs=self.stopper.max_passes, limit_val_batches=0)
        # a bar labelled "UAP pass 3/15" on a terminal; else one log line per pass (on_train_epoch_end)
        shown = progress.trainer_progress(kw.pop("enable_progress_bar", True), self.pass_label)
        kw.update(shown, callbacks=[*shown["callbacks"], *callbacks])
        for start in range(self.restarts + 1):
            self.start = start
            if self.start > 0:
                if self.best is not None and self.best["fr"] >= 1 - self.stopper.delta or self.out_of_queries:
                    break
                warm_restart = self.start == 1 and self.warm is not None and not self.start_at_candidate
                with torch.no_grad():  # the first restart from the best candidate (a warm start), if any
                    self.v.copy_(self.warm if warm_restart else random_uap(self.v.shape, self.eps, self.norm, init_gen))
            self.current_objective = self.objective_of(self.start)
            loader = DataLoader(self.dataset, batch_size=batch_size, shuffle=True, generator=shuffle_gen)
            pl.seed_everything(seed + self.start, workers=True, verbose=False)
            self.trainer_ = pl.Trainer(**kw)
            with warnings.catch_warnings():  # by design: no Lightning optimiser (the step rule moves v itself)
                warnings.filterwarnings("ignore", message=r".*configure_optimizers. returned .None.")
                # the frozen classifier
                warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
                self.trainer_.fit(self, train_dataloaders=loader)
        if self.keep == "best" and self.best is not None:
            with torch.no_grad():
                self.v.copy_(self.best["v"])
            log.info("%s: returning the best UAP seen (%s, input-set %s %.3f)", self.name, self.best["from"],
                     "TSR" if self.targeted else "FR", self.best["fr"])
        return self.uap()

    def pass_label(self, trainer: pl.Trainer) -> str:
        start = f"start {self.start + 1}/{self.restarts + 1}, " if self.restarts else ""
        limit = f"/{self.victim.max_queries}" if self.victim.max_queries is not None else ""
        return f"UAP {start}pass {trainer.current_epoch + 1}/{trainer.max_epochs}, {self.queries}{limit} queries"

    def objective_of(self, start: int):
        if start == 0 or not self.restart_objectives:
            return self.objective
        return self.restart_objectives[(start - 1) % len(self.restart_objectives)]

    @torch.no_grad()
    def predict_all(self, v: torch.Tensor | None) -> torch.Tensor:
        """The victim's predictions on the input set (perturbed by v), as the evaluation predicts them; with a
        score-based acceptance also keeps each image's probabilities (`self.probs`), from the same queries."""
        preds = torch.empty(len(self.dataset), dtype=torch.long, device=self.device)
        for x, _, idx in self.eval_loader:
            x, idx = x.to(self.device), idx.to(self.device)
            xv = x if v is None else self.perturb(x, v.to(self.device))
            if self.scoring:
                p = self.victim.probabilities(xv)
                self.probs[idx], preds[idx] = p, p.argmax(1)
            else:
                preds[idx] = self.victim.predict(xv)
        return preds

    @property
    def scoring(self) -> bool:
        return self.acceptance is not None and self.acceptance.scores

    def exact_rate(self, v: torch.Tensor) -> float:
        """The input-set fooling rate (targeted: success rate) of v, from a pass over the whole set."""
        return self.is_fooled(self.predict_all(v), self.clean_pred).float().mean().item()

    def consider(self, v: torch.Tensor, fr: float, where: str) -> None:
        if self.best is None or fr >= self.best["fr"]:  # of equals, the latest (the most optimised)
            self.best = {"fr": fr, "v": v.detach().clone(), "from": where}

    def on_train_start(self):
        if self.start == 0:
            # a fixed-order loader for whole-set predictions (leaves the shuffling generator untouched)
            self.eval_loader = DataLoader(self.dataset, batch_size=precision.eval_batch(self.device))
            self.probs = (torch.zeros(len(self.dataset), len(self.classes), device=self.device) if self.scoring
                          else None)
            self.clean_pred = self.predict_all(None)
            # the clean images' probabilities, kept apart: weighing the candidates below overwrites self.probs
            self.clean_probs = None if self.probs is None else self.probs.clone()
            self.clock = progress.Stopwatch()
            try:
                for i, c in enumerate(self.candidates):
                    self.consider(c, self.exact_rate(c), f"candidate {i}")
            except OutOfQueries:
                self.out_of_queries = True
            self.warm = None if self.best is None else self.best["v"]
            if self.start_at_candidate and self.warm is not None:
                with torch.no_grad():
                    self.v.copy_(self.warm)
            log.info("%s: eps=%.5g (%s, zeta=%g%%), %s, %d input images, up to %d passes x %d start(s)%s", self.name,
                     self.eps, self.norm, self.zeta, f"target {self.target_name}" if self.targeted else "non-targeted",
                     len(self.clean_pred), self.stopper.max_passes, self.restarts + 1,
                     f"; the best of {len(self.candidates)} candidate UAPs fools {self.best['fr']:.3f}"
                     if self.candidates else "")
        self.fooled = torch.zeros_like(self.clean_pred, dtype=torch.bool)
        self.start_frs: list[float] = []
        # the score of the current v on each image (U-SimBA's last_probs): valid for the images scored since v
        # last changed; at the start, the clean images' where the search starts at v = 0
        self.score = self.image_scores(self.clean_probs, self.clean_pred) if self.scoring else None
        self.scored = torch.full_like(self.fooled, self.scoring and not self.v.detach().any())
        if self.out_of_queries:
            self.trainer.should_stop = True

    def image_scores(self, probs: torch.Tensor, cp: torch.Tensor) -> torch.Tensor:
        """Each image's score (..., B) under the acceptance rule, lower is better: the probability of the class to
        leave (each image's clean prediction), minus the target's (targeted)."""
        cls = cp.expand(probs.shape[:-1]) if self.target is None else torch.full_like(cp, self.target).expand(
            probs.shape[:-1])
        p = probs.gather(-1, cls[..., None])[..., 0]
        return -p if self.targeted else p

    def configure_optimizers(self):
        return self.step_rule.configure([self.v]) if hasattr(self.step_rule, "configure") else None

    def training_step(self, batch, batch_idx):
        if self.out_of_queries:
            return
        try:
            self.step_batch(batch)
            self.steps_in_pass += 1
        except OutOfQueries as e:
            log.info("%s: stops at %d queries (%s)", self.name, self.queries, e)
            self.out_of_queries, self.trainer.should_stop = True, True

    def step_batch(self, batch) -> None:
        x, _, idx = batch
        if self.augment:
            x = augment_batch(x, **self.augment)
        cp = self.clean_pred[idx]
        if self.per_image:  # the paper's loop: one image at a time, each step seen by the next image
            for i in range(len(idx)):
                self.step_on(x[i:i + 1], cp[i:i + 1], idx[i:i + 1])
        else:
            self.step_on(x, cp, idx)

    def step_on(self, x: torch.Tensor, cp: torch.Tensor, idx: torch.Tensor) -> None:
        """One step on these images: gradient of the objective, candidate(s), projection, acceptance."""
        v_before = self.v.detach().clone()
        if getattr(self.step_rule, "proposes", False):  # gradient-free candidates (U-SimBA), judged by scores
            self.accept(x, cp, idx, self.fooled[idx], project(self.step_rule.candidates(v_before), self.eps,
                                                               self.norm), v_before)
            return
        if getattr(self.step_rule, "gradient", None) is not None:  # an estimated gradient (black-box)
            self.estimated_step(x, cp, idx)
            return
        if self.step_rule.input_grad:  # FGSM: each image's gradient on its own input x + v
            with torch.enable_grad():
                xv = self.perturb(x, v_before).requires_grad_(True)
                logits = self.logits(xv)
                pred = logits.argmax(1)
                fooled = self.is_fooled(pred, cp)
                stepping = ~fooled if self.skip_fooled else torch.ones_like(fooled)
                self.fooled[idx] = fooled
                if not stepping.any():
                    return
                grad, = torch.autograd.grad(self.current_objective(logits, cp, pred, self.target).sum(), xv)
            cands = project(self.step_rule.candidates(v_before, grad, stepping), self.eps, self.norm)
        else:  # an optimiser on v over the batch's mean objective
            logits = self(x)
            pred = logits.argmax(1)
            fooled = self.is_fooled(pred.detach(), cp)
            stepping = ~fooled if self.skip_fooled else torch.ones_like(fooled)
            self.fooled[idx] = fooled
            if not stepping.any():
                return
            losses = self.current_objective(logits, cp, pred, self.target)
            loss = (losses[stepping] if self.skip_fooled else losses).mean()
            self.optimise(lambda: self.manual_backward(loss))
            cands = self.v.detach()[None]
            self.log("loss", loss.detach(), prog_bar=True)
        self.accept(x, cp, idx, fooled, cands, v_before)

    @torch.no_grad()
    def query_points(self, x: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
        """The victim's probabilities (K, B, C) of the images x (B, ...) under each of vs (K, 1, H, W), in batches
        of the evaluation's size."""
        k, b = len(vs), len(x)
        self.victim.afford(k * b)  # a step is paid whole or not begun
        chunk = max(1, precision.eval_batch(self.device) // b)
        out = [self.victim.probabilities(self.perturb(x.repeat(len(part), 1, 1, 1), part.repeat_interleave(b, 0)))
               for part in vs.split(chunk)]
        return torch.cat(out).view(k, b, -1)

    def estimated_step(self, x, cp, idx) -> None:
        """Adam (the step rule's optimiser) on a gradient estimated from probabilities (`step_rule.gradient`):
        the current v's predictions on the step's images, then the probes of the estimator, in one query."""
        est, v_before = self.step_rule.gradient, self.v.detach().clone()
        u, probes = est.probes(v_before)
        probs = self.query_points(x, torch.cat([v_before[None], probes]))
        logp = probs.clamp_min(1e-30).log()  # fp32 probabilities reach ~1e-38: keep the confident images' signal
        pred = logp[0].argmax(1)
        self.fooled[idx] = self.is_fooled(pred, cp)
        losses = torch.stack([self.current_objective(lp, cp, lp.argmax(1), self.target).mean() for lp in logp[1:]])
        self.optimise(lambda: setattr(self.v, "grad", est.estimate(u, losses).to(self.v.dtype)))
        self.log("loss", losses.mean(), prog_bar=True)

    def optimise(self, backward) -> None:
        """One step of the step rule's optimiser, `backward()` filling v's gradient (autograd, or an estimate);
        then its schedule, and the projection onto the ball."""
        opt = self.optimizers()
        opt.zero_grad()
        backward()
        opt.step()
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        with torch.no_grad():
            self.v.copy_(project(self.v[None], self.eps, self.norm)[0])

    @torch.no_grad()
    def accept(self, x, cp, idx, fooled, cands, v_before) -> None:
        fools = None
        if self.acceptance.scores:  # U-SimBA: the summed probability of the class to leave (reach)
            self.accept_by_score(x, cp, idx, cands, v_before)
            return
        if self.acceptance.check:  # every candidate on the step's images, in one batch
            k, b = len(cands), len(x)
            xs = self.perturb(x.repeat(k, 1, 1, 1), cands.repeat_interleave(b, 0))
            # white-box: in the attack's mode, as the search's own forward; black-box: the labels alone
            preds = self.victim.predict(xs) if self.black_box else self.logits(xs).argmax(1)
            fools = self.is_fooled(preds.view(k, b), cp.expand(k, -1))
        chosen = self.acceptance.choose(fools, fooled)
        if hasattr(self.step_rule, "feedback"):
            self.step_rule.feedback(chosen is not None)
        if chosen is None:
            self.v.copy_(v_before)
            return
        self.v.copy_(cands[chosen])
        if fools is not None:
            self.fooled[idx] = fools[chosen]

    @torch.no_grad()
    def accept_by_score(self, x, cp, idx, cands, v_before) -> None:
        self.victim.afford(len(x) * (len(cands) + (not self.scored[idx].all())))
        if not self.scored[idx].all():  # the current v's score on these images is not known yet: query it
            self.score[idx] = self.image_scores(self.query_points(x, v_before[None])[0], cp)
            self.scored[idx] = True
        probs = self.query_points(x, cands)
        scores = self.image_scores(probs, cp.expand(len(cands), -1))
        chosen = self.acceptance.choose_score(scores.sum(1), self.score[idx].sum().item())
        if chosen is None:
            self.v.copy_(v_before)
            return
        self.v.copy_(cands[chosen])
        self.scored.fill_(False)  # v moved: only these images' scores are known
        self.score[idx], self.scored[idx] = scores[chosen], True
        self.fooled[idx] = self.is_fooled(probs[chosen].argmax(1), cp)

    def on_train_epoch_start(self):
        self.steps_in_pass = 0

    def on_train_epoch_end(self):
        if self.out_of_queries and not self.steps_in_pass:  # the budget could not pay for this pass's first step
            log.info("%s: start %d stops after %d passes (out of queries)", self.name, self.start,
                     len(self.start_frs))
            self.trainer.should_stop = True
            return
        fr_exact = None
        if (self.exact_fr or self.keep == "best" or self.stopper.patience) and not self.out_of_queries:
            try:  # a pass over the set with v
                fooled = self.is_fooled(self.predict_all(self.v.detach()), self.clean_pred)
            except OutOfQueries:
                self.out_of_queries = True
            else:
                fr_exact = fooled.float().mean().item()
                self.consider(self.v, fr_exact, f"start {self.start} ({type(self.current_objective).__name__}), "
                                                f"pass {len(self.start_frs) + 1}")
                if self.exact_fr:  # ART: the fooled set of record is the exact one
                    self.fooled = fooled
        seconds = self.clock.elapsed()
        fr = fr_exact if fr_exact is not None else self.fooled.float().mean().item()
        self.start_frs.append(fr)
        self.history.append({"start": self.start, "pass": len(self.history) + 1, "seconds": seconds, "fr": fr,
                             "fr_exact": fr_exact, "queries": self.queries})
        self.log("fr", fr, prog_bar=True)
        self.log("queries", float(self.queries), prog_bar=True)
        self.log("uap_norm", lp_norms(self.v.detach()[None], self.norm).item(), prog_bar=True)
        reason = "out of queries" if self.out_of_queries else self.stopper.reason(self.start_frs)
        # one line per pass in a log: the first 50, then about 50 more per start (U-SimBA makes thousands)
        every, n = max(1, self.stopper.max_passes // 50), len(self.start_frs)
        if self.trainer.progress_bar_callback is None and (n <= 50 or n % every == 0 or reason):
            log.info("%s, %s %.3f", self.pass_label(self.trainer), "TSR" if self.targeted else "FR", fr)
        if reason:
            log.info("%s: start %d stops after %d passes (%s)", self.name, self.start, len(self.start_frs), reason)
            self.trainer.should_stop = True
