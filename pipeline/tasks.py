"""The tasks of `python -m pipeline task=NAME`: each a short function that opens a job (data, classifier,
MLflow run: pipeline.experiment.open_job) and calls the library. Adding a task is one function here,
registered with `@task`, plus its config keys.

    train      the classifier only (trained, or loaded from the cache)
    attack     make the configured UAP, evaluate it and its random control (the default)
    evaluate   apply a saved UAP (attack.uap_file) to this data and classifier, e.g. another hospital's folder
    defense    attack, then rounds of UAP adversarial fine-tuning (defense=uap_finetune sets this task)
    min_zeta   the smallest zeta whose UAP reaches min_zeta.target_fr, by bisection
    transfer   a UAP made on each of transfer.models, evaluated on every one (python -m pipeline.transfer)

Inside a sweep a job runs under its claim (pipeline.sweep.claim): a job already FINISHED is skipped.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from omegaconf import DictConfig

from pipeline import sweep, tracking
from pipeline.defense import run_defense
from pipeline.errors import ConfigError
from pipeline.experiment import evaluate_uap, open_job, run_name
from pipeline.minzeta import search
from pipeline.transferability import run_transfer

log = logging.getLogger("pipeline.tasks")

TASKS: dict[str, Callable[[DictConfig, str | None], dict]] = {}


def task(fn: Callable[[DictConfig, str | None], dict]) -> Callable:
    """Register a task under its function's name (`task=NAME`)."""
    TASKS[fn.__name__] = fn
    return fn


def run(cfg: DictConfig) -> dict:
    """Run the configured task and return its metrics. Inside a sweep (a parent run is open) a job whose
    identical config already has a FINISHED run is skipped (`resume: true`), and a job another process is
    running is waited for (`sweep.claim`), not done twice."""
    fn = TASKS.get(cfg.get("task"))
    if fn is None:
        raise ConfigError(f"task={cfg.get('task')!r}: expected one of {sorted(TASKS)}")
    parent_run_id = sweep.parent_run_id()
    if not parent_run_id:
        return fn(cfg, None)
    with sweep.claim(cfg, tracking.setup(cfg.tracking)) as done:
        if done:
            log.info("skipped: this job's config already has a FINISHED run (%s)", done)
            return dict(tracking.mlflow.get_run(done).data.metrics)
        return fn(cfg, parent_run_id)


@task
def train(cfg: DictConfig, parent_run_id: str | None = None) -> dict:
    with open_job(cfg, run_name(cfg, "train"), parent_run_id) as job:
        return job.metrics


@task
def attack(cfg: DictConfig, parent_run_id: str | None = None) -> dict:
    with open_job(cfg, run_name(cfg, "attack"), parent_run_id) as job:
        job.metrics.update(evaluate_uap(cfg, job.dm, job.model.net, job.out, job.device))
        return job.metrics


@task
def evaluate(cfg: DictConfig, parent_run_id: str | None = None) -> dict:
    if not cfg.attack.get("uap_file"):
        raise ConfigError("task=evaluate: attack.uap_file is not set (expected the .npy of a saved UAP)")
    with open_job(cfg, run_name(cfg, "evaluate"), parent_run_id) as job:
        job.metrics.update(evaluate_uap(cfg, job.dm, job.model.net, job.out, job.device))
        return job.metrics


@task
def defense(cfg: DictConfig, parent_run_id: str | None = None) -> dict:
    with open_job(cfg, run_name(cfg, "defense"), parent_run_id) as job:
        job.metrics.update(evaluate_uap(cfg, job.dm, job.model.net, job.out, job.device))
        job.metrics.update(run_defense(cfg, job.dm, job.model, job.out, job.device))
        return job.metrics


@task
def min_zeta(cfg: DictConfig, parent_run_id: str | None = None) -> dict:
    with open_job(cfg, run_name(cfg, "min_zeta"), parent_run_id) as job:
        job.metrics.update(search(cfg, job.dm, job.model.net, job.out, job.device, job.run_id))
        return job.metrics


@task
def transfer(cfg: DictConfig, parent_run_id: str | None = None) -> dict:
    return run_transfer(cfg)
