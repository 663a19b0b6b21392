"""Sweeps: one MLflow parent run per Hydra multirun, every job a child run; resume by config hash.

The Hydra callback (registered in conf/hydra/default.yaml) opens the parent run when a multirun
starts and passes its id to the jobs through the environment (so it reaches joblib workers and SLURM
jobs too); at the end it logs a summary table of the children to the parent and closes it.

Nothing is lost or done twice when sweeps overlap or stop:

- the parent is found or created under a file lock per sweep (`paths.cache_dir/sweeps/`), and every
  process running the sweep registers there: the same sweep started twice shares one parent, and the
  last process to end closes it;
- a job runs under a file lock on its config (`claim`): a second process waits for it, then skips it;
- each job writes `job_status.json` into its folder; at the end the sweep prints the jobs that did not
  finish, with their errors, in one block, and `python -m pipeline` exits 1;
- SIGTERM or Ctrl-C stops the workers (each closes its run KILLED), marks this process's running
  children KILLED and, unless another process still runs the sweep, the parent KILLED; a rerun resumes.

Jobs that run at once on one machine (joblib, submitit's local executor) set torch to their share of the
cores (`job_threads`), so that they do not slow each other down by oversubscribing them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pipeline import files, tracking
from pipeline.identity import job_hash

log = logging.getLogger(__name__)

PARENT_ENV = "UAP_CXR_PARENT_RUN_ID"
LAUNCHER_ENV = "UAP_CXR_SWEEP_LAUNCHER"  # "host:pid" of the process that launched the sweep's jobs
SIZE_ENV = "UAP_CXR_SWEEP_JOBS"  # the number of jobs of the sweep (submitit's local executor starts them all at once)
STATUS_FILE = "job_status.json"
DONE = ("FINISHED",)
WORKER_GRACE = 60  # seconds the workers get to close their runs after a signal
SUMMARY_METRICS = ["test_acc", "train_fr", "train_fr_random", "test_fr", "test_fr_random", "train_tsr",
                   "train_tsr_random", "test_tsr", "test_tsr_random", "eps", "uap_norm", "uap_seconds", "uap_passes"]


def parent_run_id() -> str | None:
    return os.environ.get(PARENT_ENV) or None


def finished_run(experiment_id: str, jhash: str, sweep_name: str | None) -> str | None:
    """The id of a FINISHED run with this job hash and its whole result in the same sweep (by name), if the
    store has one.

    Scoped to the sweep so that its report (`--sweep NAME`) finds every job: a job done in another sweep
    is run again rather than left out."""
    filt = f"tags.job_hash = '{jhash}' and attributes.status = 'FINISHED'"
    filt += f" and tags.sweep = '{sweep_name}'" if sweep_name else " and tags.sweep IS NULL"
    runs = tracking.search(experiment_id, filt, max_results=100)
    return next((r.info.run_id for r in runs if tracking.complete(r)), None)


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
    from pipeline.report.tables import md_table
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    path.write_text(md_table(cols, [[fmt(r.get(c)) for c in cols] for r in rows]))
    return path


# --------------------------------------------------------------------------- jobs

def launcher() -> str:
    return tracking.this_process()


def job_lock(cfg: DictConfig, jhash: str) -> FileLock:
    path = Path(cfg.paths.cache_dir) / "jobs" / f"{jhash}-{cfg.get('sweep_name') or 'adhoc'}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


@contextmanager
def claim(cfg: DictConfig, experiment_id: str):
    """Hold this job (a file lock on its config) while it runs; yields the id of a FINISHED run of it, if
    the store has one by then. A process that finds the job claimed waits for it, then finds it done."""
    jhash = job_hash(cfg)
    lock = job_lock(cfg, jhash)
    try:
        lock.acquire(timeout=0)
    except TimeoutError:
        log.info("another process is running this job; waiting for it")
        lock.acquire()
    try:
        yield finished_run(experiment_id, jhash, cfg.get("sweep_name")) if cfg.get("resume", True) else None
    finally:
        lock.release()


def record_job(status: str, error: str = "") -> None:
    """Write this job's outcome into its folder, for the sweep's end-of-run block (multirun jobs only)."""
    from hydra.core.hydra_config import HydraConfig
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files.write_json(out / STATUS_FILE, {"num": hc.job.num, "overrides": " ".join(hc.overrides.task),
                                         "status": status, "error": error[:2000]})


def job_outcomes(sweep_dir: Path) -> list[dict]:
    """The outcome of every job started in this sweep folder; a job folder without one crashed or was killed."""
    out = []
    for d in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        f = d / STATUS_FILE
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            out.append({"num": int(d.name), "overrides": "", "status": "NO STATUS",
                        "error": f"the job left no {STATUS_FILE} in {d} (killed or crashed)"})
    return out


def failure_block(name: str, outcomes: list[dict]) -> str | None:
    bad = [o for o in outcomes if o["status"] not in DONE]
    if not bad:
        return None
    lines = [f"sweep {name!r}: {len(bad)} of {len(outcomes)} jobs did not finish:"]
    lines += [f"  #{o['num']} {o['overrides'] or '(no overrides)'}: {o['status']}: "
              f"{o['error'].splitlines()[0] if o['error'] else ''}"
              for o in bad]
    lines.append("fix the cause and rerun the same command: finished jobs are skipped")
    return "\n".join(lines)


# --------------------------------------------------------------------------- cores per job

def sweep_size(config: DictConfig) -> int | None:
    """The number of jobs of a multirun under Hydra's basic sweeper (the product of the swept values, the
    command line over the sweep's params, as the sweeper combines them); None for another sweeper or a
    sweep over `glob(...)` (which needs the sweeper's config loader)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    if not str(config.hydra.sweeper.get("_target_", "")).endswith(".BasicSweeper"):
        return None
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    try:
        overrides = OverridesParser.create().parse_overrides(params + list(config.hydra.overrides.task))
        return sum(len(batch) for batch in BasicSweeper.split_arguments(overrides, None))
    except HydraException:
        return None


def concurrent_jobs(launcher_cfg: DictConfig, cores: int, sweep_jobs: int | None) -> int | None:
    """How many jobs of a sweep run at once on this machine: joblib's `n_jobs` (negative counts from the
    cores as joblib does: -1 is one job per core), at most the sweep's jobs; every job of the sweep under
    submitit's local executor. None where jobs do not share the machine: one at a time (Hydra's basic
    launcher) or each on its own allocation (SLURM)."""
    target = str(launcher_cfg.get("_target_", ""))
    if target.endswith(".JoblibLauncher"):
        n_jobs = int(launcher_cfg.n_jobs)
        parallel = n_jobs if n_jobs > 0 else max(cores + 1 + n_jobs, 1)
        return min(parallel, sweep_jobs) if sweep_jobs else parallel
    if target.endswith(".LocalLauncher"):  # hydra_submitit_launcher's submitit_local
        return sweep_jobs
    return None


def thread_share(cores: int, parallel: int) -> int:
    """Torch threads for one of `parallel` jobs sharing `cores` cores: an equal share, at least one."""
    return max(1, cores // max(1, parallel))


def job_threads(launcher_cfg: DictConfig, cores: int, sweep_jobs: int | None) -> int | None:
    """Torch threads for a job of a sweep: its share of this machine's cores when jobs run here side by side;
    under SLURM the cores it was given (`cpus_per_task`); None (torch's default) otherwise, one job at a time
    included."""
    if str(launcher_cfg.get("_target_", "")).endswith(".SlurmLauncher"):
        return launcher_cfg.get("cpus_per_task")
    parallel = concurrent_jobs(launcher_cfg, cores, sweep_jobs)
    return thread_share(cores, parallel) if parallel and parallel > 1 else None


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity: taskset, a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_job_threads() -> int | None:
    """In a job of a sweep: set torch's threads to `job_threads` and log the choice; returns the count, or None
    where left as it is. It overrides OMP_NUM_THREADS, and with it joblib's own cap on its workers' threads
    (cores // n_jobs, which counts n_jobs even when the sweep has fewer jobs)."""
    from hydra.core.hydra_config import HydraConfig
    launcher_cfg, cores = HydraConfig.get().launcher, machine_cores()
    size = os.environ.get(SIZE_ENV)
    sweep_jobs = int(size) if size else None
    threads = job_threads(launcher_cfg, cores, sweep_jobs)
    if threads is None:
        return None
    import torch
    torch.set_num_threads(int(threads))
    parallel = concurrent_jobs(launcher_cfg, cores, sweep_jobs)
    log.info("torch threads: %d (%d cores here, %s)", threads, cores,
             f"{parallel} jobs at once" if parallel else "hydra.launcher.cpus_per_task")
    return threads


# --------------------------------------------------------------------------- the sweep's processes

def sweep_lock(cache_dir: str, shash: str) -> tuple[FileLock, Path]:
    folder = Path(cache_dir) / "sweeps"
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / f"{shash}.lock")), folder / f"{shash}.json"


def register(registry: Path, add: bool) -> list[dict]:
    """Add or remove this process in the sweep's registry (under its lock); the others still alive."""
    import psutil
    try:
        entries = json.loads(registry.read_text()) if registry.is_file() else []
    except ValueError:  # unreadable (written by an older version, not atomically): the live processes re-register
        entries = []
    others = [e for e in entries if e["pid"] != os.getpid() or e["host"] != socket.gethostname()]
    others = [e for e in others if tracking.process_alive(f"{e['host']}:{e['pid']}", e["created"])]
    me = {"host": socket.gethostname(), "pid": os.getpid(), "created": psutil.Process().create_time()}
    files.write_json(registry, others + [me] if add else others)
    return others


class State:
    """What the launching process knows of its sweep (for the end, an interruption and the exit code)."""
    run_id: str | None = None
    experiment_id: str | None = None
    name = "sweep"
    lock: FileLock | None = None
    registry: Path | None = None
    exit_code = 0
    signal: int | None = None


def stop_on_signal() -> None:
    """In the launching process: SIGTERM / Ctrl-C passes SIGTERM to the workers and waits (a minute at
    most) while each closes its run KILLED and exits, then interrupts the sweep; `interrupted` closes
    what is left."""
    def handler(signum, frame):
        import psutil
        State.signal = signum
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not break the clean-up
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs = workers()
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.Error:  # gone meanwhile
                pass
        if procs:
            log.warning("signal %d: stopping %d workers (each closes its run KILLED)", signum, len(procs))
        psutil.wait_procs(procs, timeout=WORKER_GRACE)
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def workers() -> list:
    """The processes running this sweep's jobs (joblib's loky workers; not its resource tracker, which
    ends by itself with this process)."""
    import psutil
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def interrupted() -> int:
    """Clean up after a signal or Ctrl-C in the launching process: stop workers still there, mark this
    process's running children and (unless another process runs the sweep) the parent KILLED. Returns
    the exit code, 128 + the signal."""
    import psutil
    for p in workers():
        try:
            p.kill()
        except psutil.Error:
            pass
    code = 128 + (State.signal or signal.SIGINT)
    if not State.run_id:
        return code
    client = tracking.client()
    mine = tracking.search(State.experiment_id, f"tags.mlflow.parentRunId = '{State.run_id}' and attributes.status"
                                                f" = 'RUNNING' and tags.sweep_launcher = '{launcher()}'")
    for r in mine:
        client.set_tag(r.info.run_id, "error", "interrupted: the sweep was stopped")
        client.set_terminated(r.info.run_id, "KILLED")
    with State.lock:
        others = register(State.registry, add=False)
    if not others:
        client.set_tag(State.run_id, "error", f"interrupted (signal {State.signal or signal.SIGINT})")
        client.set_terminated(State.run_id, "KILLED")
    log.error("sweep %r interrupted%s; rerun the same command to resume", State.name,
              "" if not others else " (its parent run stays open for the other process running it)")
    return code


class MLflowParentRun(Callback):
    """Opens (or resumes) the MLflow parent run of a multirun and closes it with a summary of its jobs."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from pipeline.errors import UserError
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
        shash = hashlib.sha256(json.dumps([State.name, sorted(overrides), sweep_params], sort_keys=True,
                                          default=str).encode()).hexdigest()[:16]
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
