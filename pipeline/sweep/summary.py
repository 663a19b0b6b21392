"""The sweep's summary: one row per job of its parent run, the parent's headline metrics, and summary.md."""
import logging
from pathlib import Path
from typing import Any

from pipeline import files, tracking
from pipeline.markdown import md_table
from pipeline.sweep.jobs import DONE

log = logging.getLogger(__name__)


SUMMARY_METRICS = ["test_acc", "train_fr", "train_fr_random", "test_fr", "test_fr_random", "train_tsr",
                   "train_tsr_random", "test_tsr", "test_tsr_random", "eps", "uap_norm", "uap_seconds", "uap_passes",
                   "uap_queries"]


def summary_rows(experiment_id: str, parent_id: str) -> list[dict]:
    """One row per job (by job hash) among the parent's children: its FINISHED run if it has one (a job
    KILLED and later redone counts once, as finished), else its latest run."""
    runs = tracking.search(experiment_id, f"tags.mlflow.parentRunId = '{parent_id}'",
                           order_by=["attributes.start_time ASC"])
    jobs: dict[str, Any] = {}
    for r in runs:
        key = r.data.tags.get("job_hash", r.info.run_id)
        if key not in jobs or not tracking.complete(jobs[key]):
            jobs[key] = r
    rows = []
    for r in jobs.values():
        p = r.data.params
        status = "FINISHED" if tracking.complete(r) else "INCOMPLETE" if r.info.status == "FINISHED" else r.info.status
        row = {"run_id": r.info.run_id, "status": status, "overrides": r.data.tags.get("overrides", ""),
               "model": tracking.model_name(r), "norm": p.get("attack.norm"), "zeta": p.get("attack.zeta"),
               "target": tracking.run_target(r)}
        metrics = tracking.flat_metrics(r.data.metrics)
        row.update({m: metrics[m] for m in SUMMARY_METRICS if m in metrics})
        rows.append(row)
    return sorted(rows, key=lambda r: r["overrides"])


def headline(rows: list[dict]) -> dict[str, float]:
    """The parent run's metrics, so that its row alone compares sweeps: each finished job's test FR (TSR when
    targeted) and its random control, as `MODEL/NORM zZETA FR` (`tiny/linf z2 TSR COVID-19`); MLflow groups
    them by model."""
    out = {}
    for r in rows:
        targeted = r["target"] is not None
        key = "tsr" if targeted else "fr"
        if r["status"] not in DONE or f"test_{key}" not in r:
            continue
        zeta = float(r["zeta"]) if r["zeta"] is not None else float("nan")
        name = f"{r['model']}/{r['norm']} z{zeta:g} {key.upper()}{' ' + r['target'] if targeted else ''}"
        out[name] = r[f"test_{key}"]
        out[name + " random"] = r[f"test_{key}_random"]
    return out


def write_summary(rows: list[dict], path: Path) -> Path:
    cols = ["overrides", "status", *[m for m in SUMMARY_METRICS if any(m in r for r in rows)], "run_id"]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    return files.write_text(path, md_table(cols, [[fmt(r.get(c)) for c in cols] for r in rows]))
