"""Numeric precision and memory format of the heavy loops (the top-level `precision` key).

    precision=32     fp32, the default memory format: the reference
    precision=bf16   bf16 autocast (Lightning's bf16-mixed for training) with channels_last, in every loop
    precision=auto   per model and per loop (train, attack, eval) the fastest of fp32 / fp32 channels_last /
                     bf16 / bf16 channels_last, measured on this device at the loop's batch and image size;
                     bf16 only where the device has bf16 matrix units (a CPU with AMX-BF16 or AVX512-BF16, a
                     CUDA device with bf16), and only where it beats fp32 by `MARGIN`

A loop's choice (a `Mode`) is measured once per device, threads, torch version, model, size and batch, and kept
in `paths.cache_dir/precision.json`, so that every run of a sweep (and the classifier cache key) sees the same one.
The modes of a classifier travel with its network (`attach`, `mode_of`): the attack and the evaluation read them.

Evaluation stays fp32 in outcome: a bf16 forward gives the predicted class, and every image whose top-two logits
are closer than `recheck` x its largest logit is predicted again in fp32 (`predicted`), so a reported rate does
not depend on the precision that searched the UAP.
"""
from __future__ import annotations

import copy
import json
import logging
import platform
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from filelock import FileLock

from pipeline import files
from pipeline.errors import ConfigError
from pipeline.nets import build_net

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "32", "bf16")
LOOPS = ("train", "attack", "eval")
# inputs per forward pass in evaluation: CPU convolutions run fastest on small batches (measured on a 2-core
# machine at 128 px, batches of 32 vs 128: mobilenetv3_large_100 1.8x, test_resnet 1.6x, resnet18 1.2x the
# images per second), GPUs on large ones
EVAL_BATCH = {"cpu": 32, "cuda": 256}


def eval_batch(device: torch.device | str) -> int:
    return EVAL_BATCH.get(torch.device(device).type, 128)
# auto leaves fp32 only for a mode at least this much faster: timing noise never picks a slower one
MARGIN = 1.10
WARMUP, ROUNDS = 2, 3  # measurement: calls per mode before timing (oneDNN builds its kernels), timed rounds


@dataclass(frozen=True)
class Mode:
    bf16: bool = False
    channels_last: bool = False

    def __str__(self) -> str:
        return ("bf16" if self.bf16 else "fp32") + ("+cl" if self.channels_last else "")

    @property
    def lightning(self) -> str:
        """Lightning's Trainer(precision=...)."""
        return "bf16-mixed" if self.bf16 else "32-true"

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self, device: torch.device | str):
        dev = torch.device(device).type
        return torch.autocast(dev, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


FP32 = Mode()
MODES = (FP32, Mode(False, True), Mode(True, False), Mode(True, True))


def parse(value) -> str:
    """The `precision` key as one of PRECISIONS (32 may come as an integer from the command line)."""
    v = str(value)
    if v not in PRECISIONS:
        raise ConfigError(f"precision={value!r}: expected one of {list(PRECISIONS)} (auto: the fastest measured)")
    return v


def bf16_units(device: torch.device | str) -> bool:
    """Whether the device has bf16 matrix units: AMX-BF16 or AVX512-BF16 on a CPU, bf16 on a CUDA device."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    return False


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what the platform says."""
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        model = ""
    return model or platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


# -- the network side: which modes a classifier's loops use, and a forward in one of them

def attach(net: nn.Module, modes: dict[str, Mode], recheck: float) -> nn.Module:
    """Let the loops that get this network (attack, evaluation, fine-tuning) find their modes on it, and the
    evaluation its fp32 recheck margin (`predicted`)."""
    net.precision_modes, net.precision_recheck = dict(modes), float(recheck)
    return net


def mode_of(net: nn.Module, loop: str) -> Mode:
    return getattr(net, "precision_modes", {}).get(loop, FP32)


def recheck_of(net: nn.Module) -> float:
    return getattr(net, "precision_recheck", 0.0)


def modes_of(net: nn.Module) -> dict[str, Mode]:
    return {loop: mode_of(net, loop) for loop in LOOPS}


def prepare(net: nn.Module, mode: Mode) -> nn.Module:
    """The network in the mode's memory format (converted only when it is not already)."""
    if getattr(net, "memory_format_", torch.contiguous_format) != mode.memory_format:
        net.to(memory_format=mode.memory_format)
        net.memory_format_ = mode.memory_format
    return net


def logits(net: nn.Module, x: torch.Tensor, mode: Mode) -> torch.Tensor:
    """net(x) in the mode (autocast, memory format), as fp32 logits."""
    prepare(net, mode)
    with mode.autocast(x.device):
        return net(mode.inputs(x)).float()


@torch.no_grad()
def predicted(net: nn.Module, x: torch.Tensor, mode: Mode, recheck: float) -> torch.Tensor:
    """Predicted classes of x; in bf16 the close calls (top-two logits within `recheck` x the largest |logit|)
    are predicted again in fp32, so the outcome is fp32's."""
    out = logits(net, x, mode)
    pred = out.argmax(1)
    if mode.bf16 and out.shape[1] > 1:
        top = out.topk(2, dim=1).values
        close = (top[:, 0] - top[:, 1]) <= recheck * out.abs().amax(1).clamp_min(1.0)
        if close.any():
            pred[close] = logits(net, x[close], Mode(False, mode.channels_last)).argmax(1)
    return pred


# -- auto: the fastest mode of a loop, measured

def _run(net: nn.Module, x: torch.Tensor, mode: Mode, loop: str) -> None:
    if loop == "eval":
        with torch.no_grad():
            logits(net, x, mode).argmax(1)
    elif loop == "attack":  # the attack's inner step: forward and backward to the input
        xv = mode.inputs(x).clone().requires_grad_(True)
        torch.autograd.grad(logits(net, xv, mode).logsumexp(1).sum(), xv)
    else:  # a training step's forward and backward to the weights
        out = logits(net, x, mode)
        F.cross_entropy(out, torch.zeros(len(x), dtype=torch.long, device=x.device)).backward()
        net.zero_grad(set_to_none=True)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def measure(net: nn.Module, loop: str, batch: int, image_size: int, device: torch.device | str,
            modes=MODES) -> dict[Mode, float]:
    """Seconds per call of each mode on a copy of `net` (warm-up first, then interleaved rounds, the median)."""
    dev = torch.device(device)
    nets = {}
    for m in modes:
        n = copy.deepcopy(net).to(dev)
        n.memory_format_ = torch.contiguous_format
        n.train(loop == "train")
        n.requires_grad_(loop == "train")
        nets[m] = prepare(n, m)
    x = torch.rand(batch, 3, image_size, image_size, device=dev)
    for m, n in nets.items():
        for _ in range(WARMUP):
            _run(n, x, m, loop)
    times: dict[Mode, list[float]] = {m: [] for m in nets}
    for _ in range(ROUNDS):
        for m, n in nets.items():
            t0 = time.perf_counter()
            _run(n, x, m, loop)
            times[m].append(time.perf_counter() - t0)
    return {m: sorted(t)[len(t) // 2] for m, t in times.items()}


def fastest(seconds: dict[Mode, float]) -> Mode:
    """fp32 unless another mode is at least MARGIN times faster; then the fastest."""
    best = min(seconds, key=seconds.get)
    return best if seconds[FP32] >= MARGIN * seconds[best] else FP32


_MEMO: dict[str, Mode] = {}


def choose(precision: str, arch: str, make_net, loop: str, batch: int, image_size: int,
           device: torch.device | str, table: Path | None) -> Mode:
    """The mode of one loop under `precision` (`make_net()` builds the network, only when auto must measure)."""
    precision = parse(precision)
    if precision == "32":
        return FP32
    if precision == "bf16":
        return Mode(True, True)
    if not bf16_units(device):
        return FP32
    key = f"{device_name(device)} | torch {torch.__version__} | {arch} | {loop} | batch {batch} | {image_size} px"
    if key in _MEMO:
        return _MEMO[key]
    if table is not None:
        try:
            table.parent.mkdir(parents=True, exist_ok=True)
        except OSError:  # an unwritable cache: measure for this process only (the run then fails on the cache)
            table = None
    lock = nullcontext() if table is None else FileLock(str(table) + ".lock")
    with lock:
        known = {}
        if table is not None and table.is_file():
            try:
                known = json.loads(table.read_text())
            except (OSError, ValueError):
                known = {}
        if key in known:
            mode = Mode(bool(known[key]["bf16"]), bool(known[key]["channels_last"]))
        else:
            t0 = time.perf_counter()
            seconds = measure(make_net(), loop, batch, image_size, device)
            mode = fastest(seconds)
            log.info("precision=auto: %s %s at batch %d, %d px: %s (measured in %.1f s: %s)", arch, loop, batch,
                     image_size, mode, time.perf_counter() - t0,
                     ", ".join(f"{m} {seconds[FP32] / s:.2f}x" for m, s in seconds.items()))
            if table is not None:
                known[key] = {"bf16": mode.bf16, "channels_last": mode.channels_last,
                              "speedup": round(seconds[FP32] / seconds[mode], 3)}
                files.write_json(table, known, indent=1, sort_keys=True)
    _MEMO[key] = mode
    return mode


def device_for(cfg) -> torch.device:
    """The device the config's trainer names (trainer=gpu: CUDA, which must be there)."""
    acc = str(cfg.trainer.get("accelerator", "cpu"))
    if acc in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    if acc in ("gpu", "cuda"):
        raise ConfigError("trainer=gpu but no CUDA device is available: use trainer=cpu")
    return torch.device("cpu")


def loop_batches(cfg) -> dict[str, int]:
    """The batch each loop runs at: data.batch_size (training), attack.batch_size (1 with per_image; the
    evaluation's when it is null, the whole input set), the
    evaluation's (eval_batch) split over the three stacked inputs of an evaluation."""
    a = cfg.attack
    return {"train": int(cfg.data.batch_size),
            "attack": 1 if a.get("per_image") else int(a.get("batch_size") or eval_batch(device_for(cfg))),
            "eval": eval_batch(device_for(cfg))}


def resolve(cfg) -> dict[str, Mode]:
    """The mode of each loop for this config's model, data and device."""
    device = device_for(cfg)
    m = cfg.model
    table = Path(cfg.paths.cache_dir) / "precision.json" if cfg.get("paths") else None
    # the head's width does not decide the mode (the table is not keyed by it): data=folder may leave
    # data.classes null, its classes found in its folders
    n_classes = len(cfg.data.classes) if cfg.data.get("classes") is not None else 2

    def make_net():
        return build_net(m.arch, n_classes, extra=dict(m.get("extra") or {}))
    return {loop: choose(cfg.get("precision", "auto"), m.arch, make_net, loop, batch, int(cfg.data.image_size),
                         device, table)
            for loop, batch in loop_batches(cfg).items()}


def describe(modes: dict[str, Mode]) -> str:
    """`train fp32+cl, attack bf16+cl, eval bf16+cl`."""
    return ", ".join(f"{loop} {modes[loop]}" for loop in LOOPS)

