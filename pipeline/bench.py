"""`python -m pipeline.bench` (`make bench`): UAP generation side by side with ART, in one process.

Same frozen classifier (from the classifier cache: a small timm model at 128 px trained on ../shared/data/cxr3
when present, else on phantom data), same input set, same norm / eps / FGSM step / delta / max_iter and
seed for every row:

- ART UniversalPerturbation / TargetedUniversalPerturbation with the FGSM attacker (the authors' tool);
- our fgsm_uap faithful mode, batched mode, and sgd_uap;
- the floor: one batched forward+backward pass over the input set, times the passes each row used.

After every pass the exact input-set fooling rate is recorded (for our rows outside the clock), which
gives the time at which each of our rows first reached ART's final fooling rate.

    python -m pipeline.bench                  # 256 images, the full comparison (minutes on a CPU)
    python -m pipeline.bench --quick          # a few dozen images, 2 passes (the test uses this)
    python -m pipeline.bench --device cuda    # on a GPU (ART on the same GPU)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import CONF
from pipeline.progress import quiet_libraries

log = logging.getLogger("pipeline.bench")
ROOT = Path(__file__).resolve().parents[1]


# our rows: attack configs (conf/attack) and overrides, each run with the bench's zeta, step, delta, passes, batch
# (the row's overrides come last: strong_uap keeps its own passes per start and delta)
ROWS = [("fgsm_uap faithful", ["attack=fgsm_uap_faithful"]),
        ("fgsm_uap batched", ["attack=fgsm_uap"]),
        ("fgsm_uap batched, 2 candidates (original)", ["attack=fgsm_uap", "attack.step_rule.scales=[8.0,1.0]",
                                                    "attack.step_rule.adaptive=false"]),
        ("sgd_uap", ["attack=sgd_uap"]),
        ("strong_uap", ["attack=strong_uap", "attack.max_iter=3", "attack.delta=0.0"])]


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
    from omegaconf import open_dict

    from pipeline.config import compose
    cfg = compose(overrides)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
    return cfg


def load_setup(args, overrides: list[str] | None = None):
    """The cached classifier and data, through the pipeline's own config and cache."""
    from hydra.utils import instantiate

    from pipeline.classifier import train_or_load
    cfg = compose_config(overrides or setup_overrides(args))
    dm = instantiate(cfg.data)
    dm.setup()
    model, _ = train_or_load(cfg, dm)
    return cfg, dm, model.net.eval()


def floor_seconds(net, x, batch_size, device) -> float:
    """One batched forward+backward pass (gradient w.r.t. the input) over x, in the network's attack mode
    (pipeline.precision); the best of two."""
    from pipeline import precision
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
    from pipeline.eval.metrics import attack_rate
    from pipeline.eval.predictions import predict
    p = predict(net, ds, {"v": v}, device=device)["v"]
    return attack_rate(clean, p, target)


def run_art(net, x, eps, args, target, n_classes, device) -> tuple[Row, torch.Tensor]:
    from art.attacks.evasion import TargetedUniversalPerturbation, UniversalPerturbation
    from art.estimators.classification import PyTorchClassifier

    from pipeline import precision
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


def attack_config(args, overrides: list[str]):
    """The attack config of a row: conf/attack composed with the row's overrides and the bench's settings."""
    common = [f"zeta={args.zeta}", f"attack.max_iter={args.max_iter}", f"attack.delta={args.delta}",
              f"attack.batch_size={args.batch_size}", f"attack.step={args.step}"]
    return compose_config([*common, *overrides]).attack


def run_ours(name, overrides, net, x, y, eps, args, target, classes, device) -> tuple[Row, torch.Tensor]:
    """One row: the attack composed from conf/attack (+ overrides), made on x with the bench's eps and seed."""
    from pipeline.attack import new_attack
    atk = new_attack(attack_config(args, overrides), net, x.shape[-1], classes, eps=eps, record_fr=True,
                     target=None if target is None else classes[target])
    atk.record_every = args.record_every
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        v = atk.make(x, y, trainer_kwargs={"accelerator": "gpu" if device.type == "cuda" else "cpu",
                                           "enable_progress_bar": False}, seed=args.seed)
        seconds = time.perf_counter() - t0
    net.to(device)  # Lightning's teardown moves the fitted module back to the CPU
    seconds -= atk.unclocked  # the measurement-only passes are not the method's time
    fr_input = atk.to(device).exact_rate(v)  # of the UAP returned (with keep: best, not always the last iterate)
    return Row(name, seconds, atk.passes, fr_input, float("nan"), v.abs().max().item() / eps, mem.peak, atk.trace), v


def bench(args) -> tuple[list[Row], dict]:
    from pipeline import precision
    from pipeline.attack import zeta_to_eps
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    cfg, dm, net = load_setup(args)
    net = net.to(device)
    train, test = dm.dataset("train"), dm.dataset("test")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[:args.n_images].sort().values
    x, y = train.subset(idx).tensors()
    eps = zeta_to_eps(x[:, :1], args.zeta, "linf")
    from pipeline.eval.predictions import predict
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


def study_rows() -> list[tuple[str, list[str]]]:
    """The study's rows (conf/bench/study.yaml): a name and the overrides that make it."""
    from omegaconf import OmegaConf
    rows = OmegaConf.load(CONF / "bench" / "study.yaml").rows
    return [(str(r.name), [str(o) for o in r.overrides]) for r in rows]


def study(args) -> tuple[str, list[dict]]:
    """Each study row (conf/bench/study.yaml) made from an empty UAP cache and timed whole; FR (TSR) on the input
    set and on test."""
    import tempfile

    from omegaconf import open_dict

    from pipeline.attack.build import make_uap
    from pipeline.eval.predictions import predict
    device = torch.device(args.device)
    _, dm, net = load_setup(args)
    net = net.to(device)
    test = dm.dataset("test")
    clean_test = predict(net, test, {"c": None}, device=device)["c"]
    base = [*setup_overrides(args), f"zeta={args.zeta}", f"norm={args.norm}",
            f"attack.target={args.target if args.targeted else 'null'}"]
    record = study_record(args)
    done = json.loads(record.read_text()) if record.is_file() else {}
    rows_of = study_rows()
    chosen = parse_rows(args.rows, len(rows_of))
    for i, (name, overrides) in enumerate(rows_of, 1):
        if i not in chosen:
            if name in done:
                log.warning("study: %-45s (measured earlier, read from %s)", name, record)
            continue
        cfg = compose_config([*base, *overrides])
        with tempfile.TemporaryDirectory() as tmp:
            with open_dict(cfg):
                cfg.paths.cache_dir = tmp  # the UAP cache only (the classifier is loaded already)
            t0 = time.perf_counter()
            atk, v, _ = make_uap(cfg, dm, net, device)
            seconds = time.perf_counter() - t0
        net.to(device)
        row = {"name": name, "overrides": " ".join(overrides), "seconds": seconds, "passes": atk.passes,
               "fr_input": atk.to(device).exact_rate(v), "fr_test": fr_of(net, test, v, clean_test, atk.target, device),
               "from": atk.best["from"] if atk.best else "last iterate"}
        log.warning("study: %-45s input %.3f test %.3f %6.1f s", name, row["fr_input"], row["fr_test"], seconds)
        done[name] = row
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps(done, indent=1))
        os.replace(tmp, record)  # a row, once measured, survives an interrupted study
    rows = [done[name] for name, _ in rows_of if name in done]
    head = ["method", "overrides", "seconds", "passes", f"{'TSR' if args.targeted else 'FR'} input",
            f"{'TSR' if args.targeted else 'FR'} test", "returned"]
    from pipeline.report.tables import md_table
    table = md_table(head, [[r["name"], f"`{r['overrides']}`", f"{r['seconds']:.0f}", str(r["passes"]),
                             f"{r['fr_input']:.3f}", f"{r['fr_test']:.3f}", r["from"]] for r in rows])
    return table, rows


def study_record(args) -> Path:
    """Where --study keeps each measured row (JSON), per model, norm, zeta and target."""
    what = f"{args.model}-{args.norm}-z{args.zeta:g}-{args.target if args.targeted else 'nt'}-seed{args.seed}"
    return ROOT / "outputs" / "bench" / f"study-{what}.json"


def parse_rows(spec: str | None, n: int) -> set[int]:
    """--rows '1,3,14-17' (1-based, as the table lists them); None: all."""
    if spec is None:
        return set(range(1, n + 1))
    if spec == "none":  # the table from the record alone
        return set()
    out = set()
    for part in spec.split(","):
        a, _, b = part.strip().partition("-")
        try:
            lo, hi = int(a), int(b or a)
        except ValueError:
            raise SystemExit(f"--rows {spec!r}: expected numbers and ranges like 1,3,14-17") from None
        if not 1 <= lo <= hi <= n:
            raise SystemExit(f"--rows {spec!r}: rows are 1..{n}")
        out.update(range(lo, hi + 1))
    return out


def eval_throughput(net, ds, eps, device) -> float:
    """Evaluation (clean + UAP + random in one pass) vs the raw forward over the same 3 x N images."""
    from pipeline.eval.predictions import eval_batch, predict
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


# the precision table: (model config, image size, batch); `--quick`: the first, small
PRECISION_MODELS = [("tiny", 128, 32), ("tiny_effnet", 128, 32), ("mobilenetv3_large_100", 128, 32),
                    ("resnet18", 128, 32), ("resnet50", 224, 8), ("densenet121", 224, 8)]
LOOP_NAMES = {"eval": "forward", "attack": "fwd+bwd to input", "train": "fwd+bwd to weights"}


def precision_table(args, device) -> str:
    """Per model and loop: images/s in fp32 and each mode's ratio to it (one interleaved measurement after
    warm-up, pipeline.precision.measure), and the mode precision=auto picks, measured on its own."""
    from pipeline import precision
    from pipeline.classifier import build_net
    from pipeline.tasks.transfer import model_config
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
    from pipeline import precision
    from pipeline.attack import new_attack
    from pipeline.eval.predictions import predict
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
    from pipeline import precision
    from pipeline.attack.build import make_uap
    from pipeline.eval.metrics import fooling_rate, wilson
    from pipeline.eval.predictions import predict
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


def fmt_table(rows: list[Row], floor: float, n: int) -> str:
    head = ["method", "seconds", "passes", "images/s", "s per pass / floor", "FR input", "FR test",
            "UAP norm / eps", "peak RSS (MB)", "reached ART's input FR at (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        per_pass = r.seconds / max(r.passes, 1)
        reach = "(ART itself)" if r.name.startswith("ART") else ("never" if r.reach is None else f"{r.reach:.1f}")
        lines.append(f"| {r.name} | {r.seconds:.1f} | {r.passes} | {n * max(r.passes, 1) / r.seconds:.0f} | "
                     f"{per_pass / floor:.2f} | {r.fr_input:.3f} | {r.fr_test:.3f} | {r.norm_ratio:.4f} | "
                     f"{r.rss_mb:.0f} | {reach} |")
    lines.append(f"| floor (1 batched fwd+bwd pass) x passes | {floor:.2f} per pass | | {n / floor:.0f} | 1.00 "
                 "| | | | | |")
    return "\n".join(lines)


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


def versions() -> str:
    import art
    import pytorch_lightning
    import timm
    return (f"python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
            f"lightning {pytorch_lightning.__version__}, adversarial-robustness-toolbox {art.__version__}")


def machine(device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    if str(device).startswith("cuda"):
        desc += f", GPU {torch.cuda.get_device_name(0)}"
    return desc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few dozen images and 2 passes (a smoke test)")
    ap.add_argument("--n-images", type=int, default=256, help="input-set size (default 256 training images)")
    ap.add_argument("--max-iter", type=int, default=15, help="passes at most (the paper: 15)")
    ap.add_argument("--zeta", type=float, default=2.0, help="UAP strength in percent (default 2)")
    ap.add_argument("--step", type=float, default=0.001, help="FGSM step, L-inf (the paper: 0.001)")
    ap.add_argument("--delta", type=float, default=0.2, help="stop at fooling rate >= 1 - delta (ART default 0.2)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--target", default="COVID-19", help="target class of the targeted rows")
    ap.add_argument("--non-targeted-only", action="store_true")
    ap.add_argument("--model", default="tiny", help="model config (conf/model), trained once and cached")
    ap.add_argument("--data", default="auto", choices=["auto", "cxr3", "phantom"],
                    help="auto: cxr3 when ../shared/data/cxr3 is present, else phantom")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--precision", default="auto", choices=["auto", "32", "bf16"],
                    help="the pipeline's precision for our rows (ART runs in fp32); default auto")
    ap.add_argument("--no-precision-table", action="store_true", help="leave out the precision table")
    ap.add_argument("--precision-check", action="store_true",
                    help="instead of the ART comparison: UAPs searched in fp32 and in bf16 against the same "
                         "fp32-trained classifier, evaluated in fp32 (--check-models, --zeta, --norm)")
    ap.add_argument("--check-models", default="resnet18,tiny_effnet", help="--precision-check: model configs")
    ap.add_argument("--record-every", type=int, default=0,
                    help="also measure the exact input-set FR every k steps, off the clock (finer 'reached at' times)")
    ap.add_argument("--study", action="store_true",
                    help="instead of the ART comparison: every method and variant of conf/bench/study.yaml against "
                         "--model (use "
                         "--norm, --zeta, --target with --targeted), on its whole input set")
    ap.add_argument("--norm", default="linf", choices=["linf", "l2"], help="--study: the norm")
    ap.add_argument("--targeted", action="store_true", help="--study: targeted to --target")
    ap.add_argument("--rows", default=None,
                    help="--study: only these rows (e.g. 14-17; none: measure nothing), the others read from their "
                         "record under outputs/bench/ (rows measured earlier are kept; default: every row, measured "
                         "afresh)")
    ap.add_argument("--seed", type=int, default=42,
                    help="seed (42: the pipeline's default, so the cached classifier is reused)")
    ap.add_argument("--out", default=None, help="markdown file the tables go into, as a section per command (default "
                                                "outputs/bench/benchmarks.md; --quick: none; --out docs/benchmarks.md "
                                                "updates the documented numbers)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_images, args.max_iter = min(args.n_images, 48), 2
    logging.basicConfig(level=logging.WARNING)
    quiet_libraries()  # as the main job: no library banners or warnings between the tables
    cmd = " ".join(["python -m pipeline.bench", *(argv if argv is not None else sys.argv[1:])])
    cmd = re.sub(r" --out[ =]\S+", "", cmd)  # where the section is written is not part of what it measured
    doc = Path(args.out) if args.out else (None if args.quick else ROOT / "outputs" / "bench" / "benchmarks.md")
    if args.study:
        cmd = re.sub(r" --rows[ =]\S+", "", cmd)  # one section per study, however many runs measured its rows
        table, _ = study(args)
        text = f"Machine: {machine(args.device)}; {versions()}.\n\n{table}"
        print(text)
        if doc:
            write_doc(doc, cmd, text)
        return 0
    if args.precision_check:
        text = f"Machine: {machine(args.device)}; {versions()}.\n\n{precision_check(args)}"
        print(text)
        if doc:
            write_doc(doc, cmd, text)
        return 0
    tables, info = bench(args)
    parts = [f"Machine: {machine(args.device)}; {versions()}.",
             f"Classifier: {info['model']} on {info['data']}, {info['image_size']} px, clean test accuracy "
             f"{info['clean_test_acc']:.3f}; input set {info['n_images']} training images; L-inf zeta {args.zeta} % "
             f"(eps {info['eps']:.5f}), FGSM step {args.step}, delta {args.delta}, max_iter {args.max_iter}, "
             f"batch {args.batch_size}, seed {args.seed}, device {info['device']}.", ""]
    for name, rows in tables.items():
        parts += [f"#### {name}", "", fmt_table(rows, info["floor"], info["n_images"]), ""]
    parts.append(f"Evaluation (clean + UAP + random in one batched pass) runs at {info['eval_ratio']:.2f}x the "
                 f"model's raw forward throughput on the same images (precision={args.precision}: "
                 f"{info['modes']}).")
    last = speedup_line(tables["non-targeted"])
    if not args.no_precision_table:
        from pipeline.precision import ROUNDS, WARMUP
        device = torch.device(args.device)
        parts += ["", "#### precision", "",
                  "Images/s in fp32 and each mode's ratio to it, per model and loop (batch as given, after "
                  f"{WARMUP} warm-up calls per mode, the median of {ROUNDS} interleaved rounds); `auto picks`: "
                  "what precision=auto chooses, measured on its own "
                  "(pipeline/precision.py).", "", precision_table(args, device), ""]
        pass_ratio, eval_ratio, auto = precision_speedup(args, device)
        parts.append(f"resnet18 at {info['image_size']} px on the input set, precision=auto ({auto}) vs "
                     f"fp32, side by side: a UAP search pass (sgd_uap) {pass_ratio:.2f}x faster, an evaluation "
                     f"(clean + UAP + random) {eval_ratio:.2f}x faster.")
        last += f" precision_speedup={pass_ratio:.2f}"
    text = "\n".join(parts)
    print(text)
    if doc:
        write_doc(doc, cmd, text)
        print(f"tables written to {doc}")
    print(last)
    return 0


def write_doc(path: Path, cmd: str, text: str) -> None:
    """Replace (or add) the section of this command's device in the benchmark document."""
    path.parent.mkdir(parents=True, exist_ok=True)
    marker = f"<!-- bench: {cmd} -->"
    body = f"{marker}\n### `{cmd}` ({time.strftime('%Y-%m-%d')})\n\n{text}\n<!-- end -->\n"
    doc = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if marker in doc:
        start = doc.index(marker)
        end = doc.index("<!-- end -->", start) + len("<!-- end -->\n")
        doc = doc[:start] + body + doc[end:]
    else:
        doc += "\n" + body
    path.write_text(doc)


if __name__ == "__main__":
    sys.exit(main())
