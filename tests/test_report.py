"""The report on a store with runs of different configs (fast: the store is written by hand, no pipeline run),
and the figures' content: confusion counts and shares, the examples grid's amplified perturbation."""
import csv

import mlflow
import numpy as np
import pytest
import torch
from conftest import cells
from PIL import Image

from pipeline import figures
from pipeline.report import tables
from pipeline.report.__main__ import main
from pipeline.tracking import mlflow_key

CLASSES = ["normal", "pneumonia", "COVID-19"]


def params(**over) -> dict:
    """An attack run's params, as the pipeline logs them (flattened config)."""
    seed, epochs = over.pop("seed", 42), over.pop("epochs", 20)
    p = {"task": "attack", "seed": seed, "data.seed": seed, "recipe.epochs": epochs, "trainer.max_epochs": epochs,
         "data._target_": "pipeline.data.PhantomDataModule", "data.image_size": 64, "model.name": "tiny",
         "model.arch": "test_resnet", "attack.name": "fgsm_uap", "attack.norm": "linf", "attack.zeta": 2,
         "zeta": 2, "attack.target": "None", "attack.max_iter": 3, "sweep_name": "None",
         "trainer.enable_progress_bar": "True"}
    p.update(over)
    return p


def metrics(fr: float) -> dict:
    m = {"eps": 0.05, "train_fr": fr, "test_fr": fr + 0.01, "train_fr_random": 0.02, "test_fr_random": 0.03,
         "test_acc_clean": 0.9, "val_acc": 0.8, "test_acc": 0.9, "uap_passes": 3, "uap_seconds": 1.0,
         "test_n": 300, "train_n": 500}
    for c in CLASSES:
        m.update({f"test_sens_{c}": 0.9, f"test_ppv_{c}": 0.9, f"test_clean_share_{c}": 1 / 3,
                  f"test_uap_share_{c}": 0.5 if c == "normal" else 0.25, f"test_random_share_{c}": 1 / 3})
    return m


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Runs sharing model / attack / norm / zeta: the default config, `seed=7 recipe.epochs=3` (flat metric names,
    no model.name, no image counts), and another model whose arch differs from its name."""
    root = tmp_path_factory.mktemp("report")
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    exp = mlflow.create_experiment("uap-cxr", artifact_location=(root / "artifacts").as_uri())
    specs = [("default z2", params(), {"config_hash": "aaaa1111"}, 0.5, True),
             ("default z4", params(zeta=4, **{"attack.zeta": 4}), {"config_hash": "aaaa1111"}, 0.7, True),
             ("seed7 z2", params(seed=7, epochs=3), {"config_hash": "bbbb2222", "choice.model": "tiny"}, 0.4, False),
             ("effnet z2", params(**{"model.name": "tiny_effnet", "model.arch": "test_efficientnet"}),
              {"config_hash": "cccc3333"}, 0.6, True)]
    ids = {}
    for i, (name, p, tags, fr, grouped) in enumerate(specs):
        if not grouped:
            del p["model.name"]
        with mlflow.start_run(experiment_id=exp, run_name=name) as run:
            mlflow.log_params({**p, "paths.output_dir": f"/out/{i}"})  # differs in every run: never a column
            mlflow.set_tags({**tags, "choice.data": "phantom", "job_hash": f"job{i}"})
            m = metrics(fr) if grouped else {k: v for k, v in metrics(fr).items() if not k.endswith("_n")}  # no counts
            mlflow.log_metrics({mlflow_key(k) if grouped else k: v for k, v in m.items()})
            if i == 0:
                np.save(root / "uap.npy", np.random.default_rng(0).uniform(-0.05, 0.05, (64, 64)).astype(np.float32))
                mlflow.log_artifact(str(root / "uap.npy"))
        ids[name] = run.info.run_id
    return root, ids


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    root, ids = store
    out = tmp_path_factory.mktemp("out")
    # the store named as the jobs name it: a config override (paths.root_dir here, tracking.uri follows it)
    assert main([f"paths.root_dir={root}", "--out", str(out)]) == 0
    return out, ids, (out / "results.md").read_text()


def section(md: str, title: str) -> list[dict]:
    """The rows of the results.md table under the first heading containing `title`, as dicts by header."""
    lines = [line for line in md.split(title, 1)[1].split("###")[0].splitlines() if line.startswith("|")]
    return [dict(zip(cells(lines[0]), cells(line))) for line in lines[2:]]


def test_runs_of_one_cell_with_another_seed_get_rows_and_columns_of_their_own(report):
    out, ids, md = report
    every = section(md, "### Every run")
    assert len(every) == 4
    # seed and trainer.max_epochs tell them apart (data.seed, recipe.epochs: the same values; paths: ignored)
    assert [k for k in every[0] if "." in k or k == "seed"] == ["seed", "trainer.max_epochs"]
    tiny = [r for r in every if r["model"] == "tiny" and r["zeta (%)"] == "2"]
    assert sorted((r["seed"], r["trainer.max_epochs"], r["run"]) for r in tiny) == sorted(
        [("42", "20", ids["default z2"][:8]), ("7", "3", ids["seed7 z2"][:8])])
    linf = section(md, "FR, L-inf")
    uap = [r for r in linf if r["model"] == "tiny" and r["perturbation"] == "UAP"]
    assert len(uap) == 2
    by_seed = {r["seed"]: r for r in uap}
    # test's 95 % Wilson interval over its 300 images; none for the run that logged no image count
    assert by_seed["42"]["zeta 2 %"] == "0.500 / 0.510 [0.45, 0.57]"
    assert by_seed["42"]["zeta 4 %"] == "0.700 / 0.710 [0.66, 0.76]"
    assert by_seed["7"]["zeta 2 %"] == "0.400 / 0.410" and by_seed["7"]["zeta 4 %"] == ""
    rnd = {r["seed"]: r for r in linf if r["model"] == "tiny" and r["perturbation"] == "random"}
    assert rnd["42"]["zeta 2 %"] == "0.020 / 0.030 [0.02, 0.06]"  # the random control's too
    assert by_seed["42"]["runs"] == f"{ids['default z2'][:8]}, {ids['default z4'][:8]}"  # in zeta order
    assert by_seed["7"]["runs"] == ids["seed7 z2"][:8]
    assert "seed`, `trainer.max_epochs`" in md.splitlines()[0]  # the note says what tells rows apart
    shares = section(md, "Where non-targeted UAPs send")
    assert sorted(r["seed"] for r in shares if r["model"] == "tiny") == ["42", "7"]


def test_one_row_per_classifier_and_one_name_per_model(report):
    out, ids, md = report
    clf = section(md, "### Classifiers")
    assert sorted((r["model"], r["seed"], r["classifier"]) for r in clf) == [
        ("tiny", "42", "aaaa1111"), ("tiny", "7", "bbbb2222"), ("tiny_effnet", "42", "cccc3333")]
    assert {r["classifier"]: r["runs"] for r in clf}["aaaa1111"] == f"{ids['default z2'][:8]}, {ids['default z4'][:8]}"
    assert {r["classifier"]: r["test acc"] for r in clf}["aaaa1111"] == "0.900 [0.86, 0.93]"
    assert "test_efficientnet" not in md  # the config's name, not the timm arch
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["model"] for r in rows} == {"tiny", "tiny_effnet"}
    assert {r["model_arch"] for r in rows if r["model"] == "tiny_effnet"} == {"test_efficientnet"}
    assert {r["config"] for r in rows if r["run_id"] == ids["seed7 z2"]} == {"seed=7, trainer.max_epochs=3"}
    assert [float(r["test"]) for r in rows if r["run_id"] == ids["seed7 z2"]] == [pytest.approx(0.41)]  # flat names


def test_report_figures_are_written_and_readable(report):
    out, _, _ = report
    assert (out / "fr_vs_zeta.png").stat().st_size > 0
    w, h = Image.open(out / "uaps.png").size  # one UAP, with a colour bar
    assert w >= 300 and h >= 300


def test_lines_of_fr_vs_zeta_never_hold_two_runs_at_one_zeta():
    rows = [{"data": "d", "model": "m", "attack": "a", "target": "non-targeted", "norm": "linf", "zeta": z,
             "run_id": f"{i:032x}", "params": params(seed=s)} for i, (z, s) in enumerate([(2, 42), (4, 42), (2, 7)])]
    assert tables.assign_groups(rows) == ["seed"]
    assert len({(*tables.table_row(r), r["group"], r["zeta"]) for r in rows}) == len(rows)
    # a plain sweep (only zeta / norm differ): no config columns, the tables stay as they were
    sweep = [{**r, "params": params(zeta=r["zeta"], **{"attack.zeta": r["zeta"]})} for r in rows[:2]]
    assert tables.assign_groups(sweep) == [] and sweep[0]["group"] == ()
    # runs alike in every param (e.g. two code versions): told apart by their run ids
    same = [{**r, "params": params()} for r in rows[:1] * 2]
    same[1]["run_id"] = "f" * 32
    assert tables.assign_groups(same) == ["run"] and {r["group"] for r in same} == {("00000000",), ("ffffffff",)}


def test_confusion_cells_show_count_and_share_of_the_true_class():
    conf = np.array([[45, 5, 0], [10, 30, 10], [0, 0, 50]])
    fig = figures.confusion_figure(conf, CLASSES, "tiny, test, uap\nnon-targeted UAP, linf, zeta=2%")
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert texts[0] == "45\n90%" and texts[3] == "10\n20%" and texts[8] == "50\n100%"
    assert "zeta=2%" in ax.get_title() and "linf" in ax.get_title()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["normal (50)", "pneumonia (50)", "COVID-19 (50)"]


def test_examples_grid_has_an_amplified_perturbation_column_and_a_title():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 1, 32, 32, generator=g)
    uap = (torch.rand(32, 32, generator=g) - 0.5) * 0.04
    labels, pred = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    fig = figures.examples_figure(images, uap, labels, pred, (pred + 1) % 3, CLASSES, n=6,
                                title="tiny: non-targeted UAP, linf, zeta=2%")
    assert len(fig.axes) == 2 * 6 + 1
    last = fig.axes[-1]
    assert "amplified" in last.get_title()
    img = last.images[0].get_array()
    assert img.min() == pytest.approx(0, abs=0.02) or img.max() == pytest.approx(1, abs=0.02)  # the full range
    assert np.allclose(img, 0.5 + uap.numpy() * 0.5 / np.abs(uap.numpy()).max())
    assert "tiny" in fig._suptitle.get_text() and "zeta=2%" in fig._suptitle.get_text()


def test_runs_differing_only_by_seed_are_summarised_as_mean_and_sd():
    def row(seed, zeta, test, rnd, acc, epochs="20"):
        return {"data": "cxr3", "model": "resnet18", "attack": "sgd_uap", "target": "non-targeted", "norm": "linf",
                "zeta": zeta, "metric": "FR", "test": test, "test_random": rnd, "test_acc_clean": acc,
                "run_id": f"run{seed}{zeta}{epochs}xxxx", "config": {"seed": str(seed), "trainer.max_epochs": epochs}}
    rows = [row(0, 2.0, 0.5, 0.1, 0.7), row(1, 2.0, 0.7, 0.2, 0.8), row(2, 2.0, 0.6, 0.0, 0.9),
            row(0, 4.0, 0.9, 0.3, 0.7), row(0, 2.0, 0.2, 0.2, 0.5, epochs="3")]  # alone in their cells
    table = tables.seeds_table(rows, ["seed", "trainer.max_epochs"]).splitlines()
    assert len(table) == 3  # header, rule, one cell with 3 seeds
    r = dict(zip(cells(table[0]), cells(table[2])))
    # by hand: mean 0.6, sample sd sqrt((0.01 + 0.01 + 0) / 2) = 0.1; random 0.1 and 0.1; accuracy 0.8 and 0.1
    assert (r["seeds"], r["test UAP"], r["test random"], r["clean test acc"]) == (
        "0, 1, 2", "0.600 ± 0.100", "0.100 ± 0.100", "0.800 ± 0.100")
    assert r["trainer.max_epochs"] == "20" and r["zeta (%)"] == "2" and len(r["runs"].split(", ")) == 3
    assert tables.seeds_table(rows, ["trainer.max_epochs"]) == ""  # no seed column: no such table


def test_the_time_table_splits_each_models_wall_time_by_hand():
    rows = [{"model": "a", "precision": "bf16+cl", "wall": 600.0, "train_seconds": 120.0, "seconds": 300.0},
            {"model": "a", "precision": "bf16+cl", "wall": 300.0, "train_seconds": 0.0, "seconds": 180.0},
            {"model": "b", "precision": None, "wall": 120.0, "train_seconds": 60.0, "seconds": 30.0}]
    lines = tables.time_table(rows).strip().splitlines()
    assert cells(lines[2]) == ["a", "bf16+cl", "2", "15.0", "2.0", "8.0", "5.0"]  # 900 s, 120 s, 480 s, 300 s
    assert cells(lines[3]) == ["b", "fp32", "1", "2.0", "1.0", "0.5", "0.5"]
    assert cells(lines[4]) == ["**all**", "", "3", "**17.0**", "3.0", "8.5", "5.5"]


def test_the_threat_table_has_a_row_per_attacker_and_the_random_control():
    def run(fr, attack="strong_uap", **p):
        return {"target": "non-targeted", "model": "m", "norm": "linf", "zeta": 2.0, "test": fr, "test_random": 0.05,
                "n_test": 100, "attack": attack, "params": p}
    rows = [run(0.7), run(0.4, **{"attack.input_source": "natural"}), run(0.3, **{"attack.surrogate_seed": "7"}),
            run(0.2, "nes_uap", **{"attack.black_box": "True", "attack.max_queries": "100000"}),
            run(0.1, "nes_uap", **{"attack.black_box": "True", "attack.max_queries": "10000"})]
    lines = tables.threat_table(rows).splitlines()
    assert [cells(line)[0] for line in lines[2:]] == [
        "white-box, the training images", "white-box, natural images",
        "transferred from the same architecture, seed 7", "black-box nes_uap, 10,000 queries",
        "black-box nes_uap, 100,000 queries", "random control (same norm, white-box runs)"]
    assert cells(lines[0])[1] == "m · L-inf 2 %"
    assert cells(lines[2])[1] == "0.700 [0.60, 0.78]"  # Wilson, 70 of 100: [0.604, 0.781]
    assert cells(lines[-1])[1].startswith("0.050 [")
    assert tables.threat_table(rows[:1]) == ""  # one attacker: no table
