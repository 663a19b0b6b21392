"""MLflow presentation, without a pipeline run: grouped metric names, the experiment's kind and default view
(new and existing stores), the sweep parent's headline metrics, run names, labelled progress."""
import json
import time

import mlflow
import pytest
from conftest import make_cfg
from omegaconf import OmegaConf

from pipeline import progress, sweep, tracking
from pipeline.job import run_names

FLAT = ["test_fr", "train_fr_random", "test_acc_clean", "test_uap_share_COVID-19", "test_clean_sens_normal",
        "test_acc", "val_acc", "test_sens_COVID-19", "test_ppv_normal", "eps", "zeta", "uap_norm", "random_norm",
        "uap_seconds", "uap_passes", "uap_queries", "input_fr", "input_tsr", "uap_pass_input_fr", "uap_pass_queries",
        "defense_acc_clean",
        "defense_fr_fresh_before", "min_zeta", "min_zeta_below", "min_zeta_target_fr", "probe_fr", "train_n",
        "test_n", "val_n"]


def test_metric_names_are_grouped_for_mlflow_and_read_back_flat():
    grouped = {k: tracking.mlflow_key(k) for k in FLAT}
    assert grouped["test_fr"] == "test/fr" and grouped["test_acc"] == "classifier/test_acc"
    assert grouped["test_acc_clean"] == "test/acc_clean" and grouped["uap_seconds"] == "uap/seconds"
    assert grouped["test_sens_COVID-19"] == "classifier/test_sens_COVID-19"
    assert grouped["test_clean_sens_normal"] == "test/clean_sens_normal"  # the attack's, not the classifier's
    assert all("/" in v for v in grouped.values())
    assert len(set(grouped.values())) == len(FLAT)
    assert {tracking.flat_key(v): 0 for v in grouped.values()}.keys() == set(FLAT)
    # an old store's flat names and Lightning's curves are read as they are
    assert tracking.flat_metrics({"test_fr": 0.5, "fit/val_acc": 0.9, "test/fr_random": 0.1}) == {
        "test_fr": 0.5, "fit/val_acc": 0.9, "test_fr_random": 0.1}


def test_the_experiment_opens_on_its_runs_table_in_new_and_existing_stores(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    old = mlflow.create_experiment("uap-cxr")  # an existing experiment without tags
    mlflow.MlflowClient().set_experiment_tag(old, "mlflow.note.content", "my own note")
    cfg = OmegaConf.create({"uri": uri, "experiment": "uap-cxr", "artifact_root": None})
    assert tracking.setup(cfg) == old
    tags = mlflow.get_experiment(old).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["mlflow.note.content"] == "my own note"  # a user's note is kept
    view = json.loads(tags[f"mlflow.sharedViewState.{tracking.VIEW_KEY}"])
    for col in ("metrics.`test/fr`", "metrics.`test/fr_random`", "metrics.`test/tsr`", "metrics.`test/acc_clean`",
                "params.`attack.zeta`", "params.`attack.norm`", "params.`attack.target`"):
        assert col in view["selectedColumns"], col
    new = tracking.setup(OmegaConf.create({**cfg, "experiment": "other"}))
    assert mlflow.get_experiment(new).tags["mlflow.experimentKind"] == "custom_model_development"
    assert tracking.ui_url(new).endswith(f"/#/experiments/{new}/runs?viewStateShareKey=uap-cxr"
                                         "&workflowType=machine_learning")


def test_the_sweep_parent_gets_each_jobs_headline_numbers():
    rows = [{"status": "FINISHED", "model": "tiny", "norm": "linf", "zeta": "2.0", "target": None,
             "test_fr": 0.5, "test_fr_random": 0.01},
            {"status": "FINISHED", "model": "tiny", "norm": "l2", "zeta": "0.5", "target": "COVID-19",
             "test_tsr": 0.9, "test_tsr_random": 0.3, "test_fr": 0.6, "test_fr_random": 0.02},
            {"status": "FAILED", "model": "tiny", "norm": "l2", "zeta": "4", "target": None}]
    assert sweep.headline(rows) == {"tiny/linf z2 FR": 0.5, "tiny/linf z2 FR random": 0.01,
                                    "tiny/l2 z0.5 TSR COVID-19": 0.9, "tiny/l2 z0.5 TSR COVID-19 random": 0.3}


def test_run_names_are_short_telling_part_first_with_a_long_form():
    cfg = make_cfg(["model=resnet18", "attack=sgd_uap", "norm=l2", "zeta=4", "attack.target=COVID-19"])
    short, long = run_names(cfg, "attack")
    assert short == "l2 z4 COVID-19 · resnet18 · sgd_uap"
    assert "seed=42" in long and "resnet18 (resnet18)" in long and "zeta=4" in long
    assert run_names(make_cfg(["model=tiny_effnet"]), "train")[0] == "train · tiny_effnet"
    assert run_names(make_cfg([]), "defense")[0].startswith("defense linf z2 · tiny")


def test_system_metrics_are_recorded_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    cfg = make_cfg(["tracking.system_metrics=true"], tmp_path)
    with tracking.start_run(cfg, run_name="probe") as run:
        time.sleep(2)
    metrics = mlflow.get_run(run.info.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics


@pytest.mark.parametrize("tty", [True, False])
def test_progress_is_a_labelled_bar_on_a_terminal_and_lines_in_a_log(monkeypatch, tty):
    monkeypatch.setattr(progress, "interactive", lambda: tty)
    kw = progress.trainer_progress(True, lambda t: "UAP pass 1/3", lambda t: "line")
    assert kw["enable_progress_bar"] is tty
    assert [type(c) for c in kw["callbacks"]] == [progress.LabelledBar if tty else progress.EpochLines]
    off = progress.trainer_progress(False, lambda t: "x")  # bars off: neither bar nor (without `line`) lines
    assert off == {"enable_progress_bar": False, "callbacks": []}
