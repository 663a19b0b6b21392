"""Defenses against UAPs (`python -m pipeline task=defense`, conf/defense/), each measured after every stage
against the attackers that know the defended model:

- `defense=uap_finetune` (the paper's): each round r >= 1 fine-tunes the model on the training split with the
  UAP made against the model of round r-1 on `fraction` of every batch (true labels kept).
- `defense=uat`: universal adversarial training (Shafahi et al., AAAI 2020): one perturbation shared by every
  training image, moved by an ascent step on every minibatch's loss (the same backward pass that trains the
  weights) and projected onto the attack's Lp ball; measured after every `epochs` epochs.

Stage 0 measures the undefended model. After each stage, on test: clean accuracy, the FR (TSR when targeted) of a
fresh white-box UAP made against the defended model (`defense_fr_fresh`, the configured attack), of the UAP the
stage trained against (`defense_fr_prev`), of the UAP made against the undefended model
(`defense_fr_undefended`), and with `defense.black_box_attack` of a fresh black-box UAP (`defense_fr_black_box`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import figures, precision, progress, tracking
from pipeline.attack.build import make_uap
from pipeline.attack.norms import project
from pipeline.attack.step import fgsm_direction
from pipeline.classifier import Classifier, make_trainer, save_checkpoint
from pipeline.config import defense_black_box_config
from pipeline.data import CXRDataModule
from pipeline.eval.metrics import accuracy, attack_rate
from pipeline.eval.predictions import predict

log = logging.getLogger(__name__)


class UAPTraining(pl.Callback):
    """Adversarial fine-tuning: the UAP is added to the first `fraction` of every (shuffled, so random)
    training batch, true labels kept, clipped to [0, 1] with `clip`; with `freeze_bn` BatchNorm keeps the
    statistics of the trained model (the UAP would shift them)."""

    def __init__(self, uap: torch.Tensor, fraction: float, clip: bool, freeze_bn: bool):
        self.uap, self.fraction, self.clip, self.freeze_bn = uap, fraction, clip, freeze_bn
        self.uap_in_batch: torch.Tensor | None = None  # what is added (UAT: a tensor that takes the gradient)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.freeze_bn:  # every batch: whatever Lightning toggled with .train()
            for m in module.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
        x = batch[0]
        k = int(round(len(x) * self.fraction))
        add = self.uap_in_batch if self.uap_in_batch is not None else self.uap.to(x.device)
        xk = x[:k] + add
        x[:k] = xk.clamp(0, 1) if self.clip else xk  # in place: the batch is this step's own tensor


class UniversalAdversarialTraining(UAPTraining):
    """Universal adversarial training: `uap` (1, H, W) is added to the first `fraction` of every batch as a
    differentiable input; after the backward pass it takes an ascent step on the batch's loss (`step` x eps:
    sign of the gradient for L-inf, the normalised gradient for L2) and is projected onto the eps ball."""

    def __init__(self, uap: torch.Tensor, fraction: float, clip: bool, freeze_bn: bool, eps: float, norm: str,
                 step: float):
        super().__init__(uap.detach().clone(), fraction, clip, freeze_bn)
        self.eps, self.norm, self.step = float(eps), norm, float(step)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.uap_in_batch = self.uap.detach().to(batch[0].device).clone().requires_grad_(True)
        super().on_train_batch_start(trainer, module, batch, batch_idx)

    def on_before_optimizer_step(self, trainer, module, optimizer):
        delta = self.uap_in_batch
        if delta is None or delta.grad is None:
            return
        with torch.no_grad():
            direction = fgsm_direction(delta.grad.float()[None], self.norm)[0]  # sign (L-inf) or unit vector (L2)
            self.uap = project((delta.detach() + self.step * self.eps * direction)[None], self.eps,
                               self.norm)[0].cpu()
        self.uap_in_batch = None


def run_defense(cfg: DictConfig, dm: CXRDataModule, model: Classifier, out: Path, device) -> dict[str, float]:
    d = cfg.defense
    test = dm.dataset("test")
    key = "tsr" if cfg.attack.target is not None else "fr"
    black_box = defense_black_box_config(cfg)
    history = []
    undefended: torch.Tensor | None = None
    stage_name = "epoch" if d.method == "uat" else "round"

    def measure(r: int, prev: torch.Tensor | None) -> tuple[torch.Tensor, float, dict]:
        atk, fresh, seconds = make_uap(cfg, dm, model.net, device)
        perts = {"clean": None, "fresh": fresh, "prev": prev if prev is not None else fresh,
                 "undefended": undefended if undefended is not None else fresh}
        if black_box is not None:
            perts["black_box"] = make_uap(black_box, dm, model.net, device)[1]
        p = predict(model.net, test, perts, clip=atk.clip, device=device)
        m = {"defense_acc_clean": accuracy(test.labels, p["clean"]), "defense_uap_seconds": seconds,
             **{f"defense_{key}_{k}": attack_rate(p["clean"], p[k], atk.target) for k in perts if k != "clean"}}
        step = r * int(d.epochs) if d.method == "uat" else r  # UAT: epochs; fine-tuning: rounds
        tracking.log_metrics(m, step=step)
        history.append({"round": step, **m})
        log.info("defense %s %d: clean acc %.3f, %s of a fresh UAP %.3f, of the UAP trained against %.3f, of the "
                 "undefended model's UAP %.3f%s", stage_name, step,
                 m["defense_acc_clean"], key.upper(), m[f"defense_{key}_fresh"], m[f"defense_{key}_prev"],
                 m[f"defense_{key}_undefended"],
                 f", of a fresh black-box UAP {m[f'defense_{key}_black_box']:.3f}" if black_box is not None else "")
        return fresh, atk.eps, m

    uap, eps, before = measure(0, None)
    undefended = uap
    model.optim = OmegaConf.create({"optimizer": OmegaConf.to_container(d.optimizer), "scheduler": None})
    shared = torch.zeros_like(uap)  # UAT's perturbation, carried from stage to stage
    for r in range(1, d.rounds + 1):
        model.net.requires_grad_(True)  # the attacks froze it
        clip, freeze_bn = bool(cfg.attack.clip), bool(d.get("freeze_bn", True))
        if d.method == "uat":
            with_uap = UniversalAdversarialTraining(shared, float(d.fraction), clip, freeze_bn, eps,
                                                    str(cfg.attack.norm), float(d.step))
        else:
            with_uap = UAPTraining(uap, float(d.fraction), clip, freeze_bn)
        mode = precision.mode_of(model.net, "train")  # fine-tuning: the training loop's mode
        precision.prepare(model.net, mode)

        # a labelled bar on a terminal, else one log line per epoch: never raw bars in a log file
        def label(t: pl.Trainer, r: int = r) -> str:
            return f"defense ({d.method}) stage {r}/{d.rounds}, epoch {t.current_epoch + 1}/{t.max_epochs}"

        shown = progress.trainer_progress(bool(cfg.trainer.get("enable_progress_bar", True)), label, label)
        trainer = make_trainer(cfg, max_epochs=int(d.epochs), precision=mode.lightning, logger=False,
                               enable_checkpointing=False, limit_val_batches=0, default_root_dir=str(out),
                               callbacks=[with_uap, *shown.pop("callbacks")], **shown)
        trainer.fit(model, train_dataloaders=dm.train_dataloader())
        model.net.to(device)
        if d.method == "uat":
            shared = with_uap.uap
            _, _, after = measure(r, shared)
        else:
            uap, _, after = measure(r, uap)
    path = out / "defense_classifier.pt"
    save_checkpoint(model, path, {"arch": model.arch, "classes": model.classes, "defense": str(d.method),
                                  "defense_rounds": int(d.rounds)})
    tracking.log_artifact(path)
    tracking.log_artifact(figures.plot_defense(history, key, out / "defense.png",
                                               "UAT epoch" if d.method == "uat" else "fine-tuning round"))
    return {"defense_acc_clean_before": before["defense_acc_clean"],
            f"defense_{key}_fresh_before": before[f"defense_{key}_fresh"],
            "defense_acc_clean_after": after["defense_acc_clean"],
            f"defense_{key}_fresh_after": after[f"defense_{key}_fresh"],
            f"defense_{key}_undefended_after": after[f"defense_{key}_undefended"],
            **({f"defense_{key}_black_box_before": before[f"defense_{key}_black_box"],
                f"defense_{key}_black_box_after": after[f"defense_{key}_black_box"]} if black_box is not None else {})}
