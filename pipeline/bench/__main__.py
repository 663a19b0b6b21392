"""`python -m pipeline.bench` (`make bench`): UAP generation side by side with ART, in one process.

Same frozen classifier (from the classifier cache: a small timm model at 128 px trained on cxr3, conf/data/cxr3.yaml's
root, when present, else on phantom data), same input set, same norm / eps / FGSM step / delta / max_iter and
seed for every row:

- ART UniversalPerturbation / TargetedUniversalPerturbation with the FGSM attacker (the authors' tool);
- our rows (pipeline.bench.art.ROWS): fgsm_uap faithful and batched (one and two step scales), sgd_uap, strong_uap;
- the floor: one batched forward+backward pass over the input set, times the passes each row used.

After every pass the exact input-set fooling rate is recorded (for our rows beside the clock, pipeline.bench.trace),
which gives the time at which each of our rows first reached ART's final fooling rate.

    python -m pipeline.bench                  # 256 images, the full comparison (minutes on a CPU)
    python -m pipeline.bench --quick          # a few dozen images, 2 passes (the test uses this)
    python -m pipeline.bench --device cuda    # on a GPU (ART on the same GPU)
    python -m pipeline.bench --black-box      # the black-box UAPs' test FR against queries (table and figure)
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path

import torch

from pipeline import files
from pipeline.bench.art import bench, fmt_table, speedup_line
from pipeline.bench.blackbox import blackbox
from pipeline.bench.precision import precision_check, precision_speedup, precision_table
from pipeline.bench.setup import ROOT, machine, versions
from pipeline.bench.study import study
from pipeline.precision import ROUNDS, WARMUP
from pipeline.progress import quiet_libraries

log = logging.getLogger("pipeline.bench")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few dozen images and 2 passes (a smoke test)")
    ap.add_argument("--n-images", type=int, default=256, help="input-set size (default 256 training images)")
    ap.add_argument("--max-iter", type=int, default=15, help="passes at most (the paper: 15)")
    ap.add_argument("--zeta", type=float, default=2.0, help="UAP strength in percent (default 2)")
    ap.add_argument("--step", type=float, default=0.001, help="FGSM step, L-inf (the paper: 0.001)")
    ap.add_argument("--delta", type=float, default=0.2, help="stop at fooling rate >= 1 - delta (ART default 0.2)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--target", default="COVID-19", help="target class of the targeted rows")
    ap.add_argument("--non-targeted-only", action="store_true")
    ap.add_argument("--model", default="tiny", help="model config (conf/model), trained once and cached")
    ap.add_argument("--data", default="auto", choices=["auto", "cxr3", "phantom"],
                    help="auto: cxr3 when ../shared/data/cxr3 is present, else phantom")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--precision", default="auto", choices=["auto", "32", "bf16"],
                    help="the pipeline's precision for our rows (ART runs in fp32); default auto")
    ap.add_argument("--no-precision-table", action="store_true", help="leave out the precision table")
    ap.add_argument("--precision-check", action="store_true",
                    help="instead of the ART comparison: UAPs searched in fp32 and in bf16 against the same "
                         "fp32-trained classifier, evaluated in fp32 (--check-models, --zeta, --norm)")
    ap.add_argument("--check-models", default="resnet18,tiny_effnet", help="--precision-check: model configs")
    ap.add_argument("--record-every", type=int, default=0,
                    help="also measure the exact input-set FR every k steps, off the clock (finer 'reached at' times)")
    ap.add_argument("--study", action="store_true",
                    help="instead of the ART comparison: every method and variant of conf/bench/study.yaml against "
                         "--model (use "
                         "--norm, --zeta, --target with --targeted), on its whole input set")
    ap.add_argument("--black-box", action="store_true",
                    help="instead of the ART comparison: the black-box UAPs (simba_uap, nes_uap) against queries, "
                         "L-inf zeta 2 %% and L2 zeta 4 %%, on --bb-models")
    ap.add_argument("--bb-models", default="tiny_effnet", help="--black-box: model configs, comma-separated")
    ap.add_argument("--queries", type=int, default=100_000, help="--black-box: the query budget of each search")
    ap.add_argument("--bb-figure", default="outputs/bench/blackbox_fr_vs_queries.png",
                    help="--black-box: where the figure goes")
    ap.add_argument("--norm", default="linf", choices=["linf", "l2"], help="--study: the norm")
    ap.add_argument("--targeted", action="store_true", help="--study: targeted to --target")
    ap.add_argument("--rows", default=None,
                    help="--study: only these rows (e.g. 14-17; none: measure nothing), the others read from their "
                         "record under outputs/bench/ (rows measured earlier are kept; default: every row, measured "
                         "afresh)")
    ap.add_argument("--seed", type=int, default=42,
                    help="seed (42: the pipeline's default, so the cached classifier is reused)")
    ap.add_argument("--out", default=None, help="markdown file the tables go into, as a section per command (default "
                                                "outputs/bench/benchmarks.md; --quick: none; --out docs/benchmarks.md "
                                                "updates the documented numbers)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_images, args.max_iter = min(args.n_images, 48), 2
    logging.basicConfig(level=logging.WARNING)
    quiet_libraries()  # as the main job: no library banners or warnings between the tables
    cmd = " ".join(["python -m pipeline.bench", *(argv if argv is not None else sys.argv[1:])])
    cmd = re.sub(r" --out[ =]\S+", "", cmd)  # where the section is written is not part of what it measured
    doc = Path(args.out) if args.out else (None if args.quick else ROOT / "outputs" / "bench" / "benchmarks.md")
    if args.study:
        cmd = re.sub(r" --rows[ =]\S+", "", cmd)  # one section per study, however many runs measured its rows
        table, _ = study(args)
        text = f"Machine: {machine(args.device)}; {versions()}.\n\n{table}"
        print(text)
        if doc:
            write_doc(doc, cmd, text)
        return 0
    if args.black_box:
        table, last, fig = blackbox(args)
        text = (f"Machine: {machine(args.device)}; {versions()}.\n\nTest FR of the UAP as the search spends its "
                f"queries (measured beside it at each checkpoint), up to {args.queries:,} queries; 100 input "
                f"images; figure: {fig}.\n\n{table}")
        print(text)
        if doc:
            write_doc(doc, cmd, text)
        print(last)
        return 0
    if args.precision_check:
        text = f"Machine: {machine(args.device)}; {versions()}.\n\n{precision_check(args)}"
        print(text)
        if doc:
            write_doc(doc, cmd, text)
        return 0
    tables, info = bench(args)
    parts = [f"Machine: {machine(args.device)}; {versions()}.",
             f"Classifier: {info['model']} on {info['data']}, {info['image_size']} px, clean test accuracy "
             f"{info['clean_test_acc']:.3f}; input set {info['n_images']} training images; L-inf zeta {args.zeta} % "
             f"(eps {info['eps']:.5f}), FGSM step {args.step}, delta {args.delta}, max_iter {args.max_iter}, "
             f"batch {args.batch_size}, seed {args.seed}, device {info['device']}.", ""]
    for name, rows in tables.items():
        parts += [f"#### {name}", "", fmt_table(rows, info["floor"], info["n_images"]), ""]
    parts.append(f"Evaluation (clean + UAP + random in one batched pass) runs at {info['eval_ratio']:.2f}x the "
                 f"model's raw forward throughput on the same images (precision={args.precision}: "
                 f"{info['modes']}).")
    last = speedup_line(tables["non-targeted"])
    if not args.no_precision_table:
        device = torch.device(args.device)
        parts += ["", "#### precision", "",
                  "Images/s in fp32 and each mode's ratio to it, per model and loop (batch as given, after "
                  f"{WARMUP} warm-up calls per mode, the median of {ROUNDS} interleaved rounds); `auto picks`: "
                  "what precision=auto chooses, measured on its own "
                  "(pipeline/precision.py).", "", precision_table(args, device), ""]
        pass_ratio, eval_ratio, auto = precision_speedup(args, device)
        parts.append(f"resnet18 at {info['image_size']} px on the input set, precision=auto ({auto}) vs "
                     f"fp32, side by side: a UAP search pass (sgd_uap) {pass_ratio:.2f}x faster, an evaluation "
                     f"(clean + UAP + random) {eval_ratio:.2f}x faster.")
        last += f" precision_speedup={pass_ratio:.2f}"
    text = "\n".join(parts)
    print(text)
    if doc:
        write_doc(doc, cmd, text)
        print(f"tables written to {doc}")
    print(last)
    return 0


def write_doc(path: Path, cmd: str, text: str) -> None:
    """Replace (or add) the section of this command's device in the benchmark document."""
    path.parent.mkdir(parents=True, exist_ok=True)
    marker = f"<!-- bench: {cmd} -->"
    body = f"{marker}\n### `{cmd}` ({time.strftime('%Y-%m-%d')})\n\n{text}\n<!-- end -->\n"
    doc = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if marker in doc:
        start = doc.index(marker)
        end = doc.index("<!-- end -->", start) + len("<!-- end -->\n")
        doc = doc[:start] + body + doc[end:]
    else:
        doc += "\n" + body
    files.write_text(path, doc)


if __name__ == "__main__":
    sys.exit(main())
