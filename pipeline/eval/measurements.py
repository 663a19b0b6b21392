"""Measurements tasks share: the classifier's on the clean splits, and a UAP's (made or loaded) against its
random control on train, test and its input set; each writes its figures into the run folder, and returns a
`Results` that the job logs (pipeline.job)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from pipeline import figures, files
from pipeline.attack import lp_norms, random_control
from pipeline.attack.build import build_attack, input_set, load_saved_uap, make_uap
from pipeline.classifier import data_for, train_or_load
from pipeline.config import surrogate_config
from pipeline.data import CXRDataModule
from pipeline.eval import transforms
from pipeline.eval.metrics import accuracy, attack_metrics, class_metrics, confusion, fooling_rate, success_rate
from pipeline.eval.predictions import predict

TRANSFORMED = "transform_test"  # the metrics' prefix for the test split seen through `transform`


@dataclass
class Results:
    """What a step of a task measured and made: kept in the run folder at once (metrics.json, its files) and
    logged to MLflow at the job's end, so that a store that fails then (locked past its busy timeout) loses
    nothing. `curves`: a metric's value per step (the search's input FR per pass)."""
    metrics: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def classifier_metrics(model, dm: CXRDataModule, out: Path, device) -> tuple[dict[str, float], list[Path]]:
    """Clean accuracy and per-class sensitivity / PPV on val and test; the test confusion matrix as PNG (the
    files made, for the job to log)."""
    metrics, made = {}, []
    for split in ("val", "test"):
        ds = dm.dataset(split)
        if len(ds) == 0:
            continue
        pred = predict(model.net, ds, {"clean": None}, device=device)["clean"]
        metrics[f"{split}_n"] = float(len(ds))
        metrics[f"{split}_acc"] = accuracy(ds.labels, pred)
        metrics.update(class_metrics(split, ds.labels, pred, dm.classes))
        if split == "test":
            conf = confusion(ds.labels, pred, dm.num_classes)
            made.append(figures.plot_confusion(conf, dm.classes, out / "confusion_classifier.png",
                                               f"{getattr(model, 'name', 'classifier')}, test, clean "
                                               f"(acc {metrics['test_acc']:.3f})"))
    return metrics, made


def evaluate_uap(cfg: DictConfig, dm: CXRDataModule, net, out: Path, device) -> Results:
    """Make (or load) the UAP on the input set, evaluate it and its random control on train and test; the UAP
    (uap.npy) and the figures are written to `out` before anything is logged."""
    surrogate = surrogate_config(cfg)
    if cfg.attack.get("uap_file"):
        atk, _ = build_attack(cfg, dm, net)
        uap, seconds = load_saved_uap(cfg, dm), 0.0
    elif surrogate is not None:  # transferred: made white-box on the surrogate, then applied to the victim
        sdm = data_for(surrogate, cfg, dm)  # another seed: its own split of the training images
        atk, uap, seconds = make_uap(surrogate, sdm, train_or_load(surrogate, sdm)[0].net.eval(), device)
    else:
        atk, uap, seconds = make_uap(cfg, dm, net, device)
    uap_file = files.write_npy(out / "uap.npy", uap[0].numpy().astype(np.float32))
    passes = atk.passes
    results = Results(params={"attack.eps": f"{atk.eps:.8g}", "attack.n_inputs": atk.n_inputs},
                      curves={"uap_pass_input_fr": [(h["pass"], h["fr"]) for h in atk.history if h["pass"] > 0],
                              "uap_pass_queries": [(h["pass"], h.get("queries", 0)) for h in atk.history
                                                   if h["pass"] > 0]})
    if atk.best is not None:  # keep: best / candidates: where the returned UAP came from
        results.tags["uap_best_from"] = atk.best["from"]
    rnd = random_control(uap, atk.eps, atk.norm, cfg.seed)
    metrics = {"eps": atk.eps, "zeta": atk.zeta, "uap_norm": lp_norms(uap[None], atk.norm).item(),
               "random_norm": lp_norms(rnd[None], atk.norm).item(), "uap_seconds": seconds, "uap_passes": passes,
               "uap_queries": 0 if surrogate is not None else atk.queries}  # images sent to the victim
    preds = {}
    for split in ("train", "test"):
        ds = dm.dataset(split)
        preds[split] = predict(net, ds, {"clean": None, "uap": uap, "random": rnd}, clip=atk.clip, device=device)
        metrics.update(attack_metrics(split, ds.labels, preds[split], dm.classes, atk.target))
    metrics.update(input_metrics(cfg, dm, net, uap, atk, preds["train"], device))
    pipe = transforms.build(cfg.get("transform"))
    if pipe:  # the test split again through the hospital's pipeline: what of the UAP survives it
        test = dm.dataset("test")
        p = predict(net, test, {"clean": None, "uap": uap, "random": rnd}, clip=atk.clip, device=device,
                    transform=pipe, seed=cfg.seed)
        metrics.update(attack_metrics(TRANSFORMED, test.labels, p, dm.classes, atk.target))
        results.params["transform"] = str(pipe)
    title = (f"{'targeted ' + atk.target_name if atk.targeted else 'non-targeted'} UAP, {atk.norm}, "
             f"zeta={atk.zeta:g}% (eps={atk.eps:.4g})")
    made = [uap_file, figures.plot_uap(uap[0].numpy(), out / "uap.png",
                                             f"{cfg.model.get('name') or cfg.model.arch}: {title}")]
    test = dm.dataset("test")
    p = preds["test"]
    made.append(figures.plot_examples(test.images[:8].float() / 255, uap[0], test.labels[:8], p["clean"][:8],
                                     p["uap"][:8], dm.classes, out / "examples.png", clip=atk.clip, n=6,
                                     title=f"{cfg.model.get('name') or cfg.model.arch}: {title}, test images"))
    for kind in ("clean", "uap", "random"):
        conf = confusion(test.labels, p[kind], dm.num_classes)
        made.append(figures.plot_confusion(conf, dm.classes, out / f"confusion_{kind}.png",
                                         f"{cfg.model.get('name') or cfg.model.arch}, test, {kind}\n{title}"))
    results.metrics, results.files = metrics, made
    return results


def input_metrics(cfg: DictConfig, dm: CXRDataModule, net, uap, atk, train_preds, device) -> dict[str, float]:
    """The UAP's rates on its own input set (`input_fr`, targeted also `input_tsr`): what the search optimised,
    and where the warm start's guarantees hold. The train split's when it is the input set."""
    inputs, train = input_set(cfg, dm), dm.dataset("train")
    own = (cfg.attack.get("input_source") or "train") == "train"
    if own and cfg.attack.input_split == "train" and len(inputs) == len(train):
        p = train_preds
    else:
        p = predict(net, inputs, {"clean": None, "uap": uap}, clip=atk.clip, device=device)
    m = {"input_fr": fooling_rate(p["clean"], p["uap"])}
    if atk.targeted:
        m["input_tsr"] = success_rate(p["uap"], atk.target)
    return m
