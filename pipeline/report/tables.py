"""The report's tables: results.csv and results.md (markdown, pipeline.markdown) built from its rows (one
dict per run, pipeline.report.__main__.row_of).

Runs of different configs can share model / attack / target / norm / zeta (a default run, one with
`seed=7 recipe.epochs=3`, a sweep): `assign_groups` finds the config params that tell them apart, every table
shows those as columns (none in a plain sweep), and every row names the runs it comes from."""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from pipeline.eval.metrics import wilson
from pipeline.identity import is_display, read_by
from pipeline.markdown import md_table

COLUMNS = ["data", "model", "attack", "target", "norm", "zeta", "eps", "metric", "train", "train_random",
           "test", "test_random", "test_acc_clean", "passes", "seconds", "run_id", "run_name", "model_arch",
           "config_hash", "config"]
NORM_NAMES = {"linf": "L-inf", "l2": "L2"}
TARGET_ORDER = {"non-targeted": 0, "normal": 1, "pneumonia": 2, "COVID-19": 3}

# Config params (MLflow params: the flattened job config) that never tell runs apart in a table, besides the
# display keys (pipeline.identity: where the files and the store are, presentation, sweep bookkeeping) and the
# settings of tasks a run is not: what is a column already (model, attack, target, norm, zeta) or follows from
# it (eps, input count), and the recipe's epochs and lr (trainer.max_epochs and optim.optimizer.lr say them).
SAID = {"task", "zeta", "defense", "attack.zeta", "attack.norm", "attack.target", "attack.eps", "attack.n_inputs",
           "recipe.epochs", "recipe.lr",
        "data.epochs", "data.lr"}  # where stores written by older code kept the recipe
# shown first, and kept when another param always has the same values (data.seed is ${seed})
FIRST = ["seed", "trainer.max_epochs", "data.image_size", "data.root", "model.arch"]


def short_id(run_id: str) -> str:
    return str(run_id)[:8]


def natural(v) -> tuple:
    """Sort key of a config value: numbers by value, before text."""
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


def table_row(r: dict) -> tuple:
    """What a row of the paper-style tables stands for, before the config columns: its zetas are its cells."""
    return (r["data"], r["model"], r["attack"], r["target"], r["norm"])


def groups_param(k: str, task: str = "attack") -> bool:
    return not (k in SAID or is_display(k) or not read_by(k, task))


def priority(k: str) -> tuple:
    return (FIRST.index(k) if k in FIRST else len(FIRST), k)


def config_columns(rows: list[dict], cell: Callable[[dict], tuple] = table_row,
                   unique: Callable[[dict], tuple] | None = None, keep: Callable[[str], bool] = lambda k: True,
                   fallback: str | None = "run") -> list[str]:
    """The config params whose values differ between runs of one `cell` (by default a row of the paper-style
    tables: data, model, attack, target, norm): seed, trainer.max_epochs, data.image_size, data.root, attack
    options... A param a run does not have (a store written by older code) counts only where nothing else
    tells two runs with the same `unique` key (cell and zeta) apart; a param with the same values as one
    before it in every run (data.seed and seed) is left out. Where even that leaves two runs on one key,
    `fallback` ("run": the run id) tells them apart."""
    unique = unique or (lambda r: (*cell(r), r["zeta"]))
    cand = sorted({k for r in rows for k in r.get("params", {})
                   if groups_param(k, str(r["params"].get("task", "attack"))) and keep(k)}, key=priority)
    chosen: list[str] = []

    def value(r, k):
        return r.get("params", {}).get(k)

    def add(groups, strict):
        for grp in groups:
            for k in cand:
                vals = {value(r, k) for r in grp}
                if not strict:
                    vals.discard(None)
                if len(vals) > 1 and k not in chosen:
                    chosen.append(k)
        seen, kept = set(), []
        for k in sorted(chosen, key=priority):
            vec = tuple(value(r, k) for r in rows)
            if vec not in seen:
                seen.add(vec)
                kept.append(k)
        chosen[:] = kept

    def colliding():
        by = defaultdict(list)
        for r in rows:
            by[(*unique(r), *(value(r, k) for k in chosen))].append(r)
        return [g for g in by.values() if len(g) > 1]

    by_cell = defaultdict(list)
    for r in rows:
        by_cell[cell(r)].append(r)
    add([g for g in by_cell.values() if len(g) > 1], strict=False)
    add(colliding(), strict=True)
    if fallback and colliding():
        chosen.append(fallback)
    return chosen


def config_of(r: dict, cols: list[str]) -> dict[str, str]:
    return {k: short_id(r["run_id"]) if k == "run" else str(r.get("params", {}).get(k, "")) for k in cols}


def assign_groups(rows: list[dict]) -> list[str]:
    """Sets each row's "config" ({param: value} of `config_columns`) and "group" (its values); returns the params."""
    cols = config_columns(rows)
    for r in rows:
        r["config"] = config_of(r, cols)
        r["group"] = tuple(r["config"].values())
    return cols


def group_label(r: dict) -> str:
    """"seed=7, trainer.max_epochs=3": what tells this row's runs apart from others of the same model, ..."""
    return ", ".join(f"{k}={v}" for k, v in r.get("config", {}).items())


def group_key(r: dict) -> tuple:
    return tuple(natural(v) for v in r.get("group", ()))


def sort_key(r: dict):
    return (r["data"], r["model"], r["attack"], TARGET_ORDER.get(r["target"], 9), r["norm"], group_key(r), r["zeta"])


def fmt(v, key: str = "") -> str:
    if key == "zeta":
        return f"{v:g}"
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


def interval(rate, n) -> str:
    """` [lo, hi]`: the 95 % Wilson interval of a rate over n images; empty when n is unknown (older runs)."""
    lo, hi = wilson(rate, n if n is not None else float("nan"))
    return "" if math.isnan(lo) else f" [{lo:.2f}, {hi:.2f}]"


def runs_cell(ids: list[str], most: int = 6) -> str:
    """Short run ids; a long list ends with how many more."""
    ids = [short_id(i) for i in ids]
    return ", ".join(ids) if len(ids) <= most else ", ".join(ids[:most - 1]) + f" +{len(ids) - most + 1} more"


def write_tables(rows: list[dict], out: Path, zeta: float = 2.0) -> tuple[Path, Path]:
    cols = assign_groups(rows)
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows({**r, "config": group_label(r)} for r in rows)
    head = ["data", "model", "attack", "target", "norm", "zeta (%)", *cols, "metric", "train UAP", "train random",
            "test UAP", "test UAP 95 %", "test random", "test random 95 %", "clean test acc", "run"]
    keys = ["data", "model", "attack", "target", "norm", "zeta"]
    vals = ["metric", "train", "train_random", "test", "test_ci", "test_random", "test_random_ci", "test_acc_clean"]
    kind, norms = "FR" if len(targets(rows)) == 1 else "FR / TSR", sorted({r["norm"] for r in rows})
    sections = [("Classifiers: clean test set", classifier_table(rows)),
                *((f"{kind}, {NORM_NAMES.get(norm, norm)}: train / test, UAP and random control",
                   paper_table([r for r in rows if r["norm"] == norm], cols)) for norm in norms),
                ("Where non-targeted UAPs send the test images: share of predictions per class, clean -> **UAP** "
                 f"(random), zeta closest to {zeta:g} %", shares_table(rows, zeta, cols)),
                ("Threat models: non-targeted test FR by what the attacker has (the training images or other "
                 "images, a surrogate, only the victim's scores)", threat_table(rows)),
                ("The hospital's pipeline: test FR (TSR) without and through each transform, of the UAP made "
                 "without it and of an adaptive one made through it; the random control and clean accuracy through it",
                 transform_table(rows)),
                ("Across seeds: mean ± sd (sample standard deviation) over the seeds of each cell",
                 seeds_table(rows, cols)),
                ("Where the time went: the runs' wall time per model, of which classifier training and UAP "
                 "searches (each search made once, by the job that first needs it); the rest is evaluation, "
                 "loading and logging", time_table(rows)),
                ("Every run", md_table(head, [[*(fmt(r[k], k) for k in keys), *r["config"].values(),
                                               *(fmt(r[k], k) for k in vals), short_id(r["run_id"])]
                                              for r in map(with_intervals, rows)]))]
    apart = ", ".join(f"`{c}`" for c in cols)
    note = (f"{len(rows)} runs. `[lo, hi]`: 95 % Wilson interval over the test images. "
            "`run` / `runs`: MLflow run ids, first 8 characters (a row's runs in zeta order)"
            + (f"; rows of one model / attack / target / norm are told apart by {apart}" if cols else "") + ".\n\n")
    text = note + "\n".join(f"### {title}\n\n{body}" for title, body in sections if body)
    (out / "results.md").write_text(text)
    return out / "results.csv", out / "results.md"


def threat_of(r: dict) -> tuple[int, float, str]:
    """A run's attacker (sort order, queries, label): white-box with the training images or with other images,
    transferred from a surrogate, or black-box at a query budget."""
    p = r["params"]

    def val(k):
        return None if p.get(k) in (None, "", "None", "null") else p[k]

    if val("attack.black_box") == "True":
        q = float(val("attack.max_queries") or "inf")
        return 4, q, f"black-box {r['attack']}, " + (f"{q:,.0f} queries" if q < float("inf") else "no query limit")
    model, seed = val("attack.surrogate_model"), val("attack.surrogate_seed")
    if model or seed:
        return 3, 0, f"transferred from {model or 'the same architecture'}" + (f", seed {seed}" if seed else "")
    source = val("attack.input_source") or "train"
    if source != "train":
        where = f" ({val('attack.input_root')})" if source == "folder" else ""
        return 2, 0, f"white-box, {source} images{where}"
    return 1, 0, "white-box, the training images"


def threat_table(rows: list[dict]) -> str:
    """Non-targeted test FR per attacker (rows) and model / budget (columns), with 95 % intervals, and the random
    control of the white-box runs; empty unless the runs hold more than one attacker."""
    nt = [r for r in rows if r["target"] == "non-targeted" and r.get("test") is not None]
    threats = sorted({threat_of(r) for r in nt})
    if len(threats) < 2:
        return ""
    cols = sorted({(r["model"], r["norm"], r["zeta"]) for r in nt})
    cell: dict = defaultdict(list)
    for r in nt:
        cell[threat_of(r), (r["model"], r["norm"], r["zeta"])].append(r)
        if threat_of(r)[0] == 1:
            cell[(5, 0, "random control (same norm, white-box runs)"), (r["model"], r["norm"], r["zeta"])].append(
                {**r, "test": r["test_random"]})
    body = []
    for t in [*threats, (5, 0, "random control (same norm, white-box runs)")]:
        line = [t[2]]
        for c in cols:
            rs = cell.get((t, c), [])
            vals = [x["test"] for x in rs]
            if not vals:
                line.append("")
            elif len(vals) == 1:
                line.append(f"{vals[0]:.3f}{interval(vals[0], rs[0].get('n_test'))}")
            else:
                line.append(f"{spread(vals)} ({len(vals)} runs)")
        body.append(line)
    head = ["attacker", *(f"{m} · {NORM_NAMES.get(n, n)} {z:g} %" for m, n, z in cols)]
    return md_table(head, body)


def transform_table(rows: list[dict]) -> str:
    """Per transform, data, model and budget: clean accuracy without / through the transform, the UAP's rate
    without it and through it (made without it: the non-adaptive attacker; made through it: `attack.adaptive`),
    and the random control through it; several runs of a cell (seeds) as mean ± sd; empty unless some run
    evaluated through a transform."""
    cells: dict[tuple, dict[str, list]] = {}
    for r in rows:
        if r.get("transform") and r.get("test_t") is not None:
            c = cells.setdefault((r["transform"], r["data"], r["model"], r["attack"], r["target"], r["norm"],
                                  r["zeta"]), {"plain": [], "adaptive": []})
            c["adaptive" if r["adaptive"] else "plain"].append(r)

    def rate(rs: list[dict], k: str, with_interval: bool = True) -> str:
        vals = [r[k] for r in rs if r.get(k) is not None]
        if len(vals) == 1:
            return f"{vals[0]:.3f}" + (interval(vals[0], rs[0].get("n_test")) if with_interval else "")
        return f"{spread(vals)} ({len(vals)} runs)" if vals else ""

    body = []
    for (transform, data, model, attack, target, norm, zeta), c in sorted(cells.items()):
        body.append([transform, f"{data} · {model} · {attack} · {target} · {NORM_NAMES.get(norm, norm)} {zeta:g} %",
                     f"{rate(c['plain'] or c['adaptive'], 'test_acc_clean', False)} -> "
                     f"{rate(c['plain'] or c['adaptive'], 'test_t_acc_clean', False)}", rate(c["plain"], "test"),
                     rate(c["plain"], "test_t"), rate(c["adaptive"], "test_t"),
                     rate(c["plain"] or c["adaptive"], "test_t_random")])  # one control per classifier
    if not body:
        return ""
    return md_table(["transform", "data · model · attack · target · budget", "clean acc (without -> through)",
                     "UAP without transform", "UAP through it", "adaptive UAP through it", "random through it"],
                    body)


def time_table(rows: list[dict]) -> str:
    """Per model (and the attack's precision mode): runs, their summed wall time, training, searches, the rest."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("wall") is not None:
            groups.setdefault((r["model"], r.get("precision") or "fp32"), []).append(r)
    if not groups:
        return ""
    cells, total = [], [0, 0.0, 0.0, 0.0]
    for (model, prec), rs in sorted(groups.items()):
        wall = sum(r["wall"] for r in rs)
        train = sum(r.get("train_seconds") or 0.0 for r in rs)
        search = sum(r.get("seconds") or 0.0 for r in rs)
        for i, v in enumerate((len(rs), wall, train, search)):
            total[i] += v
        cells.append([model, prec, str(len(rs)), f"{wall / 60:.1f}", f"{train / 60:.1f}", f"{search / 60:.1f}",
                      f"{(wall - train - search) / 60:.1f}"])
    n, wall, train, search = total
    cells.append(["**all**", "", str(n), f"**{wall / 60:.1f}**", f"{train / 60:.1f}", f"{search / 60:.1f}",
                  f"{(wall - train - search) / 60:.1f}"])
    return md_table(["model", "attack precision", "runs", "wall (min)", "training (min)", "UAP searches (min)",
                     "rest (min)"], cells)


def with_intervals(r: dict) -> dict:
    return {**r, "test_ci": interval(r["test"], r.get("n_test")).strip(),
            "test_random_ci": interval(r["test_random"], r.get("n_test")).strip()}


def spread(values) -> str:
    """`mean ± sd` (sample standard deviation) of the known values; the mean alone for one."""
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    if not v:
        return ""
    mean = sum(v) / len(v)
    if len(v) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)):.3f}"


def seeds_table(rows: list[dict], cols: list[str]) -> str:
    """Runs that differ only by their seed (`seed=0,1,2 -m`, +sweep=seeds), taken together: per table cell
    (data, model, attack, target, norm, zeta and the other config columns) the seeds, and the mean ± sd over
    them of the clean test accuracy and of test FR / TSR under the UAP and under its random control."""
    if "seed" not in cols:
        return ""
    rest = [c for c in cols if c != "seed"]
    by = defaultdict(list)
    for r in rows:
        by[(*table_row(r), r["zeta"], *(r["config"][c] for c in rest))].append(r)
    head = ["data", "model", "attack", "target", "norm", "zeta (%)", *rest, "metric", "seeds", "clean test acc",
            "test UAP", "test random", "runs"]
    cells = []
    for key, grp in sorted(by.items(), key=lambda kv: tuple(natural(x) for x in kv[0])):
        if len(grp) < 2:
            continue
        grp = sorted(grp, key=lambda r: natural(r["config"]["seed"]))
        cells.append([*key[:5], fmt(key[5], "zeta"), *key[6:], grp[0]["metric"],
                      ", ".join(r["config"]["seed"] for r in grp), spread(r["test_acc_clean"] for r in grp),
                      spread(r["test"] for r in grp), spread(r["test_random"] for r in grp),
                      runs_cell([r["run_id"] for r in grp])])
    return md_table(head, cells) if cells else ""


def targets(rows: list[dict]) -> list[str]:
    return sorted({r["target"] for r in rows}, key=lambda t: TARGET_ORDER.get(t, 9))


def class_names(rows: list[dict]) -> list[str]:
    """The class names, from the per-class metric names (`test_sens_<class>`), in label order where known."""
    names = {k[len("test_sens_"):] for r in rows for k in r["metrics"] if k.startswith("test_sens_")}
    return sorted(names, key=lambda c: (TARGET_ORDER.get(c, 9), c))


def classifier_table(rows: list[dict]) -> str:
    """One row per trained classifier (its cache key, the `config_hash` tag): val / test accuracy, per-class
    sensitivity / PPV on test; the config params that tell classifiers of one data / model apart; its runs."""
    first: dict = {}
    runs = defaultdict(list)
    for r in rows:
        k = r.get("config_hash") or (r["data"], r["model"], r.get("group", ()))
        first.setdefault(k, r)
        runs[k].append(r["run_id"])
    reps = list(first.values())
    dm = lambda r: (r["data"], r["model"])  # noqa: E731
    cols = config_columns(reps, cell=dm, unique=dm, keep=lambda k: not k.startswith("attack."), fallback=None)
    classes = class_names(rows)
    head = ["data", "model", *cols, "classifier", "val acc", "test acc", *(f"{c} sens / PPV" for c in classes), "runs"]
    cells = []
    order = lambda kv: (*dm(kv[1]), *map(natural, config_of(kv[1], cols).values()))  # noqa: E731
    for k, r in sorted(first.items(), key=order):
        m = r["metrics"]
        cells.append([r["data"], r["model"], *config_of(r, cols).values(), fmt(r.get("config_hash"))[:8],
                      fmt(m.get("val_acc")), fmt(m.get("test_acc")) + interval(m.get("test_acc"), m.get("test_n")),
                      *(f"{fmt(m.get(f'test_sens_{c}'))} / {fmt(m.get(f'test_ppv_{c}'))}" for c in classes),
                      runs_cell(runs[k])])
    return md_table(head, cells)


def paper_table(rows: list[dict], cols: list[str] = ()) -> str:
    """Paper-style: one row per (data, model, attack, target, config columns) and UAP / random, one column per
    zeta ("train / test [95 % interval of test]"); the runs of the row in zeta order."""
    zetas = sorted({r["zeta"] for r in rows})
    cell = {(*table_row(r)[:4], *r.get("group", ()), r["zeta"]): r for r in rows}
    groups = sorted({k[:-1] for k in cell}, key=lambda g: (*g[:3], TARGET_ORDER.get(g[3], 9), *map(natural, g[4:])))
    head = ["data", "model", "attack", "target", *cols, "metric", "perturbation", *(f"zeta {z:g} %" for z in zetas),
            "runs"]
    cells = []
    for g in groups:
        metric = "FR" if g[3] == "non-targeted" else "TSR"
        vals = [cell.get((*g, z)) for z in zetas]
        ids = runs_cell([r["run_id"] for r in vals if r is not None], most=len(zetas))
        for kind, (tr, te) in (("UAP", ("train", "test")), ("random", ("train_random", "test_random"))):
            cells.append([*g, metric, kind, *("" if r is None else
                                              f"{fmt(r[tr])} / {fmt(r[te])}{interval(r[te], r.get('n_test'))}"
                                              for r in vals), ids])
    return md_table(head, cells)


def shares_table(rows: list[dict], zeta: float, cols: list[str] = ()) -> str:
    """Share of test predictions per class: clean -> under the non-targeted UAP (under the random control)."""
    classes = class_names(rows)
    sel = [r for r in headline(rows, zeta) if r["target"] == "non-targeted"]
    if not sel or not classes:
        return ""
    head = ["data", "model", "attack", "norm", "zeta (%)", *cols, *classes, "run"]
    cells = []
    for r in sel:
        share = lambda kind, c, m=r["metrics"]: fmt(m.get(f"test_{kind}_share_{c}"))  # noqa: E731
        cells.append([r["data"], r["model"], r["attack"], r["norm"], fmt(r["zeta"], "zeta"), *r.get("group", ()),
                      *(f"{share('clean', c)} -> **{share('uap', c)}** ({share('random', c)})" for c in classes),
                      short_id(r["run_id"])])
    return md_table(head, cells)


def headline(rows: list[dict], zeta: float) -> list[dict]:
    """Per (data, model, attack, target, norm, config columns): the row at the zeta closest to the headline zeta."""
    best: dict = {}
    for r in rows:
        k = (*table_row(r), r.get("group", ()))
        if k not in best or abs(r["zeta"] - zeta) < abs(best[k]["zeta"] - zeta):
            best[k] = r
    return sorted(best.values(), key=sort_key)
