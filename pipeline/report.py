"""`python -m pipeline.report`: paper-style tables and figures from the runs in the MLflow store.

    python -m pipeline.report                         # every attack run of the experiment
    python -m pipeline.report --sweep norm_grid       # the runs of a sweep, by name or parent run id
    python -m pipeline.report tracking=server         # the store is the config's (conf/tracking/), as for the jobs
    make report ARGS="--sweep <parent run id>"

Writes to outputs/report/ (or --out): results.csv (one row per run) and results.md (the classifiers' clean
test accuracy and per-class sensitivity / PPV; paper-style tables per norm: FR or TSR, train / test, UAP and
random control, by zeta; where non-targeted UAPs send the test images; every run in one table),
fr_vs_zeta.png (FR / TSR vs zeta per model and norm, random control dashed), uaps.png (the UAPs at the
headline zeta, with colour bars) and confusion_<model>.png (clean / UAP / random confusion matrices of the
headline setting).

Runs of different configs with the same model / attack / target / norm (another seed, epochs, image size,
data root...) are not merged: the config values that tell them apart become table columns and figure labels
(pipeline.tables.assign_groups), and every table row names its runs (MLflow run ids, first 8 characters).
A model is named by its config's `model.name` everywhere (older stores: the `choice.model` tag, else the arch).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.config import compose
from pipeline.metrics import wilson
from pipeline.tables import TARGET_ORDER, assign_groups, group_key, group_label, headline, sort_key, write_tables
from pipeline.tracking import complete, flat_metrics, model_name, run_target, store_uri

log = logging.getLogger("pipeline.report")


def select_runs(experiment: str, sweep: str | None) -> list:
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


def row_of(run) -> dict:
    p, m = run.data.params, flat_metrics(run.data.metrics)  # grouped MLflow names (test/fr) or older flat ones
    target = run_target(run)
    key = "tsr" if target else "fr"
    return {
        "data": run.data.tags.get("choice.data", p.get("data._target_", "").rsplit(".", 1)[-1]),
        "model": model_name(run), "attack": p.get("attack.name") or p.get("attack._target_", "").rsplit(".", 1)[-1],
        "target": target or "non-targeted", "norm": p.get("attack.norm"),
        "zeta": float(p.get("attack.zeta", "nan")), "eps": m.get("eps"), "metric": key.upper(),
        "train": m.get(f"train_{key}"), "train_random": m.get(f"train_{key}_random"),
        "test": m.get(f"test_{key}"), "test_random": m.get(f"test_{key}_random"),
        "test_acc_clean": m.get("test_acc_clean"), "passes": m.get("uap_passes"), "seconds": m.get("uap_seconds"),
        "n_train": m.get("train_n"), "n_test": m.get("test_n"),  # absent in stores before intervals: no interval
        "run_id": run.info.run_id, "run_name": run.info.run_name, "model_arch": p.get("model.arch"),
        "config_hash": run.data.tags.get("config_hash"), "params": dict(p), "metrics": m,
        "wall": (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else None,
        "train_seconds": m.get("classifier_train_seconds", 0.0), "precision": p.get("precision.attack"),
    }


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


def read_artifact(run_id: str, name: str, load):
    """Download one artifact of a run into a temporary folder and load it."""
    with tempfile.TemporaryDirectory() as tmp:
        return load(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=tmp))


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
    from PIL import Image
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="config overrides, as for python -m pipeline (tracking=server, "
                                                 "tracking.experiment=...): the store the jobs wrote to")
    ap.add_argument("--tracking-uri", default=None, help="MLflow store (default: the config's tracking.uri)")
    ap.add_argument("--busy-timeout", type=float, default=None,
                    help="seconds to wait for a SQLite store another process holds (default: tracking.busy_timeout)")
    ap.add_argument("--experiment", default=None, help="MLflow experiment name (default: tracking.experiment)")
    ap.add_argument("--sweep", default=None, help="a sweep's parent run id or sweep name (default: all runs)")
    ap.add_argument("--out", default="outputs/report", help="output folder (default: outputs/report)")
    ap.add_argument("--zeta", type=float, default=2.0,
                    help="headline zeta for the UAP and confusion panels (default 2)")
    args = ap.parse_args(argv)
    tr = compose(args.overrides).tracking  # the defaults the jobs used: one place for them (conf/tracking/)
    uri, experiment = args.tracking_uri or str(tr.uri), args.experiment or str(tr.experiment)
    busy = args.busy_timeout if args.busy_timeout is not None else tr.get("busy_timeout")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per downloaded figure
    mlflow.set_tracking_uri(store_uri(uri, busy))  # waits while a job holds the store
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [row_of(r) for r in select_runs(experiment, args.sweep)]
    assign_groups(rows)  # the config columns that tell runs of one model / attack / target / norm apart
    rows.sort(key=sort_key)
    files = [*write_tables(rows, out, args.zeta), plot_vs_zeta(rows, out), plot_uaps(rows, out, args.zeta),
             *plot_confusions(rows, out, args.zeta)]
    print((out / "results.md").read_text())
    print(f"report: {len(rows)} runs -> {', '.join(str(f) for f in files if f)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
