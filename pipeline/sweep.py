"""Sweeps: one MLflow parent run per Hydra multirun, every job a child run; resume by config hash.

The Hydra callback (registered in conf/hydra/default.yaml) opens the parent run when a multirun
starts and passes its id to the jobs through the environment (so it reaches joblib workers and SLURM
jobs too); at the end it logs a summary table of the children to the parent and closes it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import mlflow
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

PARENT_ENV = "UAP_CXR_PARENT_RUN_ID"
SUMMARY_METRICS = ["test_acc", "train_fr", "train_fr_random", "test_fr", "test_fr_random", "train_tsr",
                   "train_tsr_random", "test_tsr", "test_tsr_random", "eps", "uap_norm", "uap_seconds", "uap_passes"]
# keys that do not change a job's result, left out of its identity
NOT_IDENTITY = {"paths", "tracking", "hydra", "enable_progress_bar", "log_every_n_steps", "enable_model_summary",
                "num_workers", "sweep_name", "resume"}


def job_hash(cfg: DictConfig) -> str:
    """Identity of a job's result: the resolved config without paths, tracking and presentation keys, and
    the classifier and UAP cache versions (runs made before a code change that alters training or the
    attacks are not reused)."""
    from pipeline.classifier import CACHE_VERSION
    from pipeline.config import stable_hash
    from pipeline.uaps import UAP_CACHE_VERSION
    container = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
                 for k in cfg if k not in NOT_IDENTITY}
    container.update(cache_version=CACHE_VERSION, uap_cache_version=UAP_CACHE_VERSION)
    return stable_hash(container, NOT_IDENTITY)


def parent_run_id() -> str | None:
    return os.environ.get(PARENT_ENV) or None


def finished_run(experiment_id: str, jhash: str, sweep_name: str | None) -> str | None:
    """The id of a FINISHED run with this job hash in the same sweep (by name), if the store has one.

    Scoped to the sweep so that its report (`--sweep NAME`) finds every job: a job done in another sweep
    is run again rather than left out."""
    filt = f"tags.job_hash = '{jhash}' and attributes.status = 'FINISHED'"
    filt += f" and tags.sweep = '{sweep_name}'" if sweep_name else " and tags.sweep IS NULL"
    runs = mlflow.search_runs([experiment_id], filter_string=filt, max_results=1, output_format="list")
    return runs[0].info.run_id if runs else None


def summary_rows(experiment_id: str, parent_id: str) -> list[dict]:
    runs = mlflow.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                              output_format="list", max_results=10000)
    rows = []
    for r in runs:
        row = {"run_id": r.info.run_id, "status": r.info.status, "overrides": r.data.tags.get("overrides", "")}
        row.update({m: r.data.metrics.get(m) for m in SUMMARY_METRICS if m in r.data.metrics})
        rows.append(row)
    return sorted(rows, key=lambda r: r["overrides"])


def write_summary(rows: list[dict], path: Path) -> Path:
    cols = ["overrides", "status", *[m for m in SUMMARY_METRICS if any(m in r for r in rows)], "run_id"]
    from pipeline.report import md_table
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    path.write_text(md_table(cols, [[fmt(r.get(c)) for c in cols] for r in rows]))
    return path


class MLflowParentRun(Callback):
    """Opens an MLflow parent run per multirun and closes it with a summary of its child runs."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.experiment_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from pipeline import tracking
        self.experiment_id = tracking.setup(config.tracking)
        client = mlflow.MlflowClient()
        name = config.get("sweep_name") or "sweep"
        overrides = list(config.hydra.overrides.task)
        params = config.hydra.sweeper.get("params")  # None for an ad-hoc sweep (`zeta=1,2 -m`, no +sweep=)
        sweep_params = OmegaConf.to_container(params, resolve=False) if params else {}
        shash = hashlib.sha256(json.dumps([name, sorted(overrides), sweep_params], sort_keys=True, default=str)
                               .encode()).hexdigest()[:16]
        previous = mlflow.search_runs([self.experiment_id], filter_string=f"tags.sweep_hash = '{shash}'",
                                      max_results=1, output_format="list")
        if previous:  # the same sweep again: resume under the same parent (finished jobs are skipped)
            self.run_id = previous[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
            log.info("resuming sweep %r under MLflow parent run %s", name, self.run_id)
            os.environ[PARENT_ENV] = self.run_id
            return
        run = client.create_run(self.experiment_id, run_name=f"sweep-{name}",
                                tags={"sweep": name, "role": "parent", "overrides": " ".join(overrides),
                                      "sweep_hash": shash, "git_commit": tracking.git_commit()})
        self.run_id = run.info.run_id
        params = {f"sweeper.{k}": str(v) for k, v in sweep_params.items()}
        params.update({"overrides": " ".join(overrides)[:6000], "sweep_name": name})
        for k, v in params.items():
            client.log_param(self.run_id, k, v)
        job_cfg = OmegaConf.to_container(config, resolve=False)
        job_cfg.pop("hydra", None)
        client.log_dict(self.run_id, job_cfg, "sweep_config.yaml")
        os.environ[PARENT_ENV] = self.run_id
        log.info("MLflow parent run %s for sweep %r", self.run_id, name)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.run_id:
            return
        client = mlflow.MlflowClient()
        rows = summary_rows(self.experiment_id, self.run_id)
        out = Path(config.hydra.sweep.dir)
        out.mkdir(parents=True, exist_ok=True)
        client.log_artifact(self.run_id, str(write_summary(rows, out / "summary.md")))
        with open(out / "summary.json", "w") as fh:
            json.dump(rows, fh, indent=1)
        client.log_artifact(self.run_id, str(out / "summary.json"))
        failed = sum(r["status"] != "FINISHED" for r in rows)
        client.set_tag(self.run_id, "children", str(len(rows)))
        client.set_tag(self.run_id, "children_failed", str(failed))
        client.set_terminated(self.run_id, "FINISHED")
        os.environ.pop(PARENT_ENV, None)
        log.info("sweep done: %d child runs (%d not finished); summary in %s", len(rows), failed, out / "summary.md")
