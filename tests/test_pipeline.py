"""End to end on the phantom default: `python -m pipeline` trains, attacks, logs everything to MLflow."""
import json
import re

import mlflow
import numpy as np
import pytest
import torch
from conftest import FAST, assert_cache_hit, mlflow_runs, run_cli
from mlflow import pytorch as mlflow_pytorch
from PIL import Image

ARTIFACTS = {"uap.npy", "uap.png", "examples.png", "confusion_clean.png", "confusion_uap.png",
             "confusion_random.png", "confusion_classifier.png", "metrics.json", "hydra"}
METRICS = [f"{s}_{m}" for s in ("train", "test") for m in
           ("acc_clean", "acc_uap", "acc_random", "fr", "fr_label", "fr_random")] + [
    "uap_norm", "uap_seconds", "uap_passes", "uap_queries", "eps", "test_acc", "val_acc"]


def artifacts(run_id):
    return {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    args = [*FAST, "zeta=4"]
    first = run_cli(args, root)
    second = run_cli(args, root)
    return root, first, second


def test_run_logs_params_metrics_artifacts_and_tags(two_runs):
    root, first, _ = two_runs
    runs = mlflow_runs(root).sort_values("start_time")
    assert len(runs) == 2 and set(runs["status"]) == {"FINISHED"}
    run = runs.iloc[0]
    for m in METRICS:
        assert not np.isnan(run[f"metrics.{m}"]), m
    assert run["params.model.arch"] == "test_resnet" and run["params.attack.norm"] == "linf"
    assert float(run["params.attack.eps"]) == pytest.approx(run["metrics.eps"], rel=1e-6)
    assert run["metrics.uap_norm"] <= run["metrics.eps"] * (1 + 1e-6)
    assert run["tags.choice.model"] == "tiny" and run["tags.git_commit"]
    assert ARTIFACTS <= artifacts(run["run_id"])
    # the precision each loop used: a param, and in the console summary
    used = {loop: run[f"params.precision.{loop}"] for loop in ("train", "attack", "eval")}
    assert run["params.precision"] == "auto" and set(used.values()) <= {"fp32", "fp32+cl", "bf16", "bf16+cl"}
    assert f"precision=auto: train {used['train']}, attack {used['attack']}, eval {used['eval']}" in first.stdout
    # the console summary
    assert "result: tiny" in first.stderr + first.stdout and "FR random" in first.stderr + first.stdout
    # MLflow holds the grouped names (charts in sections), the flat ones are what mlflow_runs reads back
    assert {"test/fr", "train/fr_random", "classifier/test_acc", "uap/eps", "fit/val_acc"} <= set(
        mlflow.get_run(run["run_id"]).data.metrics)
    assert run["tags.mlflow.runName"] == "linf z4 · tiny · fgsm_uap · trainer=fast trainer.max_epochs=20"


def test_the_console_shows_labelled_progress_and_no_library_noise(two_runs):
    _, first, _ = two_runs
    text = first.stdout + first.stderr
    assert "classifier epoch 1/20: train loss" in text and "UAP pass 1/15, " in text  # not a TTY: lines
    assert re.search(r"UAP pass 1/15, \d+ queries, FR ", text)  # the images sent to the classifier so far
    for noise in ("GPU available", "Seed set", "litlogger", "LeafSpec", "configure_optimizers", "in eval mode",
                  "`max_epochs=", "Epoch 0", "it/s]", "Pickle"):
        assert noise not in text, noise


def test_the_classifier_is_an_mlflow_model_that_runs_link_to(two_runs):
    root, _, _ = two_runs
    first, second = (r for _, r in mlflow_runs(root).sort_values("start_time").iterrows())
    assert second["tags.classifier_run_id"] == first["run_id"]  # the cached one links to the run that trained it
    assert first["tags.classifier_model"] == second["tags.classifier_model"]
    assert first["tags.classifier_registered"] == "models:/uap-cxr-tiny/1"
    net = mlflow_pytorch.load_model(first["tags.classifier_registered"])
    cached = torch.load(first["tags.classifier_path"], weights_only=True)["state_dict"]
    assert all(torch.equal(v, cached[f"net.{k}"]) for k, v in net.state_dict().items())
    model = mlflow.get_logged_model(first["tags.classifier_model"].split("/")[-1])
    assert {m.run_id for m in model.metrics if m.key == "test/fr"} == {first["run_id"], second["run_id"]}


def test_the_run_folder_holds_readable_outputs(two_runs):
    root, _, _ = two_runs
    folders = sorted((root / "outputs" / "runs").glob("*/*"))
    out = folders[0]
    uap = np.load(out / "uap.npy")
    assert uap.dtype == np.float32 and uap.shape == (64, 64)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["uap_norm"] == pytest.approx(np.abs(uap).max(), rel=1e-5)
    assert Image.open(out / "uap.png").size[0] > 100
    assert (out / ".hydra" / "config.yaml").is_file()


def test_second_identical_run_hits_the_classifier_cache(two_runs):
    root, first, second = two_runs
    runs = mlflow_runs(root).sort_values("start_time")
    assert_cache_hit(runs, second)
    assert runs.iloc[0]["metrics.test_acc"] == runs.iloc[1]["metrics.test_acc"]
    assert runs.iloc[0]["metrics.test_fr"] == runs.iloc[1]["metrics.test_fr"]  # deterministic on CPU


def test_phantom_default_recipe_is_learnable(two_runs):
    root, _, _ = two_runs
    acc = mlflow_runs(root).iloc[0]["metrics.test_acc"]
    assert acc >= 0.90, acc


def test_a_failed_run_is_marked_failed_and_keeps_what_was_logged(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli(["data=covidx", f"data.root={tmp_path / 'empty'}", "trainer=fast"], tmp_path, check=False)
    assert proc.returncode == 2 and "label file not found" in proc.stderr + proc.stdout
    run = mlflow_runs(tmp_path).iloc[0]
    assert run["status"] == "FAILED" and "label file not found" in run["tags.error"]
    assert run["params.data.root"] == str(tmp_path / "empty")
