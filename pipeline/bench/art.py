"""The comparison with ART (the authors' tool): ART's UniversalPerturbation / TargetedUniversalPerturbation with the
FGSM attacker beside our attacks, on the same classifier, input set, eps, step, delta and passes; the time each of
our rows first reached ART's fooling rate."""
from __future__ import annotations

import logging
import random
import time

import numpy as np
import torch

from pipeline import precision
from pipeline.attack import new_attack, zeta_to_eps
from pipeline.bench.setup import (
    PeakRSS,
    Row,
    attack_config,
    eval_throughput,
    floor_seconds,
    fr_of,
    load_setup,
)
from pipeline.bench.trace import RateTrace
from pipeline.eval.predictions import predict
from pipeline.markdown import md_table

log = logging.getLogger("pipeline.bench")


# our rows: attack configs (conf/attack) and overrides, each run with the bench's zeta, step, delta, passes, batch
# (the row's overrides come last: strong_uap keeps its own passes per start and delta)
ROWS = [("fgsm_uap faithful", ["attack=fgsm_uap_faithful"]),
        ("fgsm_uap batched", ["attack=fgsm_uap"]),
        ("fgsm_uap batched, 2 candidates per batch", ["attack=fgsm_uap", "attack.step_rule.scales=[8.0,1.0]",
                                                    "attack.step_rule.adaptive=false"]),
        ("sgd_uap", ["attack=sgd_uap"]),
        ("strong_uap", ["attack=strong_uap", "attack.max_iter=3", "attack.delta=0.0"])]


def run_art(net, x, eps, args, target, n_classes, device) -> tuple[Row, torch.Tensor]:
    # ART: the bench extra (pip install -e '.[bench]'), needed by this comparison only
    from art.attacks.evasion import TargetedUniversalPerturbation, UniversalPerturbation
    from art.estimators.classification import PyTorchClassifier

    precision.prepare(net, precision.FP32)  # ART as its users run it: fp32, the default memory format
    clf = PyTorchClassifier(model=net, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                            nb_classes=n_classes, device_type="gpu" if device.type == "cuda" else "cpu")
    xn = x.numpy()
    n = len(xn)
    clean = np.argmax(clf.predict(xn, batch_size=128), 1)
    # the per-pass fooling rate: ART predicts the whole set once per pass; record it there
    history, t0 = [], [0.0]
    orig_predict = clf.predict

    def predict(xs, batch_size=128, **kw):
        out = orig_predict(xs, batch_size=batch_size, **kw)
        if len(xs) == n and t0[0]:
            y = np.argmax(out, 1)
            fr = float(np.mean(y == target)) if target is not None else float(np.mean(y != clean))
            history.append((time.perf_counter() - t0[0], fr))
        return out
    clf.predict = predict
    params = {"eps": args.step, "norm": np.inf}
    random.seed(args.seed)
    np.random.seed(args.seed)
    if target is None:
        atk = UniversalPerturbation(clf, attacker="fgsm", attacker_params=params, delta=args.delta,
                                    max_iter=args.max_iter, eps=eps, norm=np.inf, batch_size=args.batch_size,
                                    verbose=False)
        y = np.eye(n_classes, dtype=np.float32)[clean]  # the clean predictions, as ART computes them for y=None
    else:
        atk = TargetedUniversalPerturbation(clf, attacker="fgsm", attacker_params={**params, "targeted": True},
                                            delta=args.delta, max_iter=args.max_iter, eps=eps, norm=np.inf)
        y = np.eye(n_classes, dtype=np.float32)[np.full(n, target)]
    with PeakRSS() as mem:
        t0[0] = time.perf_counter()
        atk.generate(xn, y=y)
        seconds = time.perf_counter() - t0[0]
    if target is not None and history:
        history.pop(0)  # TargetedUniversalPerturbation predicts the whole set once before its first pass
    noise = torch.from_numpy(np.asarray(atk.noise))[0]  # (3, H, W): ART's UAP is not averaged over channels
    row = Row("ART " + type(atk).__name__, seconds, len(history), history[-1][1] if history else float("nan"),
              float("nan"), noise.abs().max().item() / eps, mem.peak, history)
    return row, noise


def run_ours(name, overrides, net, x, y, eps, args, target, classes, device) -> tuple[Row, torch.Tensor]:
    """One row: the attack composed from conf/attack (+ overrides), made on x with the bench's eps and seed."""
    atk = new_attack(attack_config(args, overrides), net, x.shape[-1], classes, eps=eps,
                     target=None if target is None else classes[target])
    trace = RateTrace(args.record_every)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        v = atk.make(x, y, trainer_kwargs={"accelerator": "gpu" if device.type == "cuda" else "cpu",
                                           "enable_progress_bar": False}, seed=args.seed, callbacks=[trace])
        seconds = time.perf_counter() - t0
    net.to(device)  # Lightning's teardown moves the fitted module back to the CPU
    seconds -= atk.clock.off  # the trace's measurements are not the method's time
    fr_input = atk.to(device).exact_rate(v)  # of the UAP returned (with keep: best, not always the last iterate)
    return Row(name, seconds, atk.passes, fr_input, float("nan"), v.abs().max().item() / eps, mem.peak,
               trace.points), v


def bench(args) -> tuple[list[Row], dict]:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    cfg, dm, net = load_setup(args)
    net = net.to(device)
    train, test = dm.dataset("train"), dm.dataset("test")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[:args.n_images].sort().values
    x, y = train.subset(idx).tensors()
    eps = zeta_to_eps(x[:, :1], args.zeta, "linf")
    clean_test = predict(net, test, {"c": None}, device=device)["c"]
    floor = floor_seconds(net, x, args.batch_size, device)
    info = {"data": cfg.data._target_.rsplit(".", 1)[-1] + (" (cxr3)" if "Covidx" in cfg.data._target_ else ""),
            "model": cfg.model.arch, "image_size": dm.image_size, "n_images": len(x), "eps": eps, "floor": floor,
            "device": str(device), "clean_test_acc": (clean_test == test.labels).float().mean().item(),
            "modes": precision.describe(precision.modes_of(net))}
    tables = {}
    for target_name in [None] + ([] if args.non_targeted_only else [args.target]):
        target = None if target_name is None else dm.classes.index(target_name)
        art, art_v = run_art(net, x, eps, args, target, dm.num_classes, device)
        rows, vs = [art], {art.name: art_v}
        for name, overrides in ROWS:
            row, vs[name] = run_ours(name, overrides, net, x, y, eps, args, target, dm.classes, device)
            rows.append(row)
        for r in rows:
            r.fr_test = fr_of(net, test, vs[r.name], clean_test, target, device)
            if r is not art:
                r.reach = next((t for t, fr in r.history if fr is not None and fr >= art.fr_input), None)
        tables["non-targeted" if target_name is None else f"targeted ({target_name})"] = rows
    info["eval_ratio"] = eval_throughput(net, test, eps, device)
    return tables, info


def fmt_table(rows: list[Row], floor: float, n: int) -> str:
    head = ["method", "seconds", "passes", "images/s", "s per pass / floor", "FR input", "FR test",
            "UAP norm / eps", "peak RSS (MB)", "reached ART's input FR at (s)"]
    cells = []
    for r in rows:
        per_pass = r.seconds / max(r.passes, 1)
        reach = "(ART itself)" if r.name.startswith("ART") else ("never" if r.reach is None else f"{r.reach:.1f}")
        cells.append([r.name, f"{r.seconds:.1f}", str(r.passes), f"{n * max(r.passes, 1) / r.seconds:.0f}",
                      f"{per_pass / floor:.2f}", f"{r.fr_input:.3f}", f"{r.fr_test:.3f}", f"{r.norm_ratio:.4f}",
                      f"{r.rss_mb:.0f}", reach])
    cells.append(["floor (1 batched fwd+bwd pass) x passes", f"{floor:.2f} per pass", "", f"{n / floor:.0f}", "1.00",
                  "", "", "", "", ""])
    return md_table(head, cells).rstrip("\n")


def speedup_line(rows: list[Row]) -> str:
    art = rows[0]
    reached = [r for r in rows[1:] if r.reach is not None]
    if not reached:
        best = max(rows[1:], key=lambda r: r.fr_input)
        return (f"bench: speedup_to_art_fr=none method={best.name.replace(' ', '_')} fr_ours={best.fr_test:.3f} "
                f"fr_art={art.fr_test:.3f} (no method of ours reached ART's input-set FR {art.fr_input:.3f})")
    best = min(reached, key=lambda r: r.reach)
    return (f"bench: speedup_to_art_fr={art.seconds / max(best.reach, 1e-9):.1f} method={best.name.replace(' ', '_')} "
            f"fr_ours={best.fr_test:.3f} fr_art={art.fr_test:.3f}")
