"""Figures written as PNG: UAP images, example grids, confusion matrices."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_uap(uap: np.ndarray, path: Path, title: str = "UAP") -> Path:
    """The UAP (H, W) on a symmetric diverging scale, with a colour bar in image units."""
    lim = float(np.abs(uap).max()) or 1.0
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    im = ax.imshow(uap, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def confusion_figure(conf: torch.Tensor | np.ndarray, classes: Sequence[str], title: str):
    """Rows: true class, columns: predicted; each cell the count and its share of the true class (the row),
    coloured by that share (class sizes may differ)."""
    conf = np.asarray(conf)
    total = conf.sum(axis=1, keepdims=True)
    share = conf / np.maximum(total, 1)
    fig, ax = plt.subplots(figsize=(4.2, 3.7))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(conf.shape[0]):
        for j in range(conf.shape[1]):
            ax.text(j, i, f"{int(conf[i, j])}\n{share[i, j]:.0%}", ha="center", va="center",
                    color="white" if share[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(len(classes)), classes, rotation=30, fontsize=8)
    ax.set_yticks(range(len(classes)), [f"{c} ({int(n)})" for c, n in zip(classes, total[:, 0])], fontsize=8)
    ax.set_xlabel("predicted  (cells: count, % of the true class)", fontsize=8)
    ax.set_ylabel("true (images)", fontsize=8)
    ax.set_title(title, fontsize=9)
    return fig


def plot_confusion(conf: torch.Tensor | np.ndarray, classes: Sequence[str], path: Path, title: str) -> Path:
    return _save(confusion_figure(conf, classes, title), path)


def amplified(uap: np.ndarray) -> tuple[np.ndarray, float]:
    """The UAP scaled to the full grey range (0 at mid-grey, the largest |v| at black or white), as the paper's
    figures show it, and the factor."""
    lim = float(np.abs(uap).max()) or 1.0
    return 0.5 + uap * (0.5 / lim), 0.5 / lim


def examples_figure(images: torch.Tensor, uap: torch.Tensor, labels, clean_pred, adv_pred, classes: Sequence[str],
                    clip: bool = False, n: int = 6, title: str = ""):
    """Clean (top row) vs perturbed (bottom row) images with true / clean / perturbed predictions, and a last
    column with the perturbation amplified to the full range.

    Not torchvision's make_grid: each tile needs its own title (the predictions, red where fooled), which
    a single grid image cannot carry."""
    n = min(n, len(images))
    fig = plt.figure(figsize=(1.9 * (n + 2), 4.5 if title else 4.2))
    grid = fig.add_gridspec(2, n + 1, width_ratios=[1] * n + [2])  # the perturbation: twice as large
    v = uap.numpy()
    for k in range(n):
        clean = images[k, 0].numpy()
        adv = clean + v
        if clip:
            adv = np.clip(adv, 0, 1)
        for row, (img, pred) in enumerate(((clean, clean_pred[k]), (adv, adv_pred[k]))):
            ax = fig.add_subplot(grid[row, k])
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            ax.axis("off")
            fooled = row == 1 and int(adv_pred[k]) != int(clean_pred[k])
            head = f"true {classes[int(labels[k])]}\n" if row == 0 else ""
            ax.set_title(f"{head}{'clean' if row == 0 else 'UAP'}: {classes[int(pred)]}", fontsize=7,
                         color="red" if fooled else "black")
    ax = fig.add_subplot(grid[:, n])
    img, factor = amplified(v)
    ax.imshow(img, cmap="gray", vmin=0, vmax=1)
    ax.axis("off")
    ax.set_title(f"UAP v, amplified\n(x{factor:.3g}, mid-grey = 0)", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_examples(images: torch.Tensor, uap: torch.Tensor, labels, clean_pred, adv_pred, classes: Sequence[str],
                  path: Path, clip: bool = False, n: int = 6, title: str = "") -> Path:
    """`examples_figure` as PNG."""
    return _save(examples_figure(images, uap, labels, clean_pred, adv_pred, classes, clip, n, title), path)


def plot_defense(history: list[dict], key: str, path: Path, stage: str = "fine-tuning round") -> Path:
    """Clean accuracy and FR / TSR of a fresh UAP, of the UAP the stage trained against, of the undefended
    model's UAP (and of a fresh black-box UAP, when measured) vs the defense's stage."""
    r = [h["round"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(r, [h["defense_acc_clean"] for h in history], "o-", label="clean accuracy")
    ax.plot(r, [h[f"defense_{key}_fresh"] for h in history], "s-", label=f"{key.upper()} of a fresh UAP")
    ax.plot(r[1:], [h[f"defense_{key}_prev"] for h in history][1:], "^--",
            label=f"{key.upper()} of the UAP trained against")
    ax.plot(r, [h[f"defense_{key}_undefended"] for h in history], "v:",
            label=f"{key.upper()} of the undefended model's UAP")
    if f"defense_{key}_black_box" in history[0]:
        ax.plot(r, [h[f"defense_{key}_black_box"] for h in history], "d-.",
                label=f"{key.upper()} of a fresh black-box UAP")
    ax.set_xlabel(stage)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(r)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("defense against UAPs (test)", fontsize=9)
    return _save(fig, path)


def plot_matrix(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], path: Path, title: str,
                xlabel: str, ylabel: str) -> Path:
    """A heatmap with the values written in the cells (e.g. the transferability matrix)."""
    fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 2.5, 1.0 * len(rows) + 1.8))
    im = ax.imshow(matrix, cmap="magma", vmin=0, vmax=1)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center",
                    color="black" if matrix[i, j] > 0.5 else "white", fontsize=9)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def plot_curves(curves: dict[str, list[tuple[float, float]]], path: Path, title: str, xlabel: str, ylabel: str,
                logx: bool = False) -> Path:
    """One line per named curve of (x, y) points."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", ms=3, label=name)
    if logx:
        ax.set_xscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)
