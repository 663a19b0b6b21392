"""The Hydra callback of a multirun (conf/hydra/default.yaml): the parent MLflow run it opens (or resumes), the
summary it logs, and the end-of-sweep block of jobs that did not finish."""
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pipeline import files, tracking
from pipeline.errors import UserError
from pipeline.identity import digest
from pipeline.sweep.jobs import DONE, LAUNCHER_ENV, PARENT_ENV, SIZE_ENV, failure_block, job_outcomes, launcher
from pipeline.sweep.processes import State, register, stop_on_signal, sweep_lock
from pipeline.sweep.summary import headline, summary_rows, write_summary
from pipeline.sweep.threads import sweep_size

log = logging.getLogger(__name__)


class MLflowParentRun(Callback):
    """Opens (or resumes) the MLflow parent run of a multirun and closes it with a summary of its jobs."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            files.check_writable(config.paths.cache_dir, "paths.cache_dir")  # the sweep's locks live there
            State.experiment_id = tracking.setup(config.tracking)
        except UserError as e:  # e.g. tracking=server with no server: before any job starts
            log.error("%s", e)
            sys.exit(2)
        State.name = config.get("sweep_name") or "sweep"
        overrides = list(config.hydra.overrides.task)
        params = config.hydra.sweeper.get("params")  # None for an ad-hoc sweep (`zeta=1,2 -m`, no +sweep=)
        sweep_params = OmegaConf.to_container(params, resolve=False) if params else {}
        shash = digest([State.name, sorted(overrides), sweep_params])
        State.lock, State.registry = sweep_lock(config.paths.cache_dir, shash)
        with State.lock:
            State.run_id = self.open_parent(config, shash, overrides, sweep_params)
            others = register(State.registry, add=True)
            tracking.close_dead_runs(State.experiment_id, State.run_id)
        if others:
            log.info("another process runs this sweep too (pid %s): jobs it has claimed are waited for, not redone",
                     ", ".join(str(e["pid"]) for e in others))
        os.environ[PARENT_ENV] = State.run_id
        os.environ[LAUNCHER_ENV] = launcher()
        size = sweep_size(config)
        if size:
            os.environ[SIZE_ENV] = str(size)
        stop_on_signal()

    def open_parent(self, config: DictConfig, shash: str, overrides: list[str], sweep_params: dict) -> str:
        """The parent run of this sweep: the same sweep again resumes under its parent (finished jobs skipped)."""
        client = tracking.client()
        previous = tracking.search(State.experiment_id, f"tags.sweep_hash = '{shash}'", max_results=1)
        if previous:
            run_id = previous[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            log.info("resuming sweep %r under MLflow parent run %s", State.name, run_id)
            return run_id
        run = client.create_run(State.experiment_id, run_name=f"sweep-{State.name}",
                                tags={"sweep": State.name, "role": "parent", "overrides": " ".join(overrides),
                                      "sweep_hash": shash, "git_commit": tracking.git_commit()})
        params = {f"sweeper.{k}": str(v) for k, v in sweep_params.items()}
        params.update({"overrides": " ".join(overrides)[:6000], "sweep_name": State.name})
        for k, v in params.items():
            client.log_param(run.info.run_id, k, v)
        job_cfg = OmegaConf.to_container(config, resolve=False)
        job_cfg.pop("hydra", None)
        client.log_dict(run.info.run_id, job_cfg, "sweep_config.yaml")
        log.info("MLflow parent run %s for sweep %r", run.info.run_id, State.name)
        return run.info.run_id

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not State.run_id:
            return
        out = Path(config.hydra.sweep.dir)
        out.mkdir(parents=True, exist_ok=True)
        # this process's jobs are all done: a child of it still RUNNING lost its process (a worker killed by the
        # OOM killer); another process's running children are left to it
        tracking.close_dead_runs(State.experiment_id, State.run_id,
                                 lambda tag, since: tag != launcher() and tracking.process_alive(tag, since))
        outcomes = job_outcomes(out)
        block = failure_block(State.name, outcomes)
        State.exit_code = 1 if block else 0
        with State.lock:
            others = register(State.registry, add=False)
            if others:
                log.info("sweep %r: another process (pid %s) still runs it and will close the parent run",
                         State.name, ", ".join(str(e["pid"]) for e in others))
            else:
                self.close_parent(out, jobs_failed=sum(o["status"] not in DONE for o in outcomes))
        os.environ.pop(PARENT_ENV, None)
        os.environ.pop(SIZE_ENV, None)
        if block:
            log.error("%s", block)

    def close_parent(self, out: Path, jobs_failed: int) -> None:
        """The summary of the parent's children, and its end: FAILED when a child did not finish or a job of
        this process failed before it could open a run (a bad config value)."""
        client = tracking.client()
        rows = summary_rows(State.experiment_id, State.run_id)
        client.log_artifact(State.run_id, str(write_summary(rows, out / "summary.md")))
        with open(out / "summary.json", "w") as fh:
            json.dump(rows, fh, indent=1)
        client.log_artifact(State.run_id, str(out / "summary.json"))
        failed = sum(r["status"] not in DONE for r in rows)
        metrics = headline(rows)
        if metrics:
            tracking.log_metrics_to(State.run_id, metrics)
        client.set_tag(State.run_id, "children", str(len(rows)))
        client.set_tag(State.run_id, "children_failed", str(failed))
        client.set_tag(State.run_id, "jobs_failed", str(jobs_failed))
        client.set_terminated(State.run_id, "FAILED" if failed or jobs_failed else "FINISHED")
        log.info("sweep done: %d jobs (%d not finished); summary in %s", len(rows), failed, out / "summary.md")
