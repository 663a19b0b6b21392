"""A result is FINISHED only when it is complete, and the store and the caches never poison each other.

A job killed after training (SIGKILL, out of memory, a time limit) leaves no FINISHED run, and the resumed sweep
closes it KILLED and redoes the job; a new store beside an old classifier cache; a store locked by another process
(waited for, then a clear message with the results kept in the run folder); bad inputs that are one line, rc 2.
"""
import json
import shutil
import signal
import socket
import subprocess
import sys

import mlflow
import numpy as np
import pytest
from conftest import ROOT, mlflow_runs, run_cli
from test_data import good_lines, write_set
from test_reliability import start, wait_for

from pipeline import sweep, tracking

QUICK = ["trainer=fast", "trainer.max_epochs=2", "data.n_train=120", "data.n_test=60"]
SHORT_ATTACK = ["attack.max_iter=8", "attack.delta=0"]  # a few passes: the job is killed as its search starts


def hold_lock(db, seconds: float) -> subprocess.Popen:
    """Another process holding the SQLite store with BEGIN EXCLUSIVE (as a backup or a stuck writer would)."""
    code = ("import sqlite3, sys, time\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute('BEGIN EXCLUSIVE')\n"
            "print('locked', flush=True)\n"
            "time.sleep(float(sys.argv[2]))\n"
            "c.execute('COMMIT')\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(db), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A root whose store and classifier cache hold the QUICK classifier (trained once for this module)."""
    root = tmp_path_factory.mktemp("trained")
    run_cli([*QUICK, "task=train"], root)
    return root


def copy_of(root, to):
    shutil.copytree(root, to, dirs_exist_ok=True)
    return to


def test_a_job_killed_after_training_is_not_finished_and_the_resumed_sweep_redoes_it(tmp_path):
    args = [*QUICK, *SHORT_ATTACK, "zeta=1,2", "-m"]
    proc = start(args, tmp_path)
    wait_for(proc, "fgsm_uap: eps=")  # the classifier is trained and logged; the first UAP search starts
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    runs = mlflow_runs(tmp_path)
    child = runs[runs["tags.mlflow.parentRunId"].notna()]
    assert list(child["status"]) == ["RUNNING"], child[["status"]]  # not FINISHED: its result is not there
    assert child["metrics.test_acc"].notna().all()  # what it logged before the kill is kept
    killed = child.iloc[0]["run_id"]

    again = run_cli(args, tmp_path)
    assert "left RUNNING by a process that is gone: marked KILLED" in again.stdout + again.stderr
    runs = mlflow_runs(tmp_path).set_index("run_id")
    assert runs.loc[killed, "status"] == "KILLED" and "ended without closing" in runs.loc[killed, "tags.error"]
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    done = children[children["status"] == "FINISHED"]
    assert sorted(done["params.attack.zeta"].astype(float)) == [1.0, 2.0]  # the killed job redone, the other run
    assert done["metrics.test_fr"].notna().all() and done["metrics.test_fr_random"].notna().all()
    parent = runs[runs["tags.role"] == "parent"].iloc[0]
    assert parent["status"] == "FINISHED" and parent["tags.children_failed"] == "0"


def test_a_finished_run_without_its_result_is_not_a_done_job(tmp_path):
    """Resume and the sweep summary count a job done only when its run holds the metrics the report reads."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    exp = mlflow.create_experiment("e")
    with mlflow.start_run(experiment_id=exp) as early:  # FINISHED with the classifier's metric only
        mlflow.set_tags({"job_hash": "j1", "sweep": "s", "task": "attack"})
        mlflow.log_metric("classifier/test_acc", 0.9)
    assert sweep.finished_run(exp, "j1", "s") is None
    with mlflow.start_run(experiment_id=exp) as full:
        mlflow.set_tags({"job_hash": "j1", "sweep": "s", "task": "attack"})
        tracking.log_metrics({"test_acc": 0.9, "test_fr": 0.5, "test_fr_random": 0.1, "train_fr": 0.6, "eps": 0.01})
    assert sweep.finished_run(exp, "j1", "s") == full.info.run_id
    assert not tracking.complete(mlflow.get_run(early.info.run_id))


def test_a_run_left_running_by_a_dead_process_is_closed_killed(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    exp = mlflow.create_experiment("e")
    parent = mlflow.MlflowClient().create_run(exp).info.run_id
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    client = mlflow.MlflowClient()
    orphan = client.create_run(exp, tags={"mlflow.parentRunId": parent,
                                          "sweep_launcher": f"{socket.gethostname()}:{dead}"})
    mine = client.create_run(exp, tags={"mlflow.parentRunId": parent, "sweep_launcher": sweep.launcher()})
    elsewhere = client.create_run(exp, tags={"mlflow.parentRunId": parent, "sweep_launcher": "otherhost:1"})
    assert tracking.close_dead_runs(exp, parent) == 1
    assert [client.get_run(r.info.run_id).info.status for r in (orphan, mine, elsewhere)] == [
        "KILLED", "RUNNING", "RUNNING"]
    # a single run (no sweep) killed with -9: the next run opened in the store closes it, by its `process` tag
    single = client.create_run(exp, tags={"process": f"{socket.gethostname()}:{dead}"})
    assert tracking.close_dead_runs(exp) == 1 and client.get_run(single.info.run_id).info.status == "KILLED"
    assert client.get_run(mine.info.run_id).info.status == "RUNNING"


def test_a_new_store_beside_an_old_classifier_cache_logs_the_classifier_anew(trained, tmp_path):
    """The cache entry's link to its MLflow model is keyed by the store's absolute identity and checked: a store
    deleted and made anew at the same path gets the classifier logged again instead of a foreign key error."""
    args = [*QUICK, "task=train"]
    run_cli(args, copy_of(trained, tmp_path))  # this store's run logs the cached classifier, linked in its entry
    (tmp_path / "mlflow.db").unlink()
    again = run_cli(args, tmp_path)
    assert "not in this store: logging it again" in again.stdout + again.stderr
    run = mlflow_runs(tmp_path).iloc[0]
    assert run["status"] == "FINISHED" and run["tags.classifier_cache"] == "hit"
    assert mlflow.MlflowClient().get_logged_model(run["tags.classifier_model"].split("/")[-1]) is not None
    entry = next((tmp_path / "outputs" / "cache" / "classifiers").iterdir())
    links = json.loads((entry / "mlflow.json").read_text())
    assert f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}" in links  # keyed by the store's absolute path


def test_store_identity_is_absolute_and_ignores_the_query(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking.store_identity("sqlite:///./mlflow.db") == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    assert tracking.store_identity("sqlite:///mlflow.db?timeout=30") == tracking.store_identity("sqlite:///./mlflow.db")
    assert tracking.store_uri("sqlite:///m.db", 60) == "sqlite:///m.db?timeout=60"
    assert tracking.store_uri("http://host:5000", 60) == "http://host:5000"


def test_a_busy_store_is_waited_for_at_the_start_and_at_the_end(trained, tmp_path):
    copy_of(trained, tmp_path)  # the store and the classifier exist
    # locked from before the job starts for longer than its imports and sqlite3's default 5 s wait
    holder = hold_lock(tmp_path / "mlflow.db", 14)
    proc = start([*QUICK, *SHORT_ATTACK], tmp_path)
    wait_for(proc, "fgsm_uap: eps=")
    holder.wait(timeout=30)
    holder = hold_lock(tmp_path / "mlflow.db", 12)  # and again as the short search ends: its results wait
    out, _ = proc.communicate(timeout=300)
    holder.wait(timeout=30)
    assert proc.returncode == 0, out[-3000:]
    run = mlflow_runs(tmp_path).sort_values("start_time").iloc[-1]
    assert run["status"] == "FINISHED" and run["metrics.test_fr"] >= 0


def test_a_store_busy_past_its_timeout_is_one_line_and_the_results_stay_in_the_run_folder(trained, tmp_path):
    copy_of(trained, tmp_path)
    proc = start([*QUICK, *SHORT_ATTACK, "tracking.busy_timeout=2"], tmp_path)
    wait_for(proc, "fgsm_uap: eps=")
    holder = hold_lock(tmp_path / "mlflow.db", 120)
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        holder.kill()
    assert proc.returncode == 2, out[-3000:]
    assert "stayed locked by another process for more than tracking.busy_timeout=2 s" in out
    assert "Traceback" not in out
    folder = next(p.parent for p in (tmp_path / "outputs" / "runs").rglob("uap.npy"))  # the attack's run folder
    assert str(folder) in out
    metrics = json.loads((folder / "metrics.json").read_text())
    assert {"test_fr", "test_fr_random", "test_acc"} <= set(metrics)
    assert np.load(folder / "uap.npy").shape == (64, 64)


def test_a_cache_folder_that_cannot_be_written_is_refused_before_a_run_opens(tmp_path):
    (tmp_path / "a_file").write_text("")
    proc = run_cli([*QUICK, f"paths.cache_dir={tmp_path / 'a_file' / 'cache'}"], tmp_path, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "paths.cache_dir=" in text and "cannot write there" in text, text[-2000:]
    assert "Traceback" not in text and len(mlflow_runs(tmp_path)) == 0


def test_an_unusable_classifier_file_is_refused_before_a_run_opens(tmp_path):
    (tmp_path / "classifier.pt").write_bytes(b"not a checkpoint")
    proc = run_cli([*QUICK, f"classifier_file={tmp_path / 'classifier.pt'}"], tmp_path, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "unusable checkpoint" in text and "Traceback" not in text
    assert len(mlflow_runs(tmp_path)) == 0


def test_33_training_images_at_batch_32_train(tmp_path):
    """A last batch of one image (BatchNorm: `Expected more than 1 value per channel`) is dropped."""
    train = good_lines("p", 11, 11)  # 33 images
    write_set(tmp_path / "set", train, good_lines("q", 2, 2), size=(40, 40))
    proc = run_cli(["task=train", "data=covidx", f"data.root={tmp_path / 'set'}", "data.train_dir=images",
             "data.test_dir=images", "data.image_size=32", "data.val_fraction=0", "data.batch_size=32",
             "trainer=fast", "trainer.max_epochs=1"], tmp_path)
    assert "train: 33 images" in proc.stdout + proc.stderr
    run = mlflow_runs(tmp_path).iloc[0]
    assert run["status"] == "FINISHED" and run["metrics.test_acc"] >= 0


DISK_FULL = """
import resource, signal, sys
sys.path.insert(0, {tests!r})
from conftest import make_cfg
from pipeline.classifier import new_classifier, save_checkpoint
from pipeline.errors import StorageError
model = new_classifier(make_cfg([]), ["a", "b", "c"])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as a full disk fails
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
try:
    save_checkpoint(model, __import__("pathlib").Path(sys.argv[1]) / "classifier.pt", {{}})
except StorageError as e:
    print("error:", e)
"""


def test_a_disk_that_fills_while_writing_is_one_line_and_leaves_no_temporary_file(tmp_path):
    proc = subprocess.run([sys.executable, "-c", DISK_FULL.format(tests=str(ROOT / "tests")), str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.stdout.startswith("error: cannot write"), proc.stdout + proc.stderr[-3000:]
    assert "is the disk full?" in proc.stdout and str(tmp_path / "classifier.pt") in proc.stdout
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor its temporary file
