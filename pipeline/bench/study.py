"""`--study`: every method and variant tried against one model (conf/bench/study.yaml), each made from an empty
UAP cache and timed whole, as `python -m pipeline` makes it."""
from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict

from pipeline import CONF, files
from pipeline.attack.build import make_uap
from pipeline.bench.setup import ROOT, compose_config, fr_of, load_setup, setup_overrides
from pipeline.eval.predictions import predict
from pipeline.markdown import md_table

log = logging.getLogger("pipeline.bench")


def study_rows() -> list[tuple[str, list[str]]]:
    """The study's rows (conf/bench/study.yaml): a name and the overrides that make it."""
    rows = OmegaConf.load(CONF / "bench" / "study.yaml").rows
    return [(str(r.name), [str(o) for o in r.overrides]) for r in rows]


def study(args) -> tuple[str, list[dict]]:
    """Each study row (conf/bench/study.yaml) made from an empty UAP cache and timed whole; FR (TSR) on the input
    set and on test."""


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
        files.write_json(record, done, indent=1)  # written whole: a row, once measured, survives an interruption
    rows = [done[name] for name, _ in rows_of if name in done]
    head = ["method", "overrides", "seconds", "passes", f"{'TSR' if args.targeted else 'FR'} input",
            f"{'TSR' if args.targeted else 'FR'} test", "returned"]
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
