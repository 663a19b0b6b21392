"""Adversarial fine-tuning with UAPs (`python -m pipeline task=defense`, conf/defense/uap_finetune.yaml).

Round 0 measures the undefended model. Each round r >= 1 fine-tunes the model on the training split
with the UAP made against the model of round r-1 on `fraction` of every batch (true labels kept),
then measures on test: clean accuracy, the FR (TSR when targeted) of that UAP (`defense_fr_prev`) and of
a fresh UAP made against the fine-tuned model (`defense_fr_fresh`), which is the next round's UAP.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import figures, precision, progress, tracking
from pipeline.attack.build import make_uap
from pipeline.classifier import Classifier, make_trainer, save_checkpoint
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

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.freeze_bn:  # every batch: whatever Lightning toggled with .train()
            for m in module.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
        x = batch[0]
        k = int(round(len(x) * self.fraction))
        xk = x[:k] + self.uap.to(x.device)
        x[:k] = xk.clamp(0, 1) if self.clip else xk  # in place: the batch is this step's own tensor


def run_defense(cfg: DictConfig, dm: CXRDataModule, model: Classifier, out: Path, device) -> dict[str, float]:
    d = cfg.defense
    test = dm.dataset("test")
    key = "tsr" if cfg.attack.target is not None else "fr"
    history = []

    def measure(r: int, prev: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        atk, fresh, seconds = make_uap(cfg, dm, model.net, device)
        perts = {"clean": None, "fresh": fresh, **({"prev": prev} if prev is not None else {})}
        p = predict(model.net, test, perts, clip=atk.clip, device=device)
        m = {"defense_acc_clean": accuracy(test.labels, p["clean"]),
             f"defense_{key}_fresh": attack_rate(p["clean"], p["fresh"], atk.target),
             f"defense_{key}_prev": attack_rate(p["clean"], p["prev" if prev is not None else "fresh"], atk.target),
             "defense_uap_seconds": seconds}
        tracking.log_metrics(m, step=r)
        history.append({"round": r, **m})
        log.info("defense round %d: clean acc %.3f, %s of the previous UAP %.3f, of a fresh UAP %.3f", r,
                 m["defense_acc_clean"], key.upper(), m[f"defense_{key}_prev"], m[f"defense_{key}_fresh"])
        return fresh, m

    uap, before = measure(0, None)
    model.optim = OmegaConf.create({"optimizer": OmegaConf.to_container(d.optimizer), "scheduler": None})
    for r in range(1, d.rounds + 1):
        model.net.requires_grad_(True)  # the attacks froze it
        with_uap = UAPTraining(uap, float(d.fraction), bool(cfg.attack.clip), bool(d.get("freeze_bn", True)))
        mode = precision.mode_of(model.net, "train")  # fine-tuning: the training loop's mode
        precision.prepare(model.net, mode)
        # a labelled bar on a terminal, else one log line per epoch: never raw bars in a log file
        def label(t: pl.Trainer, r: int = r) -> str:
            return f"defense round {r}/{d.rounds}, epoch {t.current_epoch + 1}/{t.max_epochs}"

        shown = progress.trainer_progress(bool(cfg.trainer.get("enable_progress_bar", True)), label, label)
        trainer = make_trainer(cfg, max_epochs=int(d.epochs), precision=mode.lightning, logger=False,
                               enable_checkpointing=False, limit_val_batches=0, default_root_dir=str(out),
                               callbacks=[with_uap, *shown.pop("callbacks")], **shown)
        trainer.fit(model, train_dataloaders=dm.train_dataloader())
        model.net.to(device)
        uap, after = measure(r, uap)
    path = out / "defense_classifier.pt"
    save_checkpoint(model, path, {"arch": model.arch, "classes": model.classes, "defense_rounds": int(d.rounds)})
    tracking.log_artifact(path)
    tracking.log_artifact(figures.plot_defense(history, key, out / "defense.png"))
    return {"defense_acc_clean_before": before["defense_acc_clean"],
            f"defense_{key}_fresh_before": before[f"defense_{key}_fresh"],
            "defense_acc_clean_after": after["defense_acc_clean"],
            f"defense_{key}_fresh_after": after[f"defense_{key}_fresh"]}
