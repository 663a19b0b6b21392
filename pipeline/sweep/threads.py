"""Cores per job: jobs that run at once on one machine (joblib, submitit's local executor) set torch to their share
of the cores, so that they do not slow each other down by oversubscribing them."""
import logging
import os

import torch
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig

from pipeline.sweep.jobs import SIZE_ENV

log = logging.getLogger(__name__)


def sweep_size(config: DictConfig) -> int | None:
    """The number of jobs of a multirun under Hydra's basic sweeper (the product of the swept values, the
    command line over the sweep's params, as the sweeper combines them); None for another sweeper or a
    sweep over `glob(...)` (which needs the sweeper's config loader)."""
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
    launcher_cfg, cores = HydraConfig.get().launcher, machine_cores()
    size = os.environ.get(SIZE_ENV)
    sweep_jobs = int(size) if size else None
    threads = job_threads(launcher_cfg, cores, sweep_jobs)
    if threads is None:
        return None
    torch.set_num_threads(int(threads))
    parallel = concurrent_jobs(launcher_cfg, cores, sweep_jobs)
    log.info("torch threads: %d (%d cores here, %s)", threads, cores,
             f"{parallel} jobs at once" if parallel else "hydra.launcher.cpus_per_task")
    return threads
