"""The tasks of `python -m pipeline task=NAME`: each a short function that opens a job (data, classifier,
MLflow run: pipeline.job.open_job) and calls the library. Adding a task is one function here,
registered with `@task`, plus its config keys.

    train      the classifier only (trained, or loaded from the cache)
    attack     make the configured UAP, evaluate it and its random control (the default)
    evaluate   apply a saved UAP (attack.uap_file) to this data and classifier, e.g. another hospital's folder
    defense    attack, then rounds of UAP adversarial fine-tuning (conf/defense/)
    min_zeta   the smallest zeta whose UAP reaches min_zeta.target_fr, by bisection
    transfer   a UAP made on each of transfer.models, evaluated on every one (make transfer)

Inside a sweep a job runs under its claim (pipeline.sweep.claim): a job already FINISHED is skipped.
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from pipeline import files, sweep, tracking
from pipeline.config import validate
from pipeline.errors import ConfigError, UserError
from pipeline.eval.measurements import evaluate_uap
from pipeline.job import open_job
from pipeline.tasks.defense import run_defense
from pipeline.tasks.min_zeta import search
from pipeline.tasks.transfer import run_transfer

log = logging.getLogger("pipeline.tasks")

TASKS: dict[str, Callable[[DictConfig, str | None], dict]] = {}


def task(fn: Callable[[DictConfig, str | None], dict]) -> Callable:
    """Register a task under its function's name (`task=NAME`)."""
    TASKS[fn.__name__] = fn
    return fn


def task_function(cfg: DictConfig) -> Callable[[DictConfig, str | None], dict]:
    fn = TASKS.get(cfg.get("task"))
    if fn is None:
        raise ConfigError(f"task={cfg.get('task')!r}: expected one of {sorted(TASKS)}")
    return fn


class CheckConfig(Callback):
    """Hydra callback (conf/hydra/default.yaml): a single run's task and config are checked before Hydra
    creates its output folder, so a typo (`zeta=abc`) prints one line and exits 2, leaving no folder and no
    MLflow run. (In a sweep each job is checked as it starts, pipeline.job.open_job.)"""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            task_function(config)
            validate(config)
        except (UserError, OmegaConfBaseException) as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {e}", file=sys.stderr)  # before Hydra's job logging is set up
            sys.exit(2)


def run(cfg: DictConfig) -> dict:
    """Run the configured task and return its metrics. Inside a sweep (a parent run is open) a job whose
    identical config already has a FINISHED run is skipped (`resume: true`), and a job another process is
    running is waited for (`sweep.claim`), not done twice."""
    fn = task_function(cfg)
    parent_run_id = sweep.parent_run_id()
    if not parent_run_id:
        return fn(cfg, None)
    files.check_writable(cfg.paths.cache_dir, "paths.cache_dir")  # the job's claim is a lock file there
    with sweep.claim(cfg, tracking.setup(cfg.tracking)) as done:
        if done:
            log.info("skipped: this job's config already has a FINISHED run (%s)", done)
            return tracking.run_metrics(done)
        return fn(cfg, parent_run_id)


@task
def train(cfg: DictConfig, parent_run_id: str | None = None) -> dict:
    with open_job(cfg, "train", parent_run_id) as job:
        return job.metrics


@task
def attack(cfg: DictConfig, parent_run_id: str | None = None) -> dict:
    with open_job(cfg, "attack", parent_run_id) as job:
        job.add(evaluate_uap(cfg, job.dm, job.model.net, job.out, job.device))
        return job.metrics


@task
def evaluate(cfg: DictConfig, parent_run_id: str | None = None) -> dict:
    if not cfg.attack.get("uap_file"):
        raise ConfigError("task=evaluate: attack.uap_file is not set (expected the .npy of a saved UAP)")
    with open_job(cfg, "evaluate", parent_run_id) as job:
        job.add(evaluate_uap(cfg, job.dm, job.model.net, job.out, job.device))
        return job.metrics


@task
def defense(cfg: DictConfig, parent_run_id: str | None = None) -> dict:
    with open_job(cfg, "defense", parent_run_id) as job:
        job.add(evaluate_uap(cfg, job.dm, job.model.net, job.out, job.device))
        job.add(run_defense(cfg, job.dm, job.model, job.out, job.device))
        return job.metrics


@task
def min_zeta(cfg: DictConfig, parent_run_id: str | None = None) -> dict:
    with open_job(cfg, "min_zeta", parent_run_id) as job:
        job.add(search(cfg, job.dm, job.model.net, job.out, job.device, job.run_id))
        return job.metrics


@task
def transfer(cfg: DictConfig, parent_run_id: str | None = None) -> dict:
    return run_transfer(cfg)
