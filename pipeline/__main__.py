"""`python -m pipeline`: one experiment per Hydra job (see conf/config.yaml).

The pipeline's own modules are imported inside the functions below, after Hydra has parsed the command line:
`--help`, `--cfg job` and a bad override answer at once, without loading torch, Lightning and MLflow."""
from __future__ import annotations

import logging
import os
import signal
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from pipeline import CONF
from pipeline.errors import UserError

log = logging.getLogger("pipeline")


def is_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def guarded(task, cfg: DictConfig):
    """Run a task: a user error prints one clear line and exits 2 (no traceback unless HYDRA_FULL_ERROR=1);
    inside a multirun a failing job is logged (and FAILED in MLflow), its outcome written for the sweep's
    end-of-run block, and the sweep goes on."""
    multirun = is_multirun()
    try:
        try:
            result = task(cfg)
        except UserError:
            raise
        except Exception as e:  # a full disk or a locked store wherever it struck: one line too
            from pipeline import files, tracking  # after Hydra has parsed the command line (module docstring)
            if files.is_disk_full(e):
                raise files.write_error(cfg.paths.root_dir, e) from None
            if tracking.is_busy(e):
                raise tracking.busy_error(cfg.tracking) from None
            raise
    except (UserError, OmegaConfBaseException) as e:
        # a user error: one clear line, no traceback (HYDRA_FULL_ERROR=1 shows it)
        if os.environ.get("HYDRA_FULL_ERROR") == "1" and not multirun:
            raise
        log.error("%s", e)
        if multirun:
            return record("FAILED", f"{type(e).__name__}: {e}")
        sys.exit(2)
    except Exception as e:
        if multirun:  # the run is FAILED in MLflow with the error tagged; the sweep goes on
            log.exception("job failed; the sweep continues")
            return record("FAILED", f"{type(e).__name__}: {e}")
        raise
    except (KeyboardInterrupt, SystemExit) as e:
        if multirun:
            record("KILLED", f"interrupted ({type(e).__name__}: {e})")
            if in_worker():  # a joblib / loky worker: take no further job from the queue
                logging.shutdown()
                os._exit(143)
        raise
    if multirun:
        record("FINISHED")
    return result


def record(status: str, error: str = "") -> None:
    from pipeline.sweep import record_job  # after Hydra has parsed the command line (module docstring)
    record_job(status, error)


def in_worker() -> bool:
    """This process runs jobs for a sweep launched by another process (joblib workers, submitit jobs)."""
    from pipeline.sweep import LAUNCHER_ENV, launcher  # after Hydra has parsed the command line (module docstring)
    return os.environ.get(LAUNCHER_ENV, launcher()) != launcher()


def interrupt_on_sigterm() -> None:
    """SIGTERM (a scheduler, `kill`) ends a job like Ctrl-C: the MLflow run is closed KILLED, nothing lost.
    The process that launches a sweep has its own handler (pipeline.sweep.stop_on_signal), kept."""
    if is_multirun() and not in_worker():
        return

    def handler(signum, frame):
        from pipeline.sweep import State  # after Hydra has parsed the command line (module docstring)
        State.signal = signum
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)


def main(cfg: DictConfig) -> float | None:
    """One Hydra job: the task `cfg.task` (pipeline/tasks/)."""
    from pipeline.progress import quiet_libraries  # after Hydra has parsed the command line (module docstring)
    from pipeline.tasks import run  # heavy imports after Hydra has parsed the command line

    quiet_libraries()
    interrupt_on_sigterm()
    if is_multirun():  # jobs side by side on this machine: each its share of the cores
        from pipeline.sweep import set_job_threads  # after Hydra has parsed the command line (module docstring)
        set_job_threads()
    metrics = guarded(run, cfg)
    return None if metrics is None else metrics.get("test_fr", metrics.get("test_acc"))


def cli() -> None:
    """`python -m pipeline` (conf/config.yaml). A sweep exits 1 when a job did not finish (listed at its end),
    128 + signal when interrupted."""
    from pipeline import sweep  # after Hydra has parsed the command line (module docstring)
    try:
        hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")(main)()
    except (KeyboardInterrupt, SystemExit) as e:  # Lightning turns an interruption into SystemExit(1)
        if isinstance(e, SystemExit) and sweep.State.signal is None:
            raise  # a plain exit (a user error's 2)
        if sweep.State.run_id is None:  # a single run: its MLflow run is already closed KILLED
            sys.exit(128 + (sweep.State.signal or signal.SIGINT))
        sys.exit(sweep.interrupted())
    sys.exit(sweep.State.exit_code)


if __name__ == "__main__":
    cli()
