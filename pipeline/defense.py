"""Adversarial fine-tuning with UAPs (`python -m pipeline defense=uap_finetune`).

Round 0 measures the undefended model. Each round r >= 1 fine-tunes the model on the training split
with the UAP made against the model of round r-1 on `fraction` of every batch (true labels kept),
then measures on test: clean accuracy, the FR (TSR when targeted) of that UAP (`defense_fr_prev`) and of
a fresh UAP made against the fine-tuned model (`defense_fr_fresh`), which is the next round's UAP.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pipeline import plots, tracking
from pipeline.classifier import Classifier, make_trainer, save_checkpoint
from pipeline.data import CXRDataModule
from pipeline.errors import ConfigError
from pipeline.evaluate import predict
from pipeline.metrics import accuracy, fooling_rate, success_rate

log = logging.getLogger(__name__)


def check(d: DictConfig) -> None:
    if not isinstance(d.rounds, int) or d.rounds < 1:
        raise ConfigError(f"defense.rounds={d.rounds}: expected an integer >= 1")
    if not isinstance(d.epochs, int) or d.epochs < 1:
        raise ConfigError(f"defense.epochs={d.epochs}: expected an integer >= 1")
    if not 0 < float(d.fraction) <= 1:
        raise ConfigError(f"defense.fraction={d.fraction}: expected a number in (0, 1]")


def strength(clean: torch.Tensor, adv: torch.Tensor, target: int | None) -> float:
    """FR (non-targeted) or TSR (targeted) of perturbed predictions."""
    return success_rate(adv, target) if target is not None else fooling_rate(clean, adv)


def run_defense(cfg: DictConfig, dm: CXRDataModule, model: Classifier, out: Path, device) -> dict[str, float]:
    from pipeline.uaps import make_uap
    d = cfg.defense
    check(d)
    test = dm.dataset("test")
    key = "tsr" if cfg.attack.target is not None else "fr"
    history = []

    def measure(r: int, prev: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        atk, fresh, seconds = make_uap(cfg, dm, model.net, device)
        perts = {"clean": None, "fresh": fresh, **({"prev": prev} if prev is not None else {})}
        p = predict(model.net, test, perts, clip=atk.clip, device=device)
        m = {"defense_acc_clean": accuracy(test.labels, p["clean"]),
             f"defense_{key}_fresh": strength(p["clean"], p["fresh"], atk.target),
             f"defense_{key}_prev": strength(p["clean"], p["prev" if prev is not None else "fresh"], atk.target),
             "defense_uap_seconds": seconds}
        tracking.log_metrics(m, step=r)
        history.append({"round": r, **m})
        log.info("defense round %d: clean acc %.3f, %s of the previous UAP %.3f, of a fresh UAP %.3f", r,
                 m["defense_acc_clean"], key.upper(), m[f"defense_{key}_prev"], m[f"defense_{key}_fresh"])
        return fresh, m

    uap, before = measure(0, None)
    model.optim = OmegaConf.create({"optimizer": OmegaConf.to_container(d.optimizer), "scheduler": None})
    model.train_uap_fraction, model.train_uap_clip = float(d.fraction), bool(cfg.attack.clip)
    model.freeze_bn = bool(d.get("freeze_bn", True))
    for r in range(1, d.rounds + 1):
        model.train_uap = uap
        model.net.requires_grad_(True)  # the attacks froze it
        trainer = make_trainer(cfg, max_epochs=int(d.epochs), logger=False, enable_checkpointing=False,
                               limit_val_batches=0, default_root_dir=str(out))
        trainer.fit(model, train_dataloaders=dm.train_dataloader())
        model.train_uap = None
        model.net.to(device)
        uap, after = measure(r, uap)
    path = out / "defense_classifier.pt"
    save_checkpoint(model, path, {"arch": model.arch, "classes": model.classes, "defense_rounds": int(d.rounds)})
    tracking.log_artifact(path)
    tracking.log_artifact(plots.plot_defense(history, key, out / "defense.png"))
    return {"defense_acc_clean_before": before["defense_acc_clean"], f"defense_{key}_fresh_before": before[f"defense_{key}_fresh"],
            "defense_acc_clean_after": after["defense_acc_clean"], f"defense_{key}_fresh_after": after[f"defense_{key}_fresh"]}
