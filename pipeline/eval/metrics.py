"""Metrics on predicted class indices: accuracy, confusion, sensitivity / PPV (torchmetrics' functional
forms), and the attack's own: fooling rate, targeted success rate, `attack_rate` (the one a UAP is
judged by).

All functions take 1-D integer tensors of the same length (true labels or predictions).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_precision,
    multiclass_recall,
)


def confusion(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts: rows = true class, columns = predicted class."""
    return multiclass_confusion_matrix(preds.long(), labels.long(), num_classes)


def accuracy(labels: torch.Tensor, preds: torch.Tensor) -> float:
    """The share of correct predictions (micro accuracy)."""
    n = int(max(labels.max(), preds.max())) + 1 if len(labels) else 1
    return multiclass_accuracy(preds.long(), labels.long(), max(n, 2), average="micro").item()


def sensitivity_ppv(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> tuple[list[float], list[float]]:
    """Per-class sensitivity (recall, TP / true count) and PPV (precision, TP / predicted count); 0 where undefined."""
    args = (preds.long(), labels.long(), num_classes)
    return (multiclass_recall(*args, average=None, zero_division=0).tolist(),
            multiclass_precision(*args, average=None, zero_division=0).tolist())


def fooling_rate(clean_preds: torch.Tensor, adv_preds: torch.Tensor) -> float:
    """Fraction of images whose prediction changes when the perturbation is added (FR vs prediction)."""
    return (clean_preds != adv_preds).float().mean().item()


def fooling_rate_label(labels: torch.Tensor, adv_preds: torch.Tensor) -> float:
    """Fraction of perturbed images predicted other than their true label (the authors' FR variant)."""
    return (labels != adv_preds).float().mean().item()


def success_rate(adv_preds: torch.Tensor, target: int) -> float:
    """Targeted success rate: fraction of all images predicted as the target class."""
    return (adv_preds == target).float().mean().item()


def attack_rate(clean_preds: torch.Tensor, adv_preds: torch.Tensor, target: int | None) -> float:
    """What a UAP is judged by: its targeted success rate when it has a target, else its fooling rate."""
    return success_rate(adv_preds, target) if target is not None else fooling_rate(clean_preds, adv_preds)


def wilson(rate: float, n: float, z: float = 1.959964) -> tuple[float, float]:
    """Wilson's score interval (95 % for z = 1.96) of a rate measured on n images: a fooling rate, success rate
    or accuracy. On 303 images it is about +-0.056 at 0.5; it stays inside [0, 1] at 0 and 1. (nan, nan)
    when the rate or n is unknown."""
    if rate is None or not n or math.isnan(rate) or math.isnan(n):
        return float("nan"), float("nan")
    denom = 1 + z * z / n
    centre = (rate + z * z / (2 * n)) / denom
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def class_metrics(prefix: str, labels: torch.Tensor, preds: torch.Tensor, classes: Sequence[str]) -> dict[str, float]:
    """`{prefix}_sens_{class}` and `{prefix}_ppv_{class}` for each class."""
    sens, ppv = sensitivity_ppv(labels, preds, len(classes))
    out = {}
    for c, s, p in zip(classes, sens, ppv):
        out[f"{prefix}_sens_{c}"] = s
        out[f"{prefix}_ppv_{c}"] = p
    return out


def attack_metrics(split: str, labels: torch.Tensor, preds: dict[str, torch.Tensor], classes: Sequence[str],
                   target: int | None) -> dict[str, float]:
    """The MLflow metrics of one split, from clean / uap / random predictions (names read by the report)."""
    clean, uap, rnd = preds["clean"], preds["uap"], preds["random"]
    m = {
        f"{split}_n": float(len(labels)),  # the images each rate is over (its interval: `wilson`)
        f"{split}_acc_clean": accuracy(labels, clean),
        f"{split}_acc_uap": accuracy(labels, uap),
        f"{split}_acc_random": accuracy(labels, rnd),
        f"{split}_fr": fooling_rate(clean, uap),
        f"{split}_fr_label": fooling_rate_label(labels, uap),
        f"{split}_fr_random": fooling_rate(clean, rnd),
        f"{split}_fr_label_random": fooling_rate_label(labels, rnd),
    }
    if target is not None:
        m[f"{split}_tsr"] = success_rate(uap, target)
        m[f"{split}_tsr_random"] = success_rate(rnd, target)
        m[f"{split}_tsr_clean"] = success_rate(clean, target)
    for kind, p in preds.items():
        m.update(class_metrics(f"{split}_{kind}", labels, p, classes))
        for c, share in zip(classes, torch.bincount(p, minlength=len(classes)).float() / len(p)):
            m[f"{split}_{kind}_share_{c}"] = share.item()
    return m
