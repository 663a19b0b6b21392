"""The classifier: a LightningModule around a timm model (3 classes, 3 input channels), and its cache.

Trained classifiers are cached under `paths.cache_dir/classifiers/<key>/` (pipeline.cache), keyed by
pipeline.identity.classifier_key: the config parts that define them (data, model, optim, trainer, recipe, seed)
and a fingerprint of the data actually read (the label files and the images' bytes, not where they lie or their
mtimes). A sweep over attack x norm x zeta trains each model once, edited data is never served a classifier
trained on the old, and concurrent jobs wait for the one that trains.
"""
from __future__ import annotations

import copy
import inspect
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pipeline import files, precision, progress
from pipeline.cache import Cache
from pipeline.errors import ConfigError
from pipeline.eval.metrics import accuracy, class_metrics
from pipeline.identity import classifier_identity, classifier_key
from pipeline.nets import build_net

log = logging.getLogger(__name__)

class Classifier(pl.LightningModule):
    """timm network + cross-entropy training; logs accuracy and per-class sensitivity / PPV."""

    def __init__(self, arch: str, classes: Sequence[str], optim: Any = None, pretrained: bool = False,
                 pretrained_path: str | None = None, min_image_size: int = 32, extra: dict | None = None,
                 name: str | None = None):
        super().__init__()
        self.arch, self.classes, self.name = arch, list(classes), name or arch
        self.optim = optim
        self.min_image_size = int(min_image_size)
        self.net = build_net(arch, len(self.classes), pretrained, pretrained_path, extra)
        self._outputs: dict[str, list] = {"val": [], "test": []}
        self.class_weights: torch.Tensor | None = None

    def on_fit_start(self):
        dm = self.trainer.datamodule
        weights = dm.class_weights() if dm is not None and hasattr(dm, "class_weights") else None
        self.class_weights = None if weights is None else weights.to(self.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.net, "memory_format_", None) == torch.channels_last:  # precision.prepare chose it
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = F.cross_entropy(logits, y, weight=self.class_weights)
        self.log("fit/train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log("fit/train_acc", (logits.argmax(1) == y).float().mean(), on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, split, batch):
        x, y = batch[0], batch[1]
        logits = self(x)
        self._outputs[split].append((F.cross_entropy(logits, y, reduction="sum").detach(), logits.argmax(1), y))

    def validation_step(self, batch, batch_idx):
        self._eval_step("val", batch)

    def test_step(self, batch, batch_idx):
        self._eval_step("test", batch)

    def _eval_epoch_end(self, split):
        outs = self._outputs[split]
        if not outs:
            return
        loss = torch.stack([o[0] for o in outs]).sum()
        preds, labels = torch.cat([o[1] for o in outs]).cpu(), torch.cat([o[2] for o in outs]).cpu()
        self._outputs[split] = []
        metrics = {f"{split}_loss": loss.item() / len(labels), f"{split}_acc": accuracy(labels, preds)}
        metrics.update(class_metrics(split, labels, preds, self.classes))
        acc = metrics.pop(f"{split}_acc")  # the training curves: MLflow's "fit" section
        self.log_dict({f"fit/{k}": v for k, v in metrics.items()}, prog_bar=False)
        self.log(f"fit/{split}_acc", acc, prog_bar=True)

    def on_validation_epoch_end(self):
        self._eval_epoch_end("val")

    def on_test_epoch_end(self):
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        optimizer = instantiate(self.optim.optimizer)(self.parameters())
        sched_cfg = self.optim.get("scheduler")
        if not sched_cfg:
            return optimizer
        make = instantiate(sched_cfg)
        params = inspect.signature(make.func).parameters
        kw = {}
        if "total_steps" in params:  # one-cycle style schedules need the length of the run
            kw["total_steps"] = int(self.trainer.estimated_stepping_batches)
        if "T_max" in params and "T_max" not in make.keywords:
            kw["T_max"] = int(self.trainer.max_epochs)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": make(optimizer, **kw), "interval": self.optim.get("interval", "epoch")}}


class BestWeights(pl.Callback):
    """Keeps the weights of the best validation epoch (highest val_acc, then lowest val_loss) in memory.

    Not Lightning's ModelCheckpoint: it monitors one metric (no tie-break on val_loss, and val_acc on ~100
    validation images ties often) and writes a checkpoint file per improvement, which the classifier cache
    would then have to read back and clean up; this keeps one state dict in memory."""

    def __init__(self):
        self.best: tuple[float, float] | None = None
        self.state: dict | None = None
        self.epoch = -1

    def on_validation_end(self, trainer, module):
        # on_validation_end, not on_validation_epoch_end: Lightning runs callbacks' epoch-end hooks before
        # the module's, so there callback_metrics would still hold the previous epoch's val_acc
        m = trainer.callback_metrics
        if trainer.sanity_checking or "fit/val_acc" not in m:
            return
        score = (m["fit/val_acc"].item(), -m["fit/val_loss"].item())
        if self.best is None or score > self.best:
            self.best, self.epoch = score, trainer.current_epoch
            self.state = copy.deepcopy({k: v.detach().cpu() for k, v in module.state_dict().items()})


# --------------------------------------------------------------------------- cache

def save_checkpoint(model: Classifier, path: Path, meta: dict) -> None:
    """Atomic write (temp file + rename): a half-written checkpoint is never seen under its final name, and a
    full disk is a one-line error (pipeline.files)."""
    files.atomic_write(path, lambda tmp: torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp))


def load_checkpoint(model: Classifier, path: Path) -> dict:
    """Load weights saved by `save_checkpoint` (weights only, no pickle); raises ValueError if they do not fit."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta = blob["meta"]
        if meta.get("arch") != model.arch or list(meta.get("classes", [])) != model.classes:
            raise ValueError(f"checkpoint is for {meta.get('arch')} / {meta.get('classes')}, "
                             f"not {model.arch} / {model.classes}")
        model.load_state_dict(blob["state_dict"])
    except Exception as e:  # noqa: BLE001 - corrupt file, wrong keys or shapes: all mean "do not use"
        raise ValueError(f"{path}: unusable checkpoint ({type(e).__name__}: {str(e)[:300]})") from None
    return meta


def epoch_label(trainer: pl.Trainer) -> str:
    return f"classifier epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"


def epoch_line(trainer: pl.Trainer) -> str:
    """`classifier epoch 3/20: train loss 0.412, val acc 0.633, val loss 0.871` (what this epoch logged)."""
    m = trainer.callback_metrics
    parts = [f"{name} {m[key].item():.3f}" for key, name in (("fit/train_loss_epoch", "train loss"),
                                                            ("fit/val_acc", "val acc"), ("fit/val_loss", "val loss"))
             if key in m]
    return f"{epoch_label(trainer)}: {', '.join(parts)}"


def make_trainer(cfg: DictConfig, **overrides) -> pl.Trainer:
    """The configured trainer (conf/trainer), with these arguments set or replaced (callbacks, logger...)."""
    return instantiate(cfg.trainer, **overrides)


def new_classifier(cfg: DictConfig, classes: Sequence[str]) -> Classifier:
    """The configured classifier, its network carrying the modes of this config's precision (precision.attach)."""
    model = instantiate(cfg.model, classes=list(classes), optim=cfg.optim, _recursive_=False)
    precision.attach(model.net, precision.resolve(cfg), cfg.get("precision_recheck", 0.0))
    return model


def load_classifier_file(cfg: DictConfig, dm) -> tuple[Classifier, dict]:
    """`classifier_file`: a classifier saved by the pipeline (a cache entry's classifier.pt, a defense's
    defense_classifier.pt), used as it is on this config's data: no training, no cache. Its architecture and
    classes must be the config's, and its image size (when recorded) data.image_size."""
    path = Path(str(cfg.classifier_file)).expanduser()
    model = new_classifier(cfg, dm.classes)
    try:
        meta = load_checkpoint(model, path)
    except ValueError as e:
        raise ConfigError(f"classifier_file={cfg.classifier_file}: {e}") from None
    size = meta.get("image_size")
    if size is not None and int(size) != dm.image_size:
        raise ConfigError(f"classifier_file={cfg.classifier_file}: trained at {size} px, but data.image_size="
                          f"{dm.image_size}: set data.image_size={size}")
    log.info("classifier %s loaded from classifier_file %s (trained %s): not retraining", model.name, path,
             meta.get("trained_at"))
    return model, {**meta, "cache_hit": True, "source": "file", "path": str(path)}


def train_or_load(cfg: DictConfig, dm, callbacks: Sequence[pl.Callback] = ()) -> tuple[Classifier, dict]:
    """The classifier for this config: `classifier_file` when set; else from the cache when present and valid,
    else trained (with these extra callbacks, e.g. the job's training curves) and cached."""
    if cfg.get("classifier_file"):
        return load_classifier_file(cfg, dm)
    key = classifier_key(cfg, dm)
    with Cache(cfg.paths.cache_dir, "classifiers").claim(key) as entry:
        ckpt = entry / "classifier.pt"
        if ckpt.exists():
            try:
                model = new_classifier(cfg, dm.classes)
                meta = load_checkpoint(model, ckpt)
                log.info("classifier %s loaded from cache %s (trained %s, best epoch %s): not retraining",
                         model.arch, ckpt, meta.get("trained_at"), meta.get("best_epoch"))
                return model, {**meta, "cache_hit": True, "key": key, "path": str(ckpt)}
            except ValueError as e:
                log.warning("%s; rebuilding the cache entry", e)
                ckpt.unlink(missing_ok=True)
        log.info("training %s (%s) on %s for %d epochs in %s (cache key %s)", cfg.model.get("name"),
                 cfg.model.arch, type(dm).__name__, cfg.trainer.max_epochs,
                 precision.resolve(cfg)["train"], key)
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        model = new_classifier(cfg, dm.classes)  # re-created after seeding: same init for the same seed
        best = BestWeights()
        shown = progress.trainer_progress(bool(cfg.trainer.get("enable_progress_bar", True)), epoch_label,
                                          epoch_line)
        # no validation split (data.val_fraction=0): no validation loop, the last epoch's weights are kept
        no_val = {"limit_val_batches": 0} if len(dm.dataset("val")) == 0 else {}
        mode = precision.mode_of(model.net, "train")
        precision.prepare(model.net, mode)
        trainer = make_trainer(cfg, precision=mode.lightning, callbacks=[best, *shown.pop("callbacks"), *callbacks],
                               **shown, **no_val, logger=False, enable_checkpointing=False,
                               default_root_dir=str(entry))
        t0 = time.time()
        trainer.fit(model, datamodule=dm)
        if best.state is not None:
            model.load_state_dict(best.state)
        meta = {"arch": model.arch, "classes": model.classes, "key": key, "best_epoch": best.epoch,
                "val_acc": best.best[0] if best.best else None, "train_seconds": round(time.time() - t0, 1),
                "trained_at": time.strftime("%Y-%m-%d %H:%M:%S"), "image_size": dm.image_size, "precision": str(mode)}
        save_checkpoint(model, ckpt, meta)
        files.write_json(entry / "config.json", classifier_identity(cfg, dm), indent=2, default=str)
        kept = (f"best val_acc {meta['val_acc']:.3f} at epoch {best.epoch + 1}" if best.best
                else f"last epoch {trainer.current_epoch}, no validation split")
        log.info("classifier trained in %.0f s (%s), cached at %s", meta["train_seconds"], kept, ckpt)
        return model, {**meta, "cache_hit": False, "path": str(ckpt)}


def data_for(c: DictConfig, cfg: DictConfig, dm):
    """The data module of config `c` (a surrogate's): `dm` itself when c's data resolves as cfg's, else a new one
    (another seed splits the training images otherwise), so that a classifier's cache key matches its data."""
    if OmegaConf.to_container(c.data, resolve=True) == OmegaConf.to_container(cfg.data, resolve=True):
        return dm
    other = instantiate(c.data)
    other.setup()
    return other
