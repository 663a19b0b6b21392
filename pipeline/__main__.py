"""`python -m pipeline`: one experiment per Hydra job (see conf/config.yaml)."""
from __future__ import annotations

import logging
import os
import signal
import sys

import hydra
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import UserError

log = logging.getLogger("pipeline")


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def guarded(task, cfg: DictConfig):
    """Run a task: a user error prints one clear line and exits 2 (no traceback unless HYDRA_FULL_ERROR=1);
    inside a multirun a failing job is logged (and FAILED in MLflow) and the sweep goes on."""
    try:
        return task(cfg)
    except (UserError, OmegaConfBaseException) as e:
        # a user error: one clear line, no traceback (HYDRA_FULL_ERROR=1 shows it)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s", e)
        if is_multirun():
            return None
        sys.exit(2)
    except Exception:
        if is_multirun():  # the run is FAILED in MLflow with the error tagged; the sweep goes on
            log.exception("job failed; the sweep continues")
            return None
        raise


def interrupt_on_sigterm() -> None:
    """SIGTERM (a scheduler, `kill`) ends the job like Ctrl-C: the MLflow run is closed KILLED, nothing lost."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from pipeline.experiment import run  # heavy imports after Hydra has parsed the command line

    interrupt_on_sigterm()
    metrics = guarded(run, cfg)
    return None if metrics is None else metrics.get("test_fr", metrics.get("test_acc"))


if __name__ == "__main__":
    main()
