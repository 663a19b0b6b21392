"""`--black-box`: the black-box UAPs against queries, side by side in one process.

For each model (`--bb-models`) and budget (L-inf zeta 2 %, L2 zeta 4 %): U-SimBA as published
(attack=simba_uap) and the NES-gradient UAP (attack=nes_uap), each on the same 100 input images, stopped at
`--queries`; the held-out (test) fooling rate of v is measured beside the search whenever its query count passes a
checkpoint (pipeline.bench.trace.QueryTrace). The table gives the rate at each checkpoint, and the queries the NES
search needed to reach U-SimBA's final rate; the figure, rate against queries.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline import figures
from pipeline.attack import random_control
from pipeline.attack.build import build_attack, trainer_kwargs
from pipeline.bench.setup import compose_config, load_setup, setup_overrides
from pipeline.bench.trace import QueryTrace
from pipeline.eval.metrics import fooling_rate, wilson
from pipeline.eval.predictions import predict
from pipeline.markdown import md_table

log = logging.getLogger("pipeline.bench")

ATTACKS = ("simba_uap", "nes_uap")
BUDGETS = (("linf", 2.0), ("l2", 4.0))


def checkpoints(budget: int) -> list[int]:
    """1, 2, 5 x 10^k queries up to the budget, and the budget itself."""
    out, k = [], 1000
    while k < budget:
        out += [c for c in (k, 2 * k, 5 * k) if c < budget]
        k *= 10
    return [*out, budget]


def blackbox(args) -> tuple[str, str, Path]:
    """The table (markdown), its last line (`blackbox_query_ratio=...`) and the figure."""
    rows, curves, ratios = [], {}, []
    for model in args.bb_models.split(","):
        margs = _with(args, model=model)
        overrides = setup_overrides(margs)
        cfg, dm, net = load_setup(margs, overrides)
        test = dm.dataset("test")
        clean = predict(net, test, {"c": None})["c"]

        def rate(v, net=net, test=test, clean=clean):
            return fooling_rate(clean, predict(net, test, {"v": v})["v"])

        for norm, zeta in BUDGETS:
            finals = {}
            eps = build_attack(compose_config([*overrides, f"norm={norm}", f"zeta={zeta}"]), dm, net)[0].eps
            rows.append({"model": model, "budget": f"{norm} zeta {zeta:g} %", "attack": "random control",
                         "final FR (95 % interval)": interval(rate(random_control(
                             torch.zeros(1, dm.image_size, dm.image_size), eps, norm, args.seed)), len(test))})
            for attack in ATTACKS:
                c = compose_config([*overrides, f"attack={attack}", f"norm={norm}", f"zeta={zeta}",
                                    f"attack.max_queries={args.queries}"])
                atk, inputs = build_attack(c, dm, net)
                trace = QueryTrace(checkpoints(args.queries), rate)
                x, y = inputs.tensors()
                log.info("black-box bench: %s, %s, %s zeta %g%%, up to %d queries", model, attack, norm, zeta,
                         args.queries)
                atk.make(x, y, trainer_kwargs=trainer_kwargs(c, "cpu"), seed=args.seed, callbacks=[trace])
                curves[f"{model} {norm} z{zeta:g} {attack}"] = trace.points
                finals[attack] = trace.points[-1]
                rows.append(row(model, norm, zeta, attack, trace.points, len(inputs), len(test), args.queries))
            reach = first_reaching(curves[f"{model} {norm} z{zeta:g} nes_uap"], finals["simba_uap"][1])
            ratio = finals["simba_uap"][0] / reach if reach else None
            rows[-1]["queries to U-SimBA's final FR"] = f"{reach:,}" if reach else "not reached"
            rows[-1]["fewer queries"] = f"{ratio:.1f}x" if ratio else "-"
            if ratio:
                ratios.append(ratio)
    attack_row = next(r for r in rows if r["attack"] != "random control")
    cols = list(dict.fromkeys([*attack_row, "queries to U-SimBA's final FR", "fewer queries"]))
    table = md_table(cols, [[str(r.get(k, "")) for k in cols] for r in rows])
    fig = figures.plot_curves(curves, Path(args.bb_figure), "held-out FR of the UAP against queries to the victim",
                              xlabel="queries (images sent to the victim)", ylabel="test FR", logx=True)
    last = f"blackbox_query_ratio={min(ratios):.1f}" if ratios else "blackbox_query_ratio=nan"
    return table, last, fig


def row(model, norm, zeta, attack, points, n_inputs, n_test, budget) -> dict:
    """A table row: the rate at each checkpoint (the first measurement at or past it, within one step's
    queries), and the final rate with its interval."""
    r = {"model": model, "budget": f"{norm} zeta {zeta:g} %", "attack": attack, "inputs": n_inputs}
    for c in checkpoints(budget):
        # past the last point: the search had stopped (its budget could not pay for another step)
        r[f"FR at {c:,}"] = f"{next((f for q, f in points if q >= c), points[-1][1]):.3f}"
    q, fr = points[-1]
    r["final FR (95 % interval)"] = f"{interval(fr, n_test)} at {q:,} queries"
    return r


def interval(fr: float, n: int) -> str:
    lo, hi = wilson(fr, n)
    return f"{fr:.3f} [{lo:.3f}, {hi:.3f}]"


def first_reaching(points, level: float) -> int | None:
    """The first checkpoint's query count whose rate is at least `level`."""
    return next((q for q, fr in points if fr >= level), None)


def _with(args, **changes):
    a = type(args)(**vars(args))
    for k, v in changes.items():
        setattr(a, k, v)
    return a

