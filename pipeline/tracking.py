"""MLflow tracking: one run per job, flattened config as params, tags, artifacts; failures marked FAILED."""
from __future__ import annotations

import contextlib
import logging
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from pipeline.errors import UserError

log = logging.getLogger(__name__)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists are kept as their string form."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def check_reachable(uri: str) -> None:
    """An http(s) tracking server must answer before any work starts."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"tracking.uri={uri}: MLflow server not reachable ({getattr(e, 'reason', e)}). "
                        f"Start one with `make server`, or use the default tracking=sqlite") from None


def store_lock(uri: str) -> contextlib.AbstractContextManager:
    """A file lock beside a SQLite store: MLflow creates and migrates its tables on first use, and two
    processes doing so at once corrupt a new store (`table _alembic_tmp_... already exists`). A server
    serialises this itself."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(db) + ".lock")


def setup(tracking: DictConfig) -> str:
    """Point MLflow at the store and return the experiment id (created with our artifact root).

    The store's first use (creating or migrating its tables) and the experiment's creation happen under
    `store_lock`, so jobs started at the same moment in a fresh folder neither race nor fail."""
    check_reachable(tracking.uri)
    mlflow.set_tracking_uri(tracking.uri)
    with store_lock(tracking.uri):
        exp = mlflow.get_experiment_by_name(tracking.experiment)
        if exp is not None:
            return exp.experiment_id
        location = Path(tracking.artifact_root).resolve().as_uri() if tracking.get("artifact_root") else None
        try:
            return mlflow.create_experiment(tracking.experiment, artifact_location=location)
        except mlflow.exceptions.MlflowException:  # created meanwhile by a job on another machine
            return mlflow.get_experiment_by_name(tracking.experiment).experiment_id


def config_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved job config, flattened (hydra's own settings left out)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    return {k: str(v)[:6000] for k, v in flatten(container).items()}


@contextlib.contextmanager
def start_run(cfg: DictConfig, run_name: str | None = None, tags: dict | None = None,
              parent_run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for this job: params and tags logged at once; FAILED/KILLED with an `error` tag on failure.

    Whatever was logged before the failure stays in the store.
    """
    exp_id = setup(cfg.tracking)
    all_tags = {"git_commit": git_commit(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=all_tags, nested=parent_run_id is not None)
    try:
        mlflow.log_params(config_params(cfg))
        yield run
    except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C / SIGTERM (Lightning turns them into SystemExit)
        mlflow.set_tag("error", f"interrupted ({type(e).__name__}: {e})")
        mlflow.end_run("KILLED")
        raise
    except BaseException as e:
        mlflow.set_tag("error", f"{type(e).__name__}: {e}"[:5000])
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path)


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
