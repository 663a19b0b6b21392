"""Tables: markdown (the report's, the sweep summary's, the benchmarks'), and the report's results.csv /
results.md built from its rows (one dict per run, pipeline.report.row_of)."""
from __future__ import annotations

import csv
import math
from pathlib import Path


def md_table(head: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells]) + "\n"


COLUMNS = ["data", "model", "attack", "target", "norm", "zeta", "eps", "metric", "train", "train_random",
           "test", "test_random", "test_acc_clean", "passes", "seconds", "run_id"]
NORM_NAMES = {"linf": "L-inf", "l2": "L2"}
TARGET_ORDER = {"non-targeted": 0, "normal": 1, "pneumonia": 2, "COVID-19": 3}


def sort_key(r: dict):
    return (r["data"], r["model"], r["attack"], TARGET_ORDER.get(r["target"], 9), r["norm"], r["zeta"])


def fmt(v, key: str = "") -> str:
    if key == "zeta":
        return f"{v:g}"
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


def write_tables(rows: list[dict], out: Path, zeta: float = 2.0) -> tuple[Path, Path]:
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    head = ["data", "model", "attack", "target", "norm", "zeta (%)", "metric", "train UAP", "train random",
            "test UAP", "test random", "clean test acc"]
    keys = ["data", "model", "attack", "target", "norm", "zeta", "metric", "train", "train_random", "test",
            "test_random", "test_acc_clean"]
    sections = [("Classifiers: clean test set", classifier_table(rows)),
                *((f"{'FR' if len(targets(rows)) == 1 else 'FR / TSR'}, {NORM_NAMES.get(norm, norm)}: train / test, UAP and random control",
                   paper_table([r for r in rows if r["norm"] == norm])) for norm in sorted({r["norm"] for r in rows})),
                (f"Where non-targeted UAPs send the test images: share of predictions per class, clean -> **UAP** (random), "
                 f"zeta closest to {zeta:g} %", shares_table(rows, zeta)),
                ("Every run", md_table(head, [[fmt(r[k], k) for k in keys] for r in rows]))]
    text = "\n".join(f"### {title}\n\n{body}" for title, body in sections if body)
    (out / "results.md").write_text(text)
    return out / "results.csv", out / "results.md"


def targets(rows: list[dict]) -> list[str]:
    return sorted({r["target"] for r in rows}, key=lambda t: TARGET_ORDER.get(t, 9))


def class_names(rows: list[dict]) -> list[str]:
    """The class names, from the per-class metric names (`test_sens_<class>`), in label order where known."""
    names = {k[len("test_sens_"):] for r in rows for k in r["metrics"] if k.startswith("test_sens_")}
    return sorted(names, key=lambda c: (TARGET_ORDER.get(c, 9), c))


def classifier_table(rows: list[dict]) -> str:
    """One row per trained classifier (data, model): val / test accuracy, per-class sensitivity / PPV on test."""
    first = {}
    for r in rows:
        first.setdefault((r["data"], r["model"]), r["metrics"])
    classes = class_names(rows)
    head = ["data", "model", "val acc", "test acc", *(f"{c} sens / PPV" for c in classes)]
    cells = [[d, model, fmt(m.get("val_acc")), fmt(m.get("test_acc")),
              *(f"{fmt(m.get(f'test_sens_{c}'))} / {fmt(m.get(f'test_ppv_{c}'))}" for c in classes)]
             for (d, model), m in sorted(first.items())]
    return md_table(head, cells)


def paper_table(rows: list[dict]) -> str:
    """Paper-style: one row per (data, model, attack, target) and UAP / random, one column per zeta; train / test."""
    zetas = sorted({r["zeta"] for r in rows})
    cell = {(r["data"], r["model"], r["attack"], r["target"], r["zeta"]): r for r in rows}
    groups = sorted({k[:4] for k in cell}, key=lambda k: (k[0], k[1], k[2], TARGET_ORDER.get(k[3], 9)))
    head = ["data", "model", "attack", "target", "metric", "perturbation", *(f"zeta {z:g} %" for z in zetas)]
    cells = []
    for g in groups:
        metric = "FR" if g[3] == "non-targeted" else "TSR"
        for kind, (tr, te) in (("UAP", ("train", "test")), ("random", ("train_random", "test_random"))):
            vals = [cell.get((*g, z)) for z in zetas]
            cells.append([*g, metric, kind, *("" if r is None else f"{fmt(r[tr])} / {fmt(r[te])}" for r in vals)])
    return md_table(head, cells)


def shares_table(rows: list[dict], zeta: float) -> str:
    """Share of test predictions per class: clean -> under the non-targeted UAP (under the random control)."""
    classes = class_names(rows)
    sel = [r for r in headline(rows, zeta) if r["target"] == "non-targeted"]
    if not sel or not classes:
        return ""
    head = ["data", "model", "attack", "norm", "zeta (%)", *classes]
    cells = []
    for r in sel:
        m = r["metrics"]
        share = lambda kind, c: fmt(m.get(f"test_{kind}_share_{c}"))  # noqa: E731
        cells.append([r["data"], r["model"], r["attack"], r["norm"], fmt(r["zeta"], "zeta"),
                      *(f"{share('clean', c)} -> **{share('uap', c)}** ({share('random', c)})" for c in classes)])
    return md_table(head, cells)


def headline(rows: list[dict], zeta: float) -> list[dict]:
    """Per (model, attack, target, norm): the row at the zeta closest to the headline zeta."""
    best: dict = {}
    for r in rows:
        k = (r["model"], r["attack"], r["target"], r["norm"])
        if k not in best or abs(r["zeta"] - zeta) < abs(best[k]["zeta"] - zeta):
            best[k] = r
    return sorted(best.values(), key=sort_key)
