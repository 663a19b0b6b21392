"""Transferability (`python -m pipeline task=transfer`, `make transfer`): does a UAP made on one model fool
another?

    python -m pipeline task=transfer transfer.models=[tiny,resnet18] data=cxr3

For each model of `transfer.models` (config names under conf/model; trained once and cached like any
run; `name@seed` is the same architecture trained with another seed, a surrogate that differs from the victim
only in its initialisation and data order) the configured UAP is made on it, then evaluated on every
model: a matrix of test FR (TSR when targeted), rows = source model, columns = evaluated model, the diagonal
being white-box; plus the random control on each model. Every entry is evaluated on the test split of the run's
own data (`seed`): a `name@seed` surrogate is trained and attacked on its seed's data, as a single run with that
seed would be, but measured on the same test images as the others. One MLflow run with the matrix as CSV and heatmap
PNG.
"""
from __future__ import annotations

import csv
import logging

import numpy as np
import pytorch_lightning as pl
from omegaconf import DictConfig, open_dict

from pipeline import figures, files, tracking
from pipeline.attack import random_control
from pipeline.attack.build import make_uap
from pipeline.classifier import data_for, train_or_load
from pipeline.config import compose_group, validate
from pipeline.errors import ConfigError, instantiate
from pipeline.eval.metrics import attack_rate
from pipeline.eval.predictions import predict
from pipeline.job import output_dir
from pipeline.precision import device_for

log = logging.getLogger(__name__)


def model_config(name: str) -> DictConfig:
    """conf/model/<name>.yaml, composed (its shared base applied); an unknown name names transfer.models."""
    try:
        return compose_group("model", name)
    except ConfigError as e:
        raise ConfigError(f"transfer.models: {e}") from None


def model_entry(entry: str, seed: int) -> tuple[str, int]:
    """`name` or `name@seed` of transfer.models: the model config's name and the seed it is trained with."""
    name, _, s = str(entry).partition("@")
    if not s:
        return name, seed
    try:
        return name, int(s)
    except ValueError:
        raise ConfigError(f"transfer.models: {entry!r}: expected a model name, or name@seed with an integer seed "
                          f"(e.g. tiny_effnet@2)") from None


def run_transfer(cfg: DictConfig) -> dict:

    names = list(cfg.transfer.models)
    out = output_dir(cfg)
    with tracking.start_run(cfg, run_name=f"transfer-{'-'.join(names)}", tags={"task": "transfer"}):
        device = device_for(cfg)
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        dm = instantiate(cfg.data)
        dm.setup()
        nets, cfgs, dms = {}, {}, {}
        for name in names:  # every model trained (or loaded from the cache) as a single run would
            arch, seed = model_entry(name, cfg.seed)
            c = cfg.copy()
            with open_dict(c):
                c.model, c.seed = model_config(arch), seed
            validate(c)
            dms[name] = data_for(c, cfg, dm)  # another seed: its own split of the training images
            model, _ = train_or_load(c, dms[name])
            nets[name], cfgs[name] = model.net.eval(), c
        test = dm.dataset("test")
        matrix = np.zeros((len(names), len(names)))
        random_row = [0.0] * len(names)
        for i, src in enumerate(names):
            atk, uap, _ = make_uap(cfgs[src], dms[src], nets[src], device)
            target = atk.target
            rnd = random_control(uap, atk.eps, atk.norm, cfg.seed)
            for j, dst in enumerate(names):
                # the same stacked evaluation as a single run, so the diagonal equals its white-box FR
                p = predict(nets[dst], test, {"clean": None, "uap": uap, "random": rnd}, clip=atk.clip, device=device)
                matrix[i, j] = attack_rate(p["clean"], p["uap"], target)
                random_row[j] = attack_rate(p["clean"], p["random"], target)
        key = "TSR" if target is not None else "FR"
        with open(out / "transfer.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow([f"source \\ evaluated ({key}, test)", *names])
            for name, row in zip(names, matrix):
                w.writerow([name, *[f"{v:.4f}" for v in row]])
            w.writerow(["random control", *[f"{v:.4f}" for v in random_row]])
        labels = [*names, "random"]
        full = np.vstack([matrix, np.array(random_row)[None]])
        png = figures.plot_matrix(full, labels, names, out / "transfer.png",
                                f"UAP transferability: test {key} ({cfg.attack.norm}, zeta={cfg.attack.zeta}%)",
                                "evaluated on", "UAP made on")
        result = {"models": names, "metric": key, "matrix": matrix.tolist(), "random": random_row}
        files.write_json(out / "transfer.json", result, indent=1)
        for f in (out / "transfer.csv", png, out / "transfer.json"):
            tracking.log_artifact(f)
        tag = [n.replace("@", "_seed") for n in names]  # MLflow metric names take no "@"
        tracking.log_metrics({f"transfer_{key.lower()}_{s}_to_{d}": matrix[i, j]
                              for i, s in enumerate(tag) for j, d in enumerate(tag)})
        log.info("transfer matrix (%s, rows = UAP made on, columns = evaluated on):\n%s\nrandom: %s", key,
                 "\n".join(f"{n:>14} " + " ".join(f"{v:.3f}" for v in row) for n, row in zip(names, matrix)),
                 " ".join(f"{v:.3f}" for v in random_row))
    return result
