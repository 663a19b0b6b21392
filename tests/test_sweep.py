"""Sweeps: parent and child runs in MLflow, one classifier per sweep, resume, failures, joblib, the report."""
import csv

import mlflow
import pytest
from conftest import cells, make_cfg, mlflow_runs, run_cli

from pipeline import identity, sweep
from pipeline.eval.metrics import wilson
from pipeline.report.__main__ import main

RESULT_COLUMNS = ["metrics.test_fr", "metrics.train_fr", "metrics.test_fr_random", "metrics.uap_norm", "metrics.eps"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    first = run_cli(["+sweep=smoke", "-m"], root)
    runs_after_first = mlflow_runs(root)
    second = run_cli(["+sweep=smoke", "-m"], root)
    return root, runs_after_first, first, second


def children(runs):
    return runs[runs["tags.mlflow.parentRunId"].notna()]


def test_smoke_sweep_has_one_parent_and_four_finished_children(smoke):
    root, runs, _, _ = smoke
    parents = runs[runs["tags.role"] == "parent"]
    kids = children(runs)
    assert len(parents) == 1 and len(kids) == 4
    assert set(kids["tags.mlflow.parentRunId"]) == {parents.iloc[0]["run_id"]}
    assert set(kids["status"]) == {"FINISHED"} and parents.iloc[0]["status"] == "FINISHED"
    assert set(kids["tags.sweep"]) == {"smoke"}
    assert sorted(zip(kids["params.attack.norm"], kids["params.attack.zeta"].astype(float))) == [
        ("l2", 2.0), ("l2", 4.0), ("linf", 2.0), ("linf", 4.0)]
    for col in RESULT_COLUMNS:
        assert kids[col].notna().all(), col
    assert all("norm=" in o and "zeta=" in o for o in kids["tags.overrides"])


def test_smoke_sweep_trains_the_classifier_once(smoke):
    _, runs, _, _ = smoke
    assert sorted(children(runs)["tags.classifier_cache"]) == ["hit", "hit", "hit", "trained"]


def test_rerunning_the_sweep_adds_no_run(smoke):
    root, runs, _, second = smoke
    assert len(mlflow_runs(root)) == len(runs)
    assert (second.stdout + second.stderr).count("skipped: this job's config already has a FINISHED run") == 4


def test_parent_run_gets_the_sweep_config_and_a_summary(smoke):
    _, runs, _, _ = smoke
    parent = runs[runs["tags.role"] == "parent"].iloc[0]
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(parent["run_id"])}
    assert {"summary.md", "summary.json", "sweep_config.yaml"} <= names
    assert parent["params.sweeper.norm"] == "linf,l2"


def test_the_ui_gets_distinct_child_names_and_the_parent_the_headline_numbers(smoke):
    _, runs, _, _ = smoke
    kids, parent = children(runs), runs[runs["tags.role"] == "parent"].iloc[0]
    names = [f"{n} z{z} · tiny · fgsm_uap" for n in ("l2", "linf") for z in (2, 4)]
    assert sorted(kids["tags.mlflow.runName"]) == names
    assert all("seed=42" in n and "task=attack" in n for n in kids["tags.long_name"])
    for _, k in kids.iterrows():
        name = f"tiny/{k['params.attack.norm']} z{float(k['params.attack.zeta']):g} FR"
        assert parent[f"metrics.{name}"] == pytest.approx(k["metrics.test_fr"])
        assert parent[f"metrics.{name} random"] == pytest.approx(k["metrics.test_fr_random"])


def test_a_failing_job_is_failed_the_others_finish_and_the_sweep_exits_1(smoke):
    root, before, _, _ = smoke
    proc = run_cli(["+sweep=smoke", "norm=linf", "zeta=3,250", "-m"], root, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    block = (proc.stdout + proc.stderr).split("1 of 2 jobs did not finish:")[1]  # one block at the end: which job, why
    assert "#1 norm=linf zeta=250" in block and "FAILED: ConfigError: attack.zeta=250" in block
    runs = mlflow_runs(root)
    new = runs[~runs["run_id"].isin(before["run_id"])]
    kids = children(new)  # the bad value failed before its run opened: only the good job has a run
    assert len(kids) == 1 and kids.iloc[0]["status"] == "FINISHED" and kids.iloc[0]["params.attack.zeta"] == "3"
    # a rerun retries the failed job only (and fails again the same way); the finished one is skipped
    again = run_cli(["+sweep=smoke", "norm=linf", "zeta=3,250", "-m"], root, check=False)
    assert (again.stdout + again.stderr).count("skipped: this job") == 1 and again.returncode == 1
    runs = mlflow_runs(root)
    parent = runs[(runs["tags.role"] == "parent") & runs["tags.overrides"].str.contains("250", na=False)].iloc[0]
    assert parent["status"] == "FAILED" and parent["tags.jobs_failed"] == "1" and parent["tags.children_failed"] == "0"


def test_report_tables_equal_the_logged_metrics(smoke, tmp_path):
    root, runs, _, _ = smoke
    out = tmp_path / "report"
    parent = runs[runs["tags.role"] == "parent"].iloc[0]["run_id"]
    assert main(["--tracking-uri", f"sqlite:///{root}/mlflow.db", "--sweep", parent, "--out", str(out)]) == 0
    for f in ("results.csv", "results.md", "fr_vs_zeta.png", "uaps.png"):
        assert (out / f).stat().st_size > 0, f
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4
    kids = children(runs).set_index("run_id")
    for r in rows:
        run = kids.loc[r["run_id"]]
        assert r["metric"] == "FR" and r["norm"] == run["params.attack.norm"]
        for col, metric in (("train", "train_fr"), ("test", "test_fr"), ("test_random", "test_fr_random")):
            assert float(r[col]) == pytest.approx(run[f"metrics.{metric}"], abs=1e-9)
    md = (out / "results.md").read_text()
    every = md.split("### Every run")[1]
    assert every.count("\n| phantom |") == 4 and "test random" in every
    linf = kids[kids["params.attack.norm"] == "linf"]
    for _, run in linf.iterrows():  # the paper-style L-inf table: "train / test" per zeta, UAP and random rows
        z = float(run["params.attack.zeta"])
        table = md.split("FR, L-inf")[1].split("###")[0].splitlines()
        col = cells(table[2]).index(f"zeta {z:g} %")
        uap = cells(next(line for line in table if "| UAP |" in line))[col]
        rnd = cells(next(line for line in table if "| random |" in line))[col]
        n = run["metrics.test_n"]  # with the 95 % Wilson interval of test over its n images
        ci = "[{:.2f}, {:.2f}]".format
        assert uap == (f"{run['metrics.train_fr']:.3f} / {run['metrics.test_fr']:.3f} "
                       f"{ci(*wilson(run['metrics.test_fr'], n))}")
        assert rnd == (f"{run['metrics.train_fr_random']:.3f} / {run['metrics.test_fr_random']:.3f} "
                       f"{ci(*wilson(run['metrics.test_fr_random'], n))}")
    table = [line for line in md.split("### Classifiers")[1].split("###")[0].splitlines() if line.startswith("|")]
    assert len(table) == 3  # one classifier for the whole sweep, named by model.name (not the timm arch)
    row = dict(zip(cells(table[0]), cells(table[2])))
    assert row["model"] == "tiny" and row["classifier"] == kids.iloc[0]["tags.config_hash"][:8]
    acc = kids.iloc[0]["metrics.test_acc"]
    assert (row["val acc"], row["test acc"]) == (f"{kids.iloc[0]['metrics.val_acc']:.3f}",
                                                 f"{acc:.3f} [{wilson(acc, 300)[0]:.2f}, {wilson(acc, 300)[1]:.2f}]")
    assert len(row["runs"].split(", ")) == 4  # the sweep's 4 runs use it
    assert "seed" not in cells(every.strip().splitlines()[0])  # one config: no config columns
    assert [c for c in cells(every.strip().splitlines()[0]) if "." in c] == []
    shares = md.split("Where non-targeted UAPs send")[1].split("###")[0]
    assert shares.count("| phantom |") == 2 and "->" in shares  # one row per norm at the headline zeta


def test_resume_is_scoped_to_the_sweep_and_to_the_code_version(tmp_path, monkeypatch):
    """A job done in another sweep (or outside any) is not taken as done: the sweep's report must find all of
    its jobs; and a classifier cache version bump changes every job's identity (old runs are not reused)."""
    cfg = make_cfg(["zeta=2"], tmp_path)
    jhash = identity.job_hash(cfg)
    assert identity.job_hash(make_cfg(["zeta=2.0", "sweep_name=other"], tmp_path)) == jhash  # same job, any sweep
    assert identity.job_hash(make_cfg(["zeta=4"], tmp_path)) != jhash
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    exp = mlflow.create_experiment("e")
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.set_tags({"job_hash": jhash, "sweep": "targets", "task": "train"})
        mlflow.log_metric("classifier/test_acc", 0.9)  # a train job's whole result
    assert sweep.finished_run(exp, jhash, "targets") == run.info.run_id
    assert sweep.finished_run(exp, jhash, "paper") is None
    assert sweep.finished_run(exp, jhash, None) is None
    monkeypatch.setattr(identity, "CLASSIFIER_VERSION", identity.CLASSIFIER_VERSION + 1)
    assert identity.job_hash(cfg) != jhash
