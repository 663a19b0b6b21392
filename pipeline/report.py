"""`python -m pipeline.report`: paper-style tables and figures from the runs in the MLflow store.

    python -m pipeline.report                         # every attack run of the experiment
    python -m pipeline.report --sweep norm_grid       # the runs of a sweep, by name or parent run id
    make report ARGS="--sweep <parent run id>"

Writes to outputs/report/ (or --out): results.csv and results.md (model x attack/target x norm x zeta:
FR or TSR on train and test with the random control beside it), fr_vs_zeta.png (FR / TSR vs zeta per
model and norm, random control dashed), uaps.png (the UAPs at the headline zeta) and
confusion_<model>.png (clean / UAP / random confusion matrices of the headline setting).
"""
from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402

log = logging.getLogger("pipeline.report")

COLUMNS = ["data", "model", "attack", "target", "norm", "zeta", "eps", "metric", "train", "train_random",
           "test", "test_random", "test_acc_clean", "passes", "seconds", "run_id"]
TARGET_ORDER = {"non-targeted": 0, "normal": 1, "pneumonia": 2, "COVID-19": 3}


def select_runs(experiment: str, sweep: str | None) -> list:
    """FINISHED attack runs of the experiment (or of one sweep); the newest per identical job config."""
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
    runs = mlflow.search_runs([exp.experiment_id], filter_string=filt, output_format="list", max_results=50000,
                              order_by=["attributes.start_time DESC"])
    newest = {}
    for r in runs:
        newest.setdefault(r.data.tags.get("job_hash", r.info.run_id), r)
    if not newest:
        raise SystemExit(f"report: no FINISHED attack runs{' for sweep ' + sweep if sweep else ''} in {experiment!r}")
    return list(newest.values())


def row_of(run) -> dict:
    p, m = run.data.params, run.data.metrics
    target = p.get("attack.target", "None")
    targeted = target not in ("None", "null", "", None)
    key = "tsr" if targeted else "fr"
    return {
        "data": run.data.tags.get("choice.data", p.get("data._target_", "").rsplit(".", 1)[-1]),
        "model": p.get("model.arch"), "attack": p.get("attack._target_", "").rsplit(".", 1)[-1],
        "target": target if targeted else "non-targeted", "norm": p.get("attack.norm"),
        "zeta": float(p.get("attack.zeta", "nan")), "eps": m.get("eps"), "metric": key.upper(),
        "train": m.get(f"train_{key}"), "train_random": m.get(f"train_{key}_random"),
        "test": m.get(f"test_{key}"), "test_random": m.get(f"test_{key}_random"),
        "test_acc_clean": m.get("test_acc_clean"), "passes": m.get("uap_passes"), "seconds": m.get("uap_seconds"),
        "run_id": run.info.run_id,
    }


def sort_key(r: dict):
    return (r["data"], r["model"], r["attack"], TARGET_ORDER.get(r["target"], 9), r["norm"], r["zeta"])


def fmt(v, key: str = "") -> str:
    if key == "zeta":
        return f"{v:g}"
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


def write_tables(rows: list[dict], out: Path) -> tuple[Path, Path]:
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    head = ["data", "model", "attack", "target", "norm", "zeta (%)", "metric", "train UAP", "train random",
            "test UAP", "test random", "clean test acc"]
    keys = ["data", "model", "attack", "target", "norm", "zeta", "metric", "train", "train_random", "test",
            "test_random", "test_acc_clean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(fmt(r[k], k) for k in keys) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return out / "results.csv", out / "results.md"


def plot_vs_zeta(rows: list[dict], out: Path) -> Path:
    panels = sorted({(r["model"], r["norm"]) for r in rows})
    models = sorted({m for m, _ in panels})
    norms = sorted({n for _, n in panels})
    fig, axes = plt.subplots(len(models), len(norms), figsize=(4.6 * len(norms), 3.4 * len(models)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, model in enumerate(models):
        for j, norm in enumerate(norms):
            ax = axes[i, j]
            sel = [r for r in rows if r["model"] == model and r["norm"] == norm]
            if not sel:  # this model was not run with this norm
                ax.axis("off")
                continue
            series = sorted({(r["attack"], r["target"]) for r in sel}, key=lambda s: (s[0], TARGET_ORDER.get(s[1], 9)))
            for k, (attack, target) in enumerate(series):
                pts = sorted((r["zeta"], r["test"], r["test_random"]) for r in sel
                             if r["attack"] == attack and r["target"] == target)
                z = [p[0] for p in pts]
                c = colors[k % len(colors)]
                label = f"{target}" + (f" ({attack})" if len({s[0] for s in series}) > 1 else "")
                ax.plot(z, [p[1] for p in pts], "o-", color=c, label=label)
                ax.plot(z, [p[2] for p in pts], "--", color=c, alpha=0.7)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("zeta (%)")
            ax.set_ylabel("test FR (non-targeted) / TSR (targeted)")
            ax.set_title(f"{model}, {norm}  (dashed: random control)", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fr_vs_zeta.png", dpi=110)
    plt.close(fig)
    return out / "fr_vs_zeta.png"


def headline(rows: list[dict], zeta: float) -> list[dict]:
    """Per (model, attack, target, norm): the row at the zeta closest to the headline zeta."""
    best: dict = {}
    for r in rows:
        k = (r["model"], r["attack"], r["target"], r["norm"])
        if k not in best or abs(r["zeta"] - zeta) < abs(best[k]["zeta"] - zeta):
            best[k] = r
    return sorted(best.values(), key=sort_key)


def read_artifact(run_id: str, name: str, load):
    """Download one artifact of a run into a temporary folder and load it."""
    with tempfile.TemporaryDirectory() as tmp:
        return load(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=tmp))


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
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 3.3 * rows_n), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (r, u) in zip(axes.flat, uaps):
        lim = float(np.abs(u).max()) or 1.0
        ax.imshow(u, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(f"{r['model']} {r['target']}\n{r['norm']} zeta={r['zeta']:g}% {r['metric']}={r['test']:.2f}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "uaps.png", dpi=110)
    plt.close(fig)
    return out / "uaps.png"


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
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
        for ax, img in zip(axes, imgs):
            ax.imshow(img)
            ax.axis("off")
        fig.suptitle(f"{r['model']} ({r['attack']}, {r['norm']}, zeta={r['zeta']:g}%): test confusion, clean / UAP / random",
                     fontsize=9)
        path = out / f"confusion_{r['model']}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow store (default: ./mlflow.db)")
    ap.add_argument("--experiment", default="uap-cxr", help="MLflow experiment name (default: uap-cxr)")
    ap.add_argument("--sweep", default=None, help="a sweep's parent run id or sweep name (default: all runs)")
    ap.add_argument("--out", default="outputs/report", help="output folder (default: outputs/report)")
    ap.add_argument("--zeta", type=float, default=2.0, help="headline zeta for the UAP and confusion panels (default 2)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    mlflow.set_tracking_uri(args.tracking_uri)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted((row_of(r) for r in select_runs(args.experiment, args.sweep)), key=sort_key)
    files = [*write_tables(rows, out), plot_vs_zeta(rows, out), plot_uaps(rows, out, args.zeta),
             *plot_confusions(rows, out, args.zeta)]
    print((out / "results.md").read_text())
    print("report: %d runs -> %s" % (len(rows), ", ".join(str(f) for f in files if f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
