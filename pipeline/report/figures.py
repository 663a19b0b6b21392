"""The report's figures, from its rows (pipeline.report.__main__.row_of) and the runs' artifacts: FR / TSR vs zeta
per model and norm with the random control, the UAPs at the headline zeta, and the confusion matrices of the
headline setting."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.eval.metrics import wilson  # noqa: E402
from pipeline.report.tables import TARGET_ORDER, group_key, group_label, headline  # noqa: E402
from pipeline.tracking import read_artifact  # noqa: E402

log = logging.getLogger("pipeline.report")


def plot_vs_zeta(rows: list[dict], out: Path) -> Path:
    """Test FR / TSR vs zeta, one panel per (data, model, norm), one line per attack, target and config group
    (labelled by the values that tell it apart): never two points at one zeta on a line."""
    panels = sorted({(r["data"], r["model"], r["norm"]) for r in rows})
    cells = sorted({p[:2] for p in panels})
    norms = sorted({p[2] for p in panels})
    many_data = len({p[0] for p in panels}) > 1
    fig, axes = plt.subplots(len(cells), len(norms), figsize=(4.8 * len(norms), 3.6 * len(cells)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (data, model) in enumerate(cells):
        for j, norm in enumerate(norms):
            ax = axes[i, j]
            sel = [r for r in rows if (r["data"], r["model"], r["norm"]) == (data, model, norm)]
            if not sel:  # this model was not run with this norm
                ax.axis("off")
                continue
            first = {}
            for r in sel:
                first.setdefault((r["attack"], r["target"], r.get("group", ())), r)
            series = sorted(first, key=lambda s: (s[0], TARGET_ORDER.get(s[1], 9), group_key(first[s])))
            many_attacks = len({s[0] for s in series}) > 1
            for k, (attack, target, group) in enumerate(series):
                pts = sorted((r["zeta"], r["test"], r["test_random"], r.get("n_test")) for r in sel
                             if (r["attack"], r["target"], r.get("group", ())) == (attack, target, group))
                z = [p[0] for p in pts]
                c = colors[k % len(colors)]
                parts = (target, attack if many_attacks else "", group_label(first[attack, target, group]))
                label = ", ".join(x for x in parts if x)
                ax.plot(z, [p[1] for p in pts], "o-", color=c, label=label)
                ax.plot(z, [p[2] for p in pts], "x--", color=c, alpha=0.7, markersize=5)  # x: a lone point shows
                for col, alpha in ((1, 0.18), (2, 0.08)):  # Wilson 95 % bands: the UAP's, the random control's
                    band = [wilson(p[col], p[3]) for p in pts]
                    if any(math.isnan(b[0]) for b in band):
                        continue
                    if len(z) > 1:
                        ax.fill_between(z, [b[0] for b in band], [b[1] for b in band], color=c, alpha=alpha, lw=0)
                    else:
                        y = pts[0][col]
                        ax.errorbar(z, [y], yerr=[[y - band[0][0]], [band[0][1] - y]], color=c, alpha=0.6,
                                    capsize=3, fmt="none")
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("zeta (%)")
            ax.set_ylabel("test FR (non-targeted) / TSR (targeted)")
            ax.set_title(f"{data + ': ' if many_data else ''}{model}, {norm}  (dashed: random control; "
                         "bands: 95 % Wilson intervals)", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fr_vs_zeta.png", dpi=110)
    plt.close(fig)
    return out / "fr_vs_zeta.png"


def fmt_eps(eps) -> str:
    return "?" if eps is None else f"{eps:.3g}"


def plot_uaps(rows: list[dict], out: Path, zeta: float) -> Path | None:
    sel = headline(rows, zeta)
    uaps = []
    for r in sel:
        try:
            uaps.append((r, read_artifact(r["run_id"], "uap.npy", lambda p: np.load(p, allow_pickle=False))))
        except Exception as e:  # noqa: BLE001 - a run without the artifact is left out of the panel
            log.warning("no uap.npy for run %s: %s", r["run_id"], e)
    if not uaps:
        return None
    n = len(uaps)
    cols = min(n, 4)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.6 * cols, 3.7 * rows_n), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (r, u) in zip(axes.flat, uaps):
        lim = float(np.abs(u).max())
        im = ax.imshow(u, cmap="RdBu_r", vmin=-(lim or 1.0), vmax=lim or 1.0, interpolation="nearest")
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        cb.ax.tick_params(labelsize=7)
        config = f"\n{group_label(r)}" if r.get("config") else ""
        ax.set_title(f"{r['model']}, {r['target']}\n{r['norm']}, zeta={r['zeta']:g}% (eps={fmt_eps(r['eps'])}), "
                     f"test {r['metric']}={r['test']:.2f}{config}{'' if lim else ' (v = 0)'}", fontsize=8)
    fig.suptitle("UAPs (pixel values added to images in [0, 1])", fontsize=9)
    fig.tight_layout()
    path = out / "uaps.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    # noise does not compress: a 256-colour palette keeps the file small (the colour map has 256 levels anyway)
    Image.open(path).convert("RGB").quantize(colors=256).save(path, optimize=True)
    return path


def slug(r: dict) -> str:
    """A file name part for a row's model and config group: `tiny`, `tiny_seed-7_trainer.max_epochs-3`."""
    parts = [r["model"], *(f"{k}-{v}" for k, v in r.get("config", {}).items())]
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in "_".join(parts))[:150]


def plot_confusions(rows: list[dict], out: Path, zeta: float) -> list[Path]:
    """Clean / UAP / random confusion matrices (test) of the headline setting: non-targeted, L-inf, zeta."""
    paths = []
    for r in headline(rows, zeta):
        if r["target"] != "non-targeted" or r["norm"] != "linf":
            continue
        imgs = []
        for kind in ("clean", "uap", "random"):
            try:
                imgs.append(read_artifact(r["run_id"], f"confusion_{kind}.png", plt.imread))
            except Exception:  # noqa: BLE001
                break
        if len(imgs) != 3:
            continue
        # side by side at their own pixel size (scaled down, their 8-point cell text would not read)
        dpi, head = 110, 40
        width, height = sum(i.shape[1] for i in imgs), max(i.shape[0] for i in imgs)
        fig = plt.figure(figsize=(width / dpi, (height + head) / dpi), dpi=dpi)
        x = 0
        for img in imgs:
            ax = fig.add_axes((x / width, 0, img.shape[1] / width, img.shape[0] / (height + head)))
            ax.imshow(img)
            ax.axis("off")
            x += img.shape[1]
        config = f"; {group_label(r)}" if r.get("config") else ""
        fig.suptitle(f"{r['data']}, {r['model']} ({r['attack']}, {r['norm']}, zeta={r['zeta']:g}%{config}): "
                     f"test confusion, clean / UAP / random", fontsize=9)
        path = out / f"confusion_{slug(r)}.png"
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        paths.append(path)
    return paths
