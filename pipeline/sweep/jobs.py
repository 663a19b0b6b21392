"""A sweep's jobs: resume (a FINISHED run of the same job hash in the same sweep), the claim that keeps a job from
running twice at once, and each job's outcome for the end-of-sweep block."""
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pipeline import files, tracking
from pipeline.identity import job_hash

log = logging.getLogger(__name__)


PARENT_ENV = "UAP_CXR_PARENT_RUN_ID"
LAUNCHER_ENV = "UAP_CXR_SWEEP_LAUNCHER"  # "host:pid" of the process that launched the sweep's jobs
SIZE_ENV = "UAP_CXR_SWEEP_JOBS"  # the number of jobs of the sweep (submitit's local executor starts them all at once)
STATUS_FILE = "job_status.json"
DONE = ("FINISHED",)
WORKER_GRACE = 60  # seconds the workers get to close their runs after a signal


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
