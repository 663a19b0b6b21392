"""The frame of every task (`open_job`: config checked -> data -> classifier, trained or cached -> MLflow run ->
the task -> its results, in the run folder first, then logged), the run's names and tags, and the console
summary. A library: it imports no task (pipeline/tasks/)."""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pipeline import files, precision, sweep, tracking
from pipeline.attack.build import check_queries, load_saved_uap
from pipeline.classifier import Classifier, load_classifier_file, train_or_load
from pipeline.config import defense_black_box_config, validate
from pipeline.data import CXRDataModule
from pipeline.errors import ConfigError, instantiate
from pipeline.eval.measurements import Results, classifier_metrics
from pipeline.eval.metrics import wilson
from pipeline.identity import classifier_key, is_display, job_hash

log = logging.getLogger(__name__)


def run_tags(cfg: DictConfig, dm: CXRDataModule | None = None) -> dict[str, str]:
    tags = {"config_hash": classifier_key(cfg, dm), "job_hash": job_hash(cfg, dm), "task": cfg.task}
    if cfg.get("sweep_name"):
        tags["sweep"] = cfg.sweep_name
    if os.environ.get(sweep.LAUNCHER_ENV):  # which process launched it (an interrupted sweep closes its own)
        tags["sweep_launcher"] = os.environ[sweep.LAUNCHER_ENV]
    try:
        hc = HydraConfig.get()
        tags.update({f"choice.{k}": str(v) for k, v in hc.runtime.choices.items() if not k.startswith("hydra/")})
        tags["overrides"] = " ".join(hc.overrides.task)
    except ValueError:  # not inside a Hydra app (tests composing configs directly)
        pass
    return tags


def output_dir(cfg: DictConfig) -> Path:
    try:
        out = Path(cfg.paths.output_dir)
    except Exception:  # noqa: BLE001 - ${hydra:...} does not resolve outside a Hydra app
        out = Path(cfg.paths.root_dir) / "outputs" / "runs" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    return out


@dataclass
class Job:
    """What every task gets: its config, the data, the classifier, its output folder, device, MLflow run and
    the metrics so far (clean accuracy); a task adds what it measures with `add`."""
    cfg: DictConfig
    dm: CXRDataModule
    model: Classifier
    out: Path
    device: torch.device
    run_id: str
    metrics: dict = field(default_factory=dict)
    pending: list[Results] = field(default_factory=list)

    def add(self, results: Results | dict) -> None:
        """Add a step's results: its metrics written to the run folder's metrics.json now, all of it logged at
        the job's end."""
        results = results if isinstance(results, Results) else Results(metrics=dict(results))
        self.metrics.update(results.metrics)
        self.pending.append(results)
        self.write_metrics()

    def write_metrics(self) -> Path:
        return files.write_json(self.out / "metrics.json", self.metrics, indent=2, sort_keys=True)

    def log_results(self, model_id: str | None) -> None:
        """Everything `add`ed, then the metrics (also on the classifier's model page) and metrics.json."""
        for r in self.pending:
            if r.params:
                tracking.log_params(r.params)
            if r.tags:
                tracking.set_tags(r.tags)
            for name, points in r.curves.items():
                for step, value in points:
                    tracking.log_metrics({name: value}, step=step)
            for f in r.files:
                tracking.log_artifact(f)
        tracking.log_metrics(self.metrics, model_id=model_id)
        tracking.log_artifact(self.out / "metrics.json")  # written by `add` and at the job's end


@contextmanager
def open_job(cfg: DictConfig, task: str, parent_run_id: str | None = None) -> Iterator[Job]:
    """One MLflow run around a task: the config checked, data loaded, the classifier trained or loaded from
    the cache and measured; at the end the metrics logged, written to metrics.json and summarised.
    A bad config value fails before the run opens (one line, no run); a later failure marks the run FAILED
    (KILLED when interrupted) and keeps what was logged."""
    validate(cfg)
    device = precision.device_for(cfg)
    dm: CXRDataModule = instantiate(cfg.data)  # one instance: its data fingerprint is taken once, for every key
    # a classifier_file that cannot be used fails here, before a run opens
    loaded = load_classifier_file(cfg, dm) if cfg.get("classifier_file") else None
    files.check_writable(cfg.paths.cache_dir, "paths.cache_dir")
    out = output_dir(cfg)
    name, long_name = run_names(cfg, task)
    tags = {**run_tags(cfg, dm), "long_name": long_name}
    try:
        with run_job(cfg, dm, device, out, name=name, tags=tags, parent_run_id=parent_run_id, loaded=loaded) as job:
            yield job
    except Exception as e:
        if tracking.is_busy(e):  # the store stayed locked past its busy timeout: say so, and where the results are
            raise tracking.busy_error(cfg.tracking, out) from None
        raise


@contextmanager
def run_job(cfg: DictConfig, dm: CXRDataModule, device: torch.device, out: Path, *, name: str, tags: dict,
            parent_run_id: str | None, loaded: tuple | None) -> Iterator[Job]:
    """The MLflow run of `open_job`: the classifier (`loaded` from classifier_file, or trained / from the cache)
    and its metrics, the task, then the results: in the run folder first, then logged; the run ends FINISHED
    only after its last metric and artifact."""
    with tracking.start_run(cfg, run_name=name, tags=tags, parent_run_id=parent_run_id) as mlrun:
        hydra_dir = out / ".hydra"
        if hydra_dir.is_dir():
            tracking.log_folder(hydra_dir, "hydra")
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        dm.setup()
        if cfg.attack.get("uap_file"):
            load_saved_uap(cfg, dm)  # a bad UAP file fails now, before any training
        check_queries(cfg, dm)  # so does a query budget below one pass over the input set
        black_box = defense_black_box_config(cfg) if cfg.get("task") == "defense" else None
        if black_box is not None:  # and the defense's black-box attacker's
            try:
                check_queries(black_box, dm)
            except ConfigError as e:
                raise ConfigError(f"defense.black_box_queries ({e})") from None
        model, meta = loaded or train_or_load(cfg, dm, callbacks=[tracking.TrainingCurves()])
        tracking.set_tags({"classifier_cache": meta.get("source") or ("hit" if meta["cache_hit"] else "trained"),
                           "classifier_path": meta["path"]})
        modes = precision.modes_of(model.net)
        tracking.log_params({f"precision.{loop}": str(m) for loop, m in modes.items()})
        model_id = None
        if cfg.tracking.get("log_model", True):  # the classifier as an MLflow model, this run linked to it
            model_id = tracking.log_classifier(model, Path(meta["path"]).parent, not meta["cache_hit"])["model_id"]
        clean, made = classifier_metrics(model, dm, out, device)
        job = Job(cfg, dm, model, out, device, mlrun.info.run_id, clean)
        if not meta["cache_hit"]:  # trained in this job (the report's time table counts each training once)
            job.metrics["classifier_train_seconds"] = float(meta["train_seconds"])
        tracking.log_metrics(job.metrics)  # logged now: an interrupted attack keeps them
        for f in made:
            tracking.log_artifact(f)
        try:
            yield job
        except BaseException as e:  # a later step failed or was interrupted: what the earlier ones made is logged
            if job.pending and not tracking.is_busy(e):
                try:
                    job.log_results(model_id)
                except Exception as log_error:  # noqa: BLE001 - the task's own error is the one to report
                    log.warning("could not log the results so far (%s); they are in %s", log_error, out)
            raise
        job.write_metrics()  # the results in the run folder first: a store failing now loses none of them
        log.info("%s", summary(cfg, job.metrics, dm.classes, modes))
        job.log_results(model_id)
        log.info("MLflow run %s in %s: `make ui`, then %s; files in %s", mlrun.info.run_id, cfg.tracking.uri,
                 tracking.ui_url(mlrun.info.experiment_id, mlrun.info.run_id), out)


UAP_TASKS = ("attack", "evaluate", "defense")
# overrides a run's name already says, left out of its tail (as are those that change no result: is_display)
NAMED = {"norm", "zeta", "attack.norm", "attack.zeta", "attack.target", "model", "attack", "task", "sweep"}


def job_overrides() -> list[str]:
    """This Hydra job's command-line overrides (none outside a Hydra app)."""
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def run_names(cfg: DictConfig, task: str) -> tuple[str, str]:
    """A run's short name, the telling part first (`linf z2 COVID-19 · resnet18 · sgd_uap`, then the job's other
    overrides, so the children of a sweep differ where their configs do), and its long form (tag `long_name`)."""
    a, model = cfg.attack, cfg.model.get("name") or cfg.model.arch
    uap = f"{a.norm} z{float(a.zeta):g}" + (f" {a.target}" if a.target is not None else "")
    head = {"attack": uap, "train": "train", "min_zeta": f"min_zeta {a.norm} FR {float(cfg.min_zeta.target_fr):g}"
            }.get(task, f"{task} {uap}")
    parts = [head, model, *([a.name] if task in UAP_TASKS or task == "min_zeta" else [])]
    keys = [(o, o.split("=", 1)[0].lstrip("+~")) for o in job_overrides()]
    rest = [o for o, key in keys if key not in NAMED and not is_display(key)]
    short = " · ".join(parts + ([" ".join(rest)] if rest else []))
    data = f"{cfg.data._target_.rsplit('.', 1)[-1]}({cfg.data.get('root') or ''}, {cfg.data.image_size} px)"
    long = (f"task={task} model={model} ({cfg.model.arch}) attack={a.name} norm={a.norm} zeta={a.zeta} "
            f"target={a.target} seed={cfg.seed} epochs={cfg.trainer.max_epochs} data={data}")
    return short, long


def summary(cfg: DictConfig, m: dict, classes, modes: dict | None = None) -> str:
    lo, hi = wilson(m["test_acc"], m["test_n"])
    lines = [f"result: {cfg.model.get('name') or cfg.model.arch} on {cfg.data._target_.rsplit('.', 1)[-1]} "
             f"({cfg.data.image_size} px), clean test accuracy {m['test_acc']:.3f} [{lo:.3f}, {hi:.3f}] "
             f"on {m['test_n']:.0f} images"]
    if modes:
        lines.append(f"precision={cfg.get('precision', 'auto')}: {precision.describe(modes)}")
    if "min_zeta" in m:
        lines.append(f"min_zeta: smallest zeta reaching test FR {m['min_zeta_target_fr']:.2f}: {m['min_zeta']:g}% "
                     f"(largest probed zeta below it: {m['min_zeta_below']:g}%, {m['min_zeta_probes']} probes)")
    if "eps" in m:  # a UAP was evaluated
        a = cfg.attack
        targeted = a.target is not None
        kind = f"targeted -> {a.target}" if targeted else "non-targeted"
        lines.append(f"UAP {a.name} {kind}, {a.norm}, zeta={a.zeta}% (eps={m['eps']:.4g}, "
                     f"norm {m['uap_norm']:.4g}), {m['uap_passes']} passes, {m.get('uap_queries', 0):.0f} queries in "
                     f"{m['uap_seconds']:.1f} s")
        key = "tsr" if targeted else "fr"
        lines.append(f"{'split':<6} {'n':>5} {'acc clean':>9} {'acc UAP':>8} {key.upper() + ' UAP':>8} "
                     f"{'(95% interval)':>15} {key.upper() + ' random':>11}")
        for s, label in (("train", "train"), ("test", "test"), ("transform_test", "test*")):
            if f"{s}_{key}" not in m:
                continue
            lo, hi = wilson(m[f"{s}_{key}"], m[f"{s}_n"])
            lines.append(f"{label:<6} {m[f'{s}_n']:>5.0f} {m[f'{s}_acc_clean']:>9.3f} {m[f'{s}_acc_uap']:>8.3f} "
                         f"{m[f'{s}_{key}']:>8.3f} {f'[{lo:.3f}, {hi:.3f}]':>15} {m[f'{s}_{key}_random']:>11.3f}")
        if "transform_test_n" in m:
            how = "; the search went through it too (attack.adaptive)" if a.get("adaptive") else ""
            lines.append(f"test*: the test images through transform={','.join(cfg.transform)} (clean, UAP and random "
                         f"alike){how}")
    return "\n".join(lines)
