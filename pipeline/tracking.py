"""MLflow tracking: one run per job, flattened config as params, tags, artifacts; failures marked FAILED."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import psutil
import pytorch_lightning as pl
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from pipeline import files
from pipeline.errors import StorageError, UserError

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


def db_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (its query, `?timeout=...`, left out); None for another store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def store_uri(uri: str, busy_timeout: float | None = None) -> str:
    """The URI MLflow is given. A SQLite store waits up to `busy_timeout` seconds for a lock that another process
    holds (sqlite3's own default is 5 s, after which every call fails with `database is locked`); a URI that
    already sets `timeout=` and other stores are kept as they are."""
    if db_file(uri) is None or not busy_timeout or "timeout=" in uri:
        return uri
    return f"{uri}{'&' if '?' in uri else '?'}timeout={float(busy_timeout):g}"


def set_store(uri: str, busy_timeout: float | None = None) -> None:
    """Point this process's MLflow at the store (a SQLite one waiting up to `busy_timeout` s for its lock)."""
    mlflow.set_tracking_uri(store_uri(uri, busy_timeout))


def client() -> mlflow.MlflowClient:
    """A client of the store this process points at (runs other than the active one: a sweep's parent)."""
    return mlflow.MlflowClient()


def search(experiment_id: str, filter_string: str, order_by: list[str] | None = None,
           max_results: int = 10000) -> list:
    """The runs of an experiment that match an MLflow filter, as Run objects (their params, metrics and tags as
    dicts, metric names with slashes kept)."""
    return mlflow.search_runs([experiment_id], filter_string=filter_string, order_by=order_by,
                              max_results=max_results, output_format="list")


def log_metrics_to(run_id: str, metrics: dict[str, float]) -> None:
    """Metrics logged to a run that is not this process's active one, in one batch."""
    now = int(time.time() * 1000)
    client().log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), now, 0) for k, v in metrics.items()])


def store_identity(uri: str) -> str:
    """What names one store whatever the working folder or the spelling: a SQLite file's resolved path, a
    server's URI. Anything a cache keeps about a store is keyed by it."""
    db = db_file(uri)
    return f"sqlite:///{db.expanduser().resolve()}" if db is not None else uri.rstrip("/")


def is_busy(e: BaseException) -> bool:
    """The store stayed locked by another process longer than the busy timeout (`database is locked`)."""
    while e is not None:
        if "database is locked" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def busy_error(tracking: DictConfig, folder: Path | None = None) -> StorageError:
    kept = f"; this job's results so far are in {folder} (metrics.json, uap.npy)" if folder else ""
    return StorageError(f"MLflow store {tracking.uri} stayed locked by another process for more than "
                        f"tracking.busy_timeout={tracking.get('busy_timeout')} s (database is locked){kept}: "
                        "rerun the same command when the store is free, or raise tracking.busy_timeout")


def store_lock(uri: str) -> contextlib.AbstractContextManager:
    """A file lock beside a SQLite store: MLflow creates and migrates its tables on first use, and two
    processes doing so at once corrupt a new store (`table _alembic_tmp_... already exists`). A server
    serialises this itself."""
    db = db_file(uri)
    if db is None:
        return contextlib.nullcontext()
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(db) + ".lock")


# The MLflow UI: an experiment of kind "custom model development" opens on its runs table, not on MLflow 3's
# GenAI overview (MLflow 3.17's UI reads the kind from `?workflowType=machine_learning` instead, so `ui_url`
# adds that too). VIEW_KEY names a saved view of the runs table (the experiment tag
# `mlflow.sharedViewState.<key>`, opened by `?viewStateShareKey=<key>`) with the columns people compare.
VIEW_KEY = "uap-cxr"
DEFAULT_COLUMNS = ["metrics.`test/fr`", "metrics.`test/fr_random`", "metrics.`test/tsr`", "metrics.`test/tsr_random`",
                   "metrics.`test/acc_clean`", "metrics.`classifier/test_acc`", "params.`attack.zeta`",
                   "params.`attack.norm`", "params.`attack.target`", "params.`model.name`", "params.`attack.name`",
                   "attributes.`Duration`"]


def experiment_tags() -> dict[str, str]:
    view = {"selectedColumns": DEFAULT_COLUMNS, "orderByKey": "attributes.start_time", "orderByAsc": False,
            "runsHiddenMode": "SHOW_ALL"}
    return {"mlflow.experimentKind": "custom_model_development",
            f"mlflow.sharedViewState.{VIEW_KEY}": json.dumps(view),
            "mlflow.note.content": "UAPs against chest X-ray classifiers (uap-cxr). Columns: test FR / TSR of the "
                                   f"UAP and its random control, clean accuracy, zeta, norm, target: open "
                                   f"`#/experiments/<id>/runs?viewStateShareKey={VIEW_KEY}`."}


def ui_url(experiment_id: str, run_id: str | None = None, base: str = "http://127.0.0.1:5000") -> str:
    """The UI page of the experiment's runs table with the default columns, or of one run."""
    page = f"runs/{run_id}" if run_id else f"runs?viewStateShareKey={VIEW_KEY}&workflowType=machine_learning"
    return f"{base}/#/experiments/{experiment_id}/{page}"


def setup(tracking: DictConfig) -> str:
    """Point MLflow at the store and return the experiment id (created with our artifact root and tagged with
    `experiment_tags`, an existing one tagged where its tags are missing).

    The store's first use (creating or migrating its tables) and the experiment's creation happen under
    `store_lock`, so jobs started at the same moment in a fresh folder neither race nor fail."""
    check_reachable(tracking.uri)
    mlflow.set_tracking_uri(store_uri(tracking.uri, tracking.get("busy_timeout")))
    try:
        return open_experiment(tracking)
    except Exception as e:
        if is_busy(e):
            raise busy_error(tracking) from None
        raise


def open_experiment(tracking: DictConfig) -> str:
    with store_lock(tracking.uri):
        exp = mlflow.get_experiment_by_name(tracking.experiment)
        if exp is None:
            location = Path(tracking.artifact_root).resolve().as_uri() if tracking.get("artifact_root") else None
            try:
                mlflow.create_experiment(tracking.experiment, artifact_location=location)
            except mlflow.exceptions.MlflowException:  # created meanwhile by a job on another machine
                pass
            exp = mlflow.get_experiment_by_name(tracking.experiment)
        client = mlflow.MlflowClient()
        for k, v in experiment_tags().items():
            if exp.tags.get(k) != v and not (k == "mlflow.note.content" and k in exp.tags):  # keep a user's note
                client.set_experiment_tag(exp.experiment_id, k, v)
        return exp.experiment_id


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
    close_dead_runs(exp_id)
    # `process`: the process running it, so that a run it never closes (SIGKILL, the OOM killer) is closed later
    all_tags = {"git_commit": git_commit(), "process": this_process(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=all_tags, nested=parent_run_id is not None,
                           log_system_metrics=bool(cfg.tracking.get("system_metrics", False)))
    try:
        mlflow.log_params(config_params(cfg))
        yield run
    except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C / SIGTERM (Lightning turns them into SystemExit)
        close_run("KILLED", f"interrupted ({type(e).__name__}: {e})", e)
        raise
    except BaseException as e:
        close_run("FAILED", f"{type(e).__name__}: {e}"[:5000], e)
        raise
    else:
        mlflow.end_run("FINISHED")


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def process_alive(tag: str, since: float) -> bool:
    """The process `host:pid` runs and started before `since` (epoch seconds; a later process under the same pid
    is another); processes on other hosts are assumed to run."""
    host, _, pid = tag.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        return psutil.Process(int(pid)).create_time() <= since + 1
    except psutil.Error:
        return False


def close_dead_runs(experiment_id: str, parent_id: str | None = None, alive=process_alive) -> int:
    """Mark KILLED the runs still RUNNING (of one parent, or of the whole experiment) whose process is gone: its
    `process` tag (else, for a sweep's child, its `sweep_launcher`) names a process of this host that no longer
    runs. A job killed with SIGKILL, out of memory or by a time limit never closed its run; the next run in the
    store, or the sweep's resume, closes it. Returns how many."""
    client = mlflow.MlflowClient()
    filt = "attributes.status = 'RUNNING'" + (f" and tags.mlflow.parentRunId = '{parent_id}'" if parent_id else "")
    runs = mlflow.search_runs([experiment_id], output_format="list", max_results=10000, filter_string=filt)
    closed = 0
    for r in runs:
        tag = r.data.tags.get("process") or (r.data.tags.get("sweep_launcher") if parent_id else None)
        if tag and not alive(tag, r.info.start_time / 1000):
            client.set_tag(r.info.run_id, "error", f"killed: its process ({tag}) ended without closing the run")
            client.set_terminated(r.info.run_id, "KILLED")
            closed += 1
    if closed:
        log.warning("%d run(s) left RUNNING by a process that is gone: marked KILLED", closed)
    return closed


def close_run(status: str, error: str, cause: BaseException) -> None:
    """End the active run with `status` and its `error` tag; where the store itself fails (still locked past
    the busy timeout) the run is left open (a resumed sweep closes it) and the original error goes on."""
    if is_busy(cause):  # every call to the store would wait out the timeout again: forget the run here only
        from mlflow.tracking import fluent  # MLflow's private run stack: touched only here, on this failure
        with contextlib.suppress(Exception):
            fluent._active_run_stack.get().pop()
        return
    try:
        mlflow.set_tag("error", error)
        mlflow.end_run(status)
    except Exception as e:  # noqa: BLE001 - the store's own failure must not hide the job's
        log.warning("could not mark the MLflow run %s (%s: %s)", status, type(e).__name__, str(e)[:200])
        with contextlib.suppress(Exception):
            mlflow.end_run(status)  # at least forget it in this process


def log_classifier(model, cache_entry: Path, trained: bool) -> dict:
    """Link this run to its classifier. A trained classifier is logged as an MLflow model (its weights and
    architecture, loadable with `mlflow.pytorch.load_model`) and registered as `uap-cxr-<model name>`, one
    version per trained classifier; a cached one is logged once per store (the first run that uses it there).
    The run is tagged with the model's URI, its registered version and the id of the run that logged it; the
    link is kept in the cache entry (`mlflow.json`, keyed by the store's absolute identity, and used only when
    that store still holds the model: a store deleted and made anew at the same path does not)."""
    uri = store_identity(mlflow.get_tracking_uri())
    run_id = mlflow.active_run().info.run_id
    writable = os.access(cache_entry, os.W_OK)  # a classifier_file in a read-only folder: no link kept there
    with FileLock(str(cache_entry / ".mlflow.lock")) if writable else contextlib.nullcontext():
        path = cache_entry / "mlflow.json"
        links = json.loads(path.read_text()) if path.is_file() else {}
        info = links.get(uri)
        if info is not None and not trained and not in_store(info):
            log.info("the classifier's MLflow model %s is not in this store: logging it again", info.get("model_id"))
            info = None
        if info is None or trained:
            import timm  # the three for logging a model only (mlflow.pytorch takes seconds to import)
            import torch
            from mlflow import pytorch as mlflow_pytorch
            name = f"uap-cxr-{model.name}"
            requirements = [f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}"]
            quiet = logging.getLogger("mlflow.pytorch")  # its warning on pickle: chosen here (timm's own classes)
            level, _ = quiet.level, quiet.setLevel(logging.ERROR)
            try:
                logged = mlflow_pytorch.log_model(
                    model.net, name=f"classifier-{model.name}", registered_model_name=name,
                    serialization_format="pickle", pip_requirements=requirements)
            finally:
                quiet.setLevel(level)
            info = {"run_id": run_id, "model_uri": logged.model_uri, "model_id": logged.model_id,
                    "registered": f"models:/{name}/{logged.registered_model_version}"}
            links[uri] = info
            if writable:
                files.write_json(path, links, indent=1)
    mlflow.set_tags({"classifier_run_id": info["run_id"], "classifier_model": info["model_uri"],
                     "classifier_registered": info["registered"]})
    return info


def in_store(info: dict) -> bool:
    """The run and the logged model a cache entry's link names exist in the current store."""
    client = mlflow.MlflowClient()
    try:
        client.get_run(info["run_id"])
        if info.get("model_id"):
            client.get_logged_model(info["model_id"])
        return True
    except Exception as e:  # not found (or a link of another form): log the model anew
        if is_busy(e):
            raise
        return False


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path)


# MLflow groups metrics by the part of the name before "/" (one section of charts each). The code and
# metrics.json use flat names (`test_fr`); MLflow gets grouped ones (`test/fr`); `flat_metrics` reads both
# back as flat names, so stores written before the grouping still report.
UAP_KEYS = {"eps": "eps", "zeta": "zeta", "uap_norm": "norm", "random_norm": "random_norm",
            "uap_seconds": "seconds", "uap_passes": "passes", "uap_queries": "queries",  # images sent to the victim
            "input_fr": "input_fr", "input_tsr": "input_tsr",
            "uap_pass_input_fr": "pass_input_fr",  # the input-set FR after each pass of the search (a curve)
            "uap_pass_queries": "pass_queries"}  # the queries used by the end of each pass (a curve)
CLASSIFIER = re.compile(r"(val|test)_(acc|n|sens_.+|ppv_.+)")  # the classifier's own (the attack's: test_clean_sens_..)


def log_params(params: Mapping[str, Any]) -> None:
    mlflow.log_params(dict(params))


def set_tags(tags: Mapping[str, Any]) -> None:
    mlflow.set_tags(dict(tags))


def log_folder(folder: Path, artifact_path: str) -> None:
    """Every file of a folder (a run's .hydra/) as artifacts under `artifact_path`."""
    mlflow.log_artifacts(str(folder), artifact_path)


def run_metrics(run_id: str) -> dict[str, float]:
    """A run's metrics under the code's flat names (test_fr for MLflow's test/fr)."""
    return flat_metrics(mlflow.get_run(run_id).data.metrics)


# flat metric names `<group>_<rest>` shown in MLflow as `<group>/<rest>` (transform: the test split seen through
# the hospital's pipeline, `transform_test_fr` -> `transform/test_fr`)
GROUPED = ("train", "test", "defense", "probe", "transform")


def mlflow_key(flat: str) -> str:
    """`test_fr` -> `test/fr`, `test_acc` -> `classifier/test_acc`, `uap_seconds` -> `uap/seconds`,
    `defense_acc_clean` -> `defense/acc_clean`; a name already grouped is kept."""
    if "/" in flat:
        return flat
    if flat in UAP_KEYS:
        return f"uap/{UAP_KEYS[flat]}"
    if CLASSIFIER.fullmatch(flat):
        return f"classifier/{flat}"
    group, _, rest = flat.partition("_")
    if group in GROUPED and rest:
        return f"{group}/{rest}"
    if flat.startswith("min_zeta"):
        return f"min_zeta/{flat[len('min_zeta_'):] or 'zeta'}"
    return flat


def flat_key(name: str) -> str:
    """The inverse of `mlflow_key` (a flat name is kept)."""
    group, sep, rest = name.partition("/")
    if not sep:
        return name
    if group == "uap":
        return {v: k for k, v in UAP_KEYS.items()}.get(rest, f"uap_{rest}")
    if group == "classifier":
        return rest
    if group == "min_zeta":
        return "min_zeta" if rest == "zeta" else f"min_zeta_{rest}"
    return f"{group}_{rest}" if group in GROUPED else name  # fit/...: Lightning's


def model_name(run) -> str:
    """A run's model, one name everywhere: the config's `model.name`; for runs logged before it, the config
    group chosen (`choice.model` tag), else the timm arch."""
    p = run.data.params
    return p.get("model.name") or run.data.tags.get("choice.model") or p.get("model.arch", "?")


def run_target(run) -> str | None:
    """A run's UAP target class, None for a non-targeted UAP (MLflow holds a null param as "None")."""
    target = run.data.params.get("attack.target")
    return None if target in (None, "None", "null", "") else target


def result_keys(run) -> list[str]:
    """The metrics a run of its task must hold for its result to be complete: those the report and the sweep
    summary read (clean accuracy; a UAP's test FR, or TSR when targeted, and its random control; ...)."""
    task = run.data.tags.get("task") or run.data.params.get("task")
    keys = ["test_acc"] if task != "transfer" else []
    if task in ("attack", "evaluate", "defense"):
        key = "tsr" if run_target(run) else "fr"
        keys += [f"test_{key}", f"test_{key}_random", f"train_{key}", "eps"]
    if task == "defense":
        keys.append("defense_acc_clean_after")
    if task == "min_zeta":
        keys.append("min_zeta")
    return keys


def complete(run) -> bool:
    """A run is a done job only when FINISHED with its whole result (`result_keys`): a run that says FINISHED
    without it (one closed before its result was logged) is redone."""
    metrics = flat_metrics(run.data.metrics)
    return run.info.status == "FINISHED" and all(k in metrics for k in result_keys(run))


def flat_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """A run's metrics (`run.data.metrics`) under the flat names the code uses, from old or new stores."""
    return {flat_key(k): v for k, v in metrics.items()}


def log_metrics(metrics: Mapping[str, float], step: int | None = None, model_id: str | None = None) -> None:
    """Metrics under MLflow's grouped names; with `model_id` also shown on that logged model's page."""
    mlflow.log_metrics({mlflow_key(k): float(v) for k, v in metrics.items()}, step=step, model_id=model_id)


class TrainingCurves(pl.Callback):
    """The classifier's training curves (`fit/...`, one point per epoch) into the job's open run, through this
    module like every other metric. The run stays open: the job ends it after its last metric and artifact. A
    store locked past its busy timeout costs a point of the curves (warned), never the training."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the epoch's validation: its train and validation means (not the per-step values)
        m = {k: float(v) for k, v in trainer.callback_metrics.items()
             if k.startswith("fit/") and not k.endswith("_step")}
        if not m:
            return
        try:
            log_metrics(m, step=trainer.current_epoch)
        except Exception as e:
            if not is_busy(e):
                raise
            log.warning("training curves: epoch %d not logged, the MLflow store is locked by another process",
                        trainer.current_epoch)


# --------------------------------------------------------------------------- reading the store back

def finished_attack_runs(experiment: str, sweep: str | None) -> list:
    """FINISHED attack runs of the experiment (or of one sweep) with their whole result; the newest per identical
    job config."""
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"report: no experiment {experiment!r} in {mlflow.get_tracking_uri()}")
    filt = "attributes.status = 'FINISHED' and params.task = 'attack'"
    if sweep:
        try:
            parent = mlflow.get_run(sweep)
            filt += f" and tags.mlflow.parentRunId = '{parent.info.run_id}'"
        except Exception:  # noqa: BLE001 - not a run id: a sweep name
            filt += f" and tags.sweep = '{sweep}'"
    # Run objects rather than search_runs' DataFrame: the figures read each run's artifacts by run id, and the
    # metric names that hold a slash or a class name stay dict keys instead of mangled column names
    runs = mlflow.search_runs([exp.experiment_id], filter_string=filt, output_format="list", max_results=50000,
                              order_by=["attributes.start_time DESC"])
    done = [r for r in runs if complete(r)]
    if len(done) < len(runs):  # FINISHED without their result (closed early): left out, rerun on the sweep's resume
        log.warning("report: %d FINISHED run(s) lack their result metrics and are left out", len(runs) - len(done))
    newest = {}
    for r in done:
        newest.setdefault(r.data.tags.get("job_hash", r.info.run_id), r)
    if not newest:
        raise SystemExit(f"report: no FINISHED attack runs{' for sweep ' + sweep if sweep else ''} in {experiment!r}")
    return list(newest.values())


def read_artifact(run_id: str, name: str, load):
    """Download one artifact of a run into a temporary folder and load it."""
    with tempfile.TemporaryDirectory() as tmp:
        return load(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=tmp))
