"""What every benchmark shares: the frozen classifier and data through the pipeline's own config and cache, timing
helpers (the floor of one batched pass, peak memory, device sync), and the machine's description."""
from __future__ import annotations

import logging
import os
import platform
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning
import timm
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import open_dict

from pipeline import precision
from pipeline.classifier import train_or_load
from pipeline.config import compose
from pipeline.eval.metrics import attack_rate
from pipeline.eval.predictions import predict
from pipeline.precision import eval_batch

log = logging.getLogger("pipeline.bench")


ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Row:
    name: str
    seconds: float
    passes: int
    fr_input: float
    fr_test: float
    norm_ratio: float
    rss_mb: float
    history: list = field(default_factory=list)  # (seconds, exact input-set FR) after each pass
    reach: float | None = None  # seconds until the input-set FR first reached ART's final one


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.peak, self._stop = self._rss(), threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def _rss(self) -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())


def setup_overrides(args) -> list[str]:
    """The config overrides of the bench's data and model."""
    cxr3 = cxr3_root()
    real = args.data == "cxr3" or (args.data == "auto" and (cxr3 / "train.txt").is_file())
    overrides = [f"model={args.model}", f"seed={args.seed}", f"precision={args.precision}",
                 "trainer.enable_progress_bar=false"]
    # cxr3's configured root when it resolves from here, so that the classifier cache entry of
    # `python -m pipeline data=cxr3 model=...` run from the project root is the one used
    here = Path(str(compose_config(["data=cxr3"]).data.root)).resolve() == cxr3
    overrides += (["data=cxr3", "data.image_size=128"] + ([] if here else [f"data.root={cxr3}"]) if real
                  else ["data=phantom", "data.image_size=128"])
    if args.device == "cuda":
        overrides.append("trainer=gpu")
    return overrides


def cxr3_root() -> Path:
    """The configured cxr3 folder (conf/data/cxr3.yaml's root), relative to the project root."""
    return (ROOT / str(compose_config(["data=cxr3"]).data.root)).resolve()


def compose_config(overrides: list[str]):
    """The pipeline's own config (pipeline.config.compose), its paths under the project root."""

    cfg = compose(overrides)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
    return cfg


def load_setup(args, overrides: list[str] | None = None):
    """The cached classifier and data, through the pipeline's own config and cache."""

    cfg = compose_config(overrides or setup_overrides(args))
    dm = instantiate(cfg.data)
    dm.setup()
    model, _ = train_or_load(cfg, dm)
    return cfg, dm, model.net.eval()


def floor_seconds(net, x, batch_size, device) -> float:
    """One batched forward+backward pass (gradient w.r.t. the input) over x, in the network's attack mode
    (pipeline.precision); the best of two."""
    mode = precision.mode_of(net, "attack")
    best = float("inf")
    for _ in range(2):
        sync(device)
        t0 = time.perf_counter()
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(device).requires_grad_(True)
            out = precision.logits(net, xb, mode)
            g, = torch.autograd.grad(F.cross_entropy(out, out.argmax(1)), xb)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def fr_of(net, ds, v, clean, target, device) -> float:
    p = predict(net, ds, {"v": v}, device=device)["v"]
    return attack_rate(clean, p, target)


def eval_throughput(net, ds, eps, device) -> float:
    """Evaluation (clean + UAP + random in one pass) vs the raw forward over the same 3 x N images."""
    v = torch.full((1, ds.images.shape[-2], ds.images.shape[-1]), eps)
    x = ds.tensors()[0]
    best_raw = best_eval = float("inf")
    batch = max(1, eval_batch(device) // 3)  # the raw forwards batched as predict() batches them
    for _ in range(2):
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(x), batch):
                xb = x[i:i + batch].to(device)
                net(torch.cat([xb, xb, xb]))
        sync(device)
        best_raw = min(best_raw, time.perf_counter() - t0)
        t0 = time.perf_counter()
        predict(net, ds, {"clean": None, "uap": v, "random": -v}, device=device)
        sync(device)
        best_eval = min(best_eval, time.perf_counter() - t0)
    return best_raw / best_eval


def versions() -> str:
    import art  # the bench extra (pip install -e '.[bench]'), as in pipeline.bench.art
    return (f"python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
            f"lightning {pytorch_lightning.__version__}, adversarial-robustness-toolbox {art.__version__}")


def machine(device) -> str:
    desc = f"{precision.cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    if str(device).startswith("cuda"):
        desc += f", GPU {torch.cuda.get_device_name(0)}"
    return desc


def attack_config(args, overrides: list[str]):
    """The attack config of a row: conf/attack composed with the row's overrides and the bench's settings."""
    common = [f"zeta={args.zeta}", f"attack.max_iter={args.max_iter}", f"attack.delta={args.delta}",
              f"attack.batch_size={args.batch_size}", f"attack.step={args.step}"]
    return compose_config([*common, *overrides]).attack
