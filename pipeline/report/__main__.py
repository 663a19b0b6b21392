"""`python -m pipeline.report`: paper-style tables and figures from the runs in the MLflow store.

    python -m pipeline.report                         # every attack run of the experiment
    python -m pipeline.report --sweep norm_grid       # the runs of a sweep, by name or parent run id
    python -m pipeline.report tracking=server         # the store is the config's (conf/tracking/), as for the jobs
    make report ARGS="--sweep <parent run id>"

Writes to outputs/report/ (or --out): results.csv (one row per run) and results.md (the classifiers' clean
test accuracy and per-class sensitivity / PPV; paper-style tables per norm: FR or TSR, train / test, UAP and
random control, by zeta; where non-targeted UAPs send the test images; every run in one table),
fr_vs_zeta.png (FR / TSR vs zeta per model and norm, random control dashed), uaps.png (the UAPs at the
headline zeta, with colour bars) and confusion_<model>.png (clean / UAP / random confusion matrices of the
headline setting).

Runs of different configs with the same model / attack / target / norm (another seed, epochs, image size,
data root...) are not merged: the config values that tell them apart become table columns and figure labels
(pipeline.report.tables.assign_groups), and every table row names its runs (MLflow run ids, first 8 characters).
A model is named by its config's `model.name` everywhere (older stores: the `choice.model` tag, else the arch).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pipeline.config import compose
from pipeline.report.figures import plot_confusions, plot_uaps, plot_vs_zeta
from pipeline.report.tables import assign_groups, sort_key, write_tables
from pipeline.tracking import finished_attack_runs, flat_metrics, model_name, run_target, set_store

log = logging.getLogger("pipeline.report")


def row_of(run) -> dict:
    p, m = run.data.params, flat_metrics(run.data.metrics)  # grouped MLflow names (test/fr) or older flat ones
    target = run_target(run)
    key = "tsr" if target else "fr"
    return {
        "data": run.data.tags.get("choice.data", p.get("data._target_", "").rsplit(".", 1)[-1]),
        "model": model_name(run), "attack": p.get("attack.name") or p.get("attack._target_", "").rsplit(".", 1)[-1],
        "target": target or "non-targeted", "norm": p.get("attack.norm"),
        "zeta": float(p.get("attack.zeta", "nan")), "eps": m.get("eps"), "metric": key.upper(),
        "train": m.get(f"train_{key}"), "train_random": m.get(f"train_{key}_random"),
        "test": m.get(f"test_{key}"), "test_random": m.get(f"test_{key}_random"),
        "test_acc_clean": m.get("test_acc_clean"),
        # the test split through the hospital's pipeline (`transform`), the search through it too when adaptive
        "transform": p.get("transform"), "adaptive": p.get("attack.adaptive") == "True",
        "test_t": m.get(f"transform_test_{key}"), "test_t_random": m.get(f"transform_test_{key}_random"),
        "test_t_acc_clean": m.get("transform_test_acc_clean"),
        "passes": m.get("uap_passes"), "seconds": m.get("uap_seconds"),
        "queries": m.get("uap_queries"),
        "n_train": m.get("train_n"), "n_test": m.get("test_n"),  # absent in stores before intervals: no interval
        "run_id": run.info.run_id, "run_name": run.info.run_name, "model_arch": p.get("model.arch"),
        "config_hash": run.data.tags.get("config_hash"), "params": dict(p), "metrics": m,
        "wall": (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else None,
        "train_seconds": m.get("classifier_train_seconds", 0.0), "precision": p.get("precision.attack"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="config overrides, as for python -m pipeline (tracking=server, "
                                                 "tracking.experiment=...): the store the jobs wrote to")
    ap.add_argument("--tracking-uri", default=None, help="MLflow store (default: the config's tracking.uri)")
    ap.add_argument("--busy-timeout", type=float, default=None,
                    help="seconds to wait for a SQLite store another process holds (default: tracking.busy_timeout)")
    ap.add_argument("--experiment", default=None, help="MLflow experiment name (default: tracking.experiment)")
    ap.add_argument("--sweep", default=None, help="a sweep's parent run id or sweep name (default: all runs)")
    ap.add_argument("--out", default="outputs/report", help="output folder (default: outputs/report)")
    ap.add_argument("--zeta", type=float, default=2.0,
                    help="headline zeta for the UAP and confusion panels (default 2)")
    args = ap.parse_args(argv)
    tr = compose(args.overrides).tracking  # the defaults the jobs used: one place for them (conf/tracking/)
    uri, experiment = args.tracking_uri or str(tr.uri), args.experiment or str(tr.experiment)
    busy = args.busy_timeout if args.busy_timeout is not None else tr.get("busy_timeout")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per downloaded figure
    set_store(uri, busy)  # waits while a job holds the store
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [row_of(r) for r in finished_attack_runs(experiment, args.sweep)]
    assign_groups(rows)  # the config columns that tell runs of one model / attack / target / norm apart
    rows.sort(key=sort_key)
    files = [*write_tables(rows, out, args.zeta), plot_vs_zeta(rows, out), plot_uaps(rows, out, args.zeta),
             *plot_confusions(rows, out, args.zeta)]
    print((out / "results.md").read_text())
    print(f"report: {len(rows)} runs -> {', '.join(str(f) for f in files if f)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
