"""Nothing lost or done twice: a new store opened by many processes, the same sweep started twice, a sweep
stopped by a signal and resumed, a dead tracking server, one row per job in the sweep summary."""
import os
import signal
import subprocess
import sys
import time

import mlflow
import psutil
from conftest import ROOT, mlflow_runs, run_cli
from test_reliability import start, wait_for

from pipeline import sweep


def test_a_new_store_opened_by_four_processes_at_once_is_created_once(tmp_path):
    """MLflow creates a SQLite store's tables on first use; four processes doing it in the same instant get one
    experiment and a working store, with no `table _alembic_tmp_... already exists` error."""
    code = ("import sys, time; from omegaconf import OmegaConf; from pipeline import tracking\n"
            "cfg = OmegaConf.create({'uri': f'sqlite:///{sys.argv[1]}/mlflow.db', 'experiment': 'uap-cxr'})\n"
            "while time.time() < float(sys.argv[2]): time.sleep(0.001)\n"
            "print('experiment', tracking.setup(cfg))")
    at = str(time.time() + 8)  # all four call setup at this instant, after their imports
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), at], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(4)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    assert {o.strip().splitlines()[-1] for o in outs} == {"experiment 1"}
    assert len(mlflow_runs(tmp_path)) == 0  # the store works afterwards


def sweep_env(root):
    return {**os.environ, "UAP_CXR_ROOT": str(root), "PYTHONUNBUFFERED": "1"}


def finished_children(runs):
    kids = runs[runs["tags.mlflow.parentRunId"].notna()]
    return kids[kids["status"] == "FINISHED"]


SMALL = ["+sweep=smoke", "norm=linf", "zeta=2,4", "trainer.max_epochs=8"]  # two jobs, a short training


def test_the_same_sweep_started_twice_at_once_runs_each_job_once(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline", *SMALL, "-m"], cwd=ROOT,
                              env=sweep_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    runs = mlflow_runs(tmp_path)
    parents = runs[runs["tags.role"] == "parent"]
    assert len(parents) == 1 and parents.iloc[0]["status"] == "FINISHED"  # closed by the last one to end
    assert parents.iloc[0]["tags.children"] == "2"
    kids = runs[runs["tags.mlflow.parentRunId"].notna()]
    assert len(kids) == 2 and set(kids["status"]) == {"FINISHED"}  # no config finished twice
    assert sorted(kids["tags.classifier_cache"]) == ["hit", "trained"]
    text = "".join(outs)
    assert text.count("skipped: this job's config already has a FINISHED run") == 2  # the other process's
    assert "still runs it and will close the parent run" in text


def test_sigterm_stops_a_joblib_sweep_and_a_rerun_resumes(tmp_path):
    args = [*SMALL, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "-m"]
    proc = start(args, tmp_path)
    wait_for(proc, "training tiny")  # one worker trains, the other waits for its classifier
    time.sleep(3)
    workers = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "interrupted; rerun the same command to resume" in out
    time.sleep(5)  # no worker goes on to take the next queued job
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE
                and "resource_tracker" not in " ".join(w.cmdline())]
    runs = mlflow_runs(tmp_path)
    parent = runs[runs["tags.role"] == "parent"].iloc[0]
    kids = runs[runs["tags.mlflow.parentRunId"].notna()]
    assert parent["status"] == "KILLED" and len(kids) >= 1 and set(kids["status"]) == {"KILLED"}  # none RUNNING

    again = run_cli(args, tmp_path)  # the same command resumes: same parent, every job done once
    runs = mlflow_runs(tmp_path)
    parents = runs[runs["tags.role"] == "parent"]
    assert len(parents) == 1 and parents.iloc[0]["run_id"] == parent["run_id"]
    assert parents.iloc[0]["status"] == "FINISHED"
    assert parents.iloc[0]["tags.children"] == "2" and parents.iloc[0]["tags.children_failed"] == "0"
    done = finished_children(runs)
    assert len(done) == 2 and done["tags.job_hash"].nunique() == 2
    assert sorted(done["tags.classifier_cache"]).count("trained") == 1
    assert "resuming sweep 'smoke'" in again.stdout + again.stderr


def test_a_sweep_with_no_tracking_server_fails_before_any_job(tmp_path):
    t0 = time.time()
    proc = run_cli(["+sweep=smoke", "tracking=server", "tracking.uri=http://127.0.0.1:9", "-m"], tmp_path, check=False)
    assert proc.returncode == 2 and time.time() - t0 < 60
    text = proc.stdout + proc.stderr
    assert "not reachable" in text and "Traceback" not in text and "Launching" not in text
    assert not (tmp_path / "outputs" / "cache").exists()


def test_the_sweep_summary_counts_a_job_once(tmp_path):
    """A job KILLED and then redone to FINISHED is finished; a job that only failed is not."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    exp = mlflow.create_experiment("e")
    client = mlflow.MlflowClient()
    parent = client.create_run(exp).info.run_id
    for job, status in (("a", "KILLED"), ("a", "FINISHED"), ("b", "FAILED"), ("c", "FINISHED"), ("c", "FAILED"),
                        ("d", "FINISHED")):
        run = client.create_run(exp, tags={"mlflow.parentRunId": parent, "job_hash": job, "overrides": job,
                                           "task": "train"})
        if job != "d":  # d: FINISHED without its result (closed early)
            client.log_metric(run.info.run_id, "classifier/test_acc", 0.9)
        client.set_terminated(run.info.run_id, status)
        time.sleep(0.01)
    rows = sweep.summary_rows(exp, parent)
    assert [(r["overrides"], r["status"]) for r in rows] == [("a", "FINISHED"), ("b", "FAILED"), ("c", "FINISHED"),
                                                             ("d", "INCOMPLETE")]
