"""The precision table (images/s per model, loop and precision mode, as ratios to fp32), the side-by-side speedup
of precision=auto on resnet18, and `--precision-check` (a bf16-searched UAP judged in fp32)."""
from __future__ import annotations

import argparse
import logging
import time

import torch

from pipeline import precision
from pipeline.attack import new_attack
from pipeline.attack.build import make_uap
from pipeline.bench.setup import attack_config, load_setup, setup_overrides, sync
from pipeline.eval.metrics import fooling_rate, wilson
from pipeline.eval.predictions import predict
from pipeline.nets import build_net
from pipeline.tasks.transfer import model_config

log = logging.getLogger("pipeline.bench")


PRECISION_MODELS = [("tiny", 128, 32), ("tiny_effnet", 128, 32), ("mobilenetv3_large_100", 128, 32),
                    ("resnet18", 128, 32), ("resnet50", 224, 8), ("densenet121", 224, 8)]
LOOP_NAMES = {"eval": "forward", "attack": "fwd+bwd to input", "train": "fwd+bwd to weights"}


def precision_table(args, device) -> str:
    """Per model and loop: images/s in fp32 and each mode's ratio to it (one interleaved measurement after
    warm-up, pipeline.precision.measure), and the mode precision=auto picks, measured on its own."""
    models = [("tiny", 64, 8)] if args.quick else PRECISION_MODELS
    modes = precision.MODES[1:]  # each as a ratio to fp32
    head = ["model", "px", "batch", "loop", "fp32 img/s", *[f"{m} / fp32" for m in modes], "auto picks",
            "auto / fp32"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, size, batch in models:
        arch = model_config(name).arch
        net = build_net(arch, 3)
        for loop in precision.LOOPS:
            secs = precision.measure(net, loop, batch, size, device)
            auto = precision.choose("auto", arch, lambda n=net: n, loop, batch, size, device, table=None)
            fp32 = secs[precision.FP32]
            lines.append(f"| {name} | {size} | {batch} | {LOOP_NAMES[loop]} | {batch / fp32:.0f} | "
                         + " | ".join(f"{fp32 / secs[m]:.2f}" for m in modes)
                         + f" | {auto} | {fp32 / secs[auto]:.2f} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def precision_speedup(args, device) -> tuple[float, float, str]:
    """resnet18 at 128 px (trained once and cached, as the pipeline trains it under --precision), on the bench's
    input set: seconds per UAP search pass (sgd_uap, 3 passes; the steady pass time, the first pass's set-up
    left out) and per evaluation (clean + UAP + random) with fp32 modes and with precision=auto's, side by side
    (interleaved, after a warm-up round). Returns (pass ratio, evaluation ratio, auto's modes)."""
    a = argparse.Namespace(**{**vars(args), "model": "resnet18"})
    cfg, dm, net = load_setup(a)
    net = net.to(device)
    auto = precision.resolve(cfg)
    train = dm.dataset("train")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[:args.n_images].sort().values
    inputs = train.subset(idx)
    x, y = inputs.tensors()
    attack = attack_config(args, ["attack=sgd_uap", "attack.max_iter=3"])
    size = x.shape[-1]
    v = torch.full((1, size, size), 0.01)
    times: dict[str, dict[str, list[float]]] = {"fp32": {"pass": [], "eval": []}, "auto": {"pass": [], "eval": []}}
    for r in range(3):  # round 0: warm-up, not counted
        for label, modes in (("fp32", {loop: precision.FP32 for loop in precision.LOOPS}), ("auto", auto)):
            precision.attach(net, modes, cfg.precision_recheck)
            atk = new_attack(attack, net, size, dm.classes, eps=0.01)
            atk.make(x, y, trainer_kwargs={"accelerator": "gpu" if device.type == "cuda" else "cpu",
                                           "enable_progress_bar": False}, seed=args.seed)
            net.to(device)
            ends = [h["seconds"] for h in atk.history]
            t0 = time.perf_counter()
            predict(net, inputs, {"clean": None, "uap": v, "random": -v}, device=device)
            sync(device)
            if r:
                times[label]["pass"].append((ends[-1] - ends[0]) / (len(ends) - 1))
                times[label]["eval"].append(time.perf_counter() - t0)
    ratio = {k: min(times["fp32"][k]) / min(times["auto"][k]) for k in ("pass", "eval")}
    return ratio["pass"], ratio["eval"], precision.describe(auto)


def precision_check(args) -> str:
    """Do the numbers move with the precision? Against the same fp32-trained classifier (precision=32, the
    cache's), strong_uap without warm starts at --zeta, --norm, non-targeted, searched in fp32 and in bf16 with
    channels_last (what precision=bf16 runs); each UAP evaluated in fp32 (the test FR with its 95 % interval),
    and the share of predictions (clean and with the UAP, train and test images) that a bf16 evaluation, raw or
    with the fp32 recheck of close calls, gives differently from fp32."""
    device = torch.device(args.device)
    bf16 = precision.Mode(True, True)
    lines = ["| model | clean test acc (fp32) | UAP searched in | search s | test FR, fp32 evaluation | 95 % interval "
             "| within the fp32 search's interval | bf16 evaluation differs from fp32 (raw) | (with recheck) |",
             "|" + "---|" * 9]
    for model in args.check_models.split(","):
        a = argparse.Namespace(**{**vars(args), "model": model, "precision": "32"})
        overrides = [*setup_overrides(a), "attack=strong_uap", "attack.warm_start=null", f"zeta={args.zeta}",
                     f"norm={args.norm}"]
        cfg, dm, net = load_setup(a, overrides)
        net = net.to(device)
        splits = [dm.dataset("train"), dm.dataset("test")]
        fp32_interval = None
        for search in (precision.FP32, bf16):
            precision.attach(net, {"train": precision.FP32, "attack": search, "eval": search},
                             cfg.precision_recheck)
            _, uap, seconds = make_uap(cfg, dm, net, device)
            evals = {}
            for label, mode, recheck in (("fp32", precision.FP32, 0.0), ("raw", bf16, 0.0),
                                         ("recheck", bf16, cfg.precision_recheck)):
                precision.attach(net, {"eval": mode}, recheck)
                evals[label] = [predict(net, ds, {"clean": None, "uap": uap}, device=device) for ds in splits]
            test = evals["fp32"][1]
            fr = fooling_rate(test["clean"], test["uap"])
            lo, hi = wilson(fr, len(splits[1]))
            acc = (test["clean"] == splits[1].labels).float().mean().item()
            if search == precision.FP32:
                fp32_interval = (lo, hi)
            within = "(reference)" if search == precision.FP32 else (
                "yes" if fp32_interval[0] <= fr <= fp32_interval[1] else "**no**")
            differ = [differing(evals[label], evals["fp32"]) for label in ("raw", "recheck")]
            lines.append(f"| {model} | {acc:.3f} | {search} | {seconds:.0f} | {fr:.3f} | [{lo:.3f}, {hi:.3f}] | "
                         f"{within} | {differ[0]} | {differ[1]} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def differing(preds: list[dict], reference: list[dict]) -> str:
    """`k / n (share %)`: predictions of `preds` that differ from `reference` (same splits, same keys)."""
    k = sum(int((p[key] != r[key]).sum()) for p, r in zip(preds, reference) for key in p)
    n = sum(len(r[key]) for r in reference for key in r)
    return f"{k} / {n} ({100 * k / n:.2f} %)"
