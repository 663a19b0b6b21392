"""The cluster path on one machine: sweeps through Hydra's submitit launcher (its local executor runs each job
as its own process through the machinery SLURM jobs use) and joblib, against a real MLflow tracking server
started by `make server`; each job's share of the cores; the SLURM preset; a server on PostgreSQL (slow)."""
import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import CONF, ROOT, mlflow_runs, run_cli
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from pipeline import sweep

# a short training and one UAP pass: these tests are about processes and runs, not about UAPs
QUICK = ["+sweep=smoke", "norm=linf", "trainer.max_epochs=2", "attack.max_iter=1"]
LAUNCHERS = {"submitit_local": ["hydra/launcher=submitit_local"],  # every job at once, each its own process
             "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]}  # two workers, the third job reuses one
AT_ONCE = {"submitit_local": 3, "joblib": 2}
# (first run, rerun). A sweep's parent does not depend on the launcher (`hydra/launcher=` is not a task override),
# so a sweep begun with one launcher resumes with another: begun on SLURM, finished on a workstation. One pair
# keeps `make test` short; the reversed pair runs the same checks the other way round, for about 50 s more.
PAIRS = [("submitit_local", "joblib")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen) -> None:
    """End a process started with start_new_session=True and everything it started: SIGTERM to its process
    group, SIGKILL to what is left after 10 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.time() + 10
        while time.time() < deadline:
            proc.poll()  # reap it
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def wait_for_server(uri: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        try:
            urllib.request.urlopen(uri + "/health", timeout=2).read()
            return
        except OSError:
            time.sleep(0.25)
    raise AssertionError(f"`make server` did not come up on {uri}:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def mlflow_server(backend: str, folder: Path):
    """`make server MLFLOW_BACKEND=backend` on a free port of 127.0.0.1, artifacts and its log in `folder`;
    yields its URI. The server and its workers are stopped at the end, also when a test fails."""
    port, log = free_port(), folder / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no GenAI job workers: a lighter start
    with open(log, "w") as out:
        proc = subprocess.Popen(["make", "-s", "-C", str(ROOT), "server", f"VENV={sys.prefix}",
                                 f"MLFLOW_BACKEND={backend}", f"MLFLOW_ARTIFACTS={folder / 'artifacts'}",
                                 f"MLFLOW_PORT={port}", "MLFLOW_WORKERS=1"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_for_server(uri, proc, log)
        yield uri
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One MLflow tracking server (SQLite backend) for this module's sweeps."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    with mlflow_server(f"sqlite:///{folder}/mlflow.db", folder) as uri:
        yield uri


def job_logs(root: Path) -> list[str]:
    """The job logs (Hydra's `__main__.log` in each job folder) of the newest multirun under `root`: for
    submitit jobs the only place their output goes besides `.submitit/`."""
    newest = max((root / "outputs" / "multirun").glob("*/*"), key=lambda p: (p.parent.name, p.name))
    return [p.read_text() for p in sorted(newest.glob("[0-9]*/__main__.log"))]


def assert_threads(logs: list[str], launcher: str) -> None:
    """Each job logged the torch threads it chose: its share of the cores among the jobs run at once."""
    at_once = AT_ONCE[launcher]
    for text in logs:
        threads = re.search(rf"torch threads: (\d+) \(\d+ cores here, {at_once} jobs at once\)", text)
        assert threads and int(threads[1]) == max(1, sweep.machine_cores() // at_once), text[-2000:]


@pytest.mark.parametrize("first, rerun", PAIRS, ids=lambda name: name)
def test_a_sweep_of_parallel_processes_against_a_tracking_server(server, tmp_path, first, rerun):
    """Three jobs in their own processes at once: a UAP made, a saved (zero) UAP evaluated, and one whose UAP
    file is broken, which fails after its run opened. Then the file is fixed and the sweep rerun with the other
    launcher: the finished jobs are skipped, the fixed one runs, under the same parent."""
    zeros, broken = tmp_path / "zeros.npy", tmp_path / "broken.npy"
    np.save(zeros, np.zeros((64, 64), np.float32))
    broken.write_text("not a UAP")
    experiment = f"cluster-{first}-{rerun}"
    args = [*QUICK, "zeta=2", f"attack.uap_file=null,{zeros},{broken}", "tracking=server", f"tracking.uri={server}",
            f"tracking.experiment={experiment}"]
    proc = run_cli([*args, *LAUNCHERS[first], "-m"], tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "1 of 3 jobs did not finish" in proc.stdout + proc.stderr
    runs = mlflow_runs(server, experiment)
    parents, kids = runs[runs["tags.role"] == "parent"], runs[runs["tags.mlflow.parentRunId"].notna()]
    assert len(parents) == 1 and len(kids) == 3 and len(runs) == 4
    parent = parents.iloc[0]
    assert set(kids["tags.mlflow.parentRunId"]) == {parent["run_id"]}  # the parent id reached every process
    status = dict(zip(kids["params.attack.uap_file"], kids["status"]))
    assert status == {"None": "FINISHED", str(zeros): "FINISHED", str(broken): "FAILED"}
    failed = kids[kids["status"] == "FAILED"].iloc[0]
    assert failed["tags.error"].startswith(f"ConfigError: attack.uap_file={broken}: cannot read")
    done = kids[kids["status"] == "FINISHED"]
    assert sorted(done["tags.classifier_cache"]) == ["hit", "trained"]  # one trains, the other waits on the lock
    assert (parent["status"], parent["tags.children"], parent["tags.children_failed"], parent["tags.jobs_failed"]) \
        == ("FAILED", "3", "1", "1")
    assert_threads(job_logs(tmp_path), first)

    np.save(broken, np.zeros((64, 64), np.float32))  # fixed: the rerun runs that job only
    run_cli([*args, *LAUNCHERS[rerun], "-m"], tmp_path)
    logs = job_logs(tmp_path)
    assert sum("skipped: this job's config already has a FINISHED run" in t for t in logs) == 2
    assert_threads(logs, rerun)
    again = mlflow_runs(server, experiment)
    new = again[~again["run_id"].isin(runs["run_id"])]
    assert len(new) == 1 and new.iloc[0]["params.attack.uap_file"] == str(broken)
    assert (new.iloc[0]["status"], new.iloc[0]["tags.classifier_cache"]) == ("FINISHED", "hit")
    assert new.iloc[0]["tags.mlflow.parentRunId"] == parent["run_id"]
    parent = again[again["run_id"] == parent["run_id"]].iloc[0]
    assert (parent["status"], parent["tags.children"], parent["tags.children_failed"], parent["tags.jobs_failed"]) \
        == ("FINISHED", "3", "0", "0")


def hydra_cfg(overrides: list[str], task_overrides: list[str] = ()):
    """The composed config with its `hydra` node, and the command line's overrides as a multirun sees them."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.overrides.task = list(task_overrides)
    return cfg


def test_each_job_gets_its_share_of_the_cores():
    assert [sweep.thread_share(16, n) for n in (1, 2, 3, 16, 40)] == [16, 8, 5, 1, 1]
    joblib = lambda n: hydra_cfg(["hydra/launcher=joblib", f"hydra.launcher.n_jobs={n}"]).hydra.launcher  # noqa: E731
    assert sweep.job_threads(joblib(2), cores=16, sweep_jobs=12) == 8
    assert sweep.job_threads(joblib(4), cores=16, sweep_jobs=2) == 8  # only 2 jobs to run: 2 at once
    assert sweep.job_threads(joblib(-1), cores=16, sweep_jobs=12) == 1  # -1: one job per core
    assert sweep.job_threads(joblib(-9), cores=16, sweep_jobs=12) == 2  # -9: 16 + 1 - 9 = 8 at once
    assert sweep.job_threads(joblib(2), cores=16, sweep_jobs=None) == 8
    assert sweep.job_threads(joblib(1), cores=16, sweep_jobs=12) is None  # one at a time: torch's default
    assert sweep.job_threads(joblib(4), cores=16, sweep_jobs=1) is None
    local = hydra_cfg(["hydra/launcher=submitit_local"]).hydra.launcher  # starts every job at once
    assert sweep.job_threads(local, cores=16, sweep_jobs=4) == 4 and sweep.job_threads(local, 16, None) is None
    slurm = hydra_cfg(["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=6"]).hydra.launcher
    assert sweep.job_threads(slurm, cores=64, sweep_jobs=192) == 6  # its own allocation
    assert sweep.job_threads(hydra_cfg([]).hydra.launcher, cores=16, sweep_jobs=4) is None  # one at a time


@pytest.mark.parametrize("task, size", [(["+sweep=smoke"], 4), (["+sweep=smoke", "norm=linf", "zeta=3,250"], 2),
                                        (["+sweep=paper"], 192), (["norm=linf,l2", "zeta=1,2,4"], 6),
                                        (["+sweep=smoke", "model=glob(tiny*)"], None)])
def test_the_sweep_size_is_its_number_of_jobs(task, size):
    cfg = hydra_cfg([o for o in task if o.startswith("+sweep")], task)
    assert sweep.sweep_size(cfg) == size


def test_the_slurm_preset_composes_over_submitit_slurm():
    launcher = hydra_cfg(["+sweep=paper", "hydra/launcher=slurm", "tracking=server",
                          "tracking.uri=http://HOST:5000", "hydra.launcher.partition=gpu"]).hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.cpus_per_task, launcher.mem_gb,
            launcher.timeout_min, launcher.array_parallelism) == ("gpu", 1, 8, 32, 240, 32)
    assert launcher.submitit_folder.endswith("/.submitit/%j") and launcher.max_num_timeout == 0  # the plugin's own keys


# --------------------------------------------------------------------------- PostgreSQL (slow)

def postgres_bindir() -> Path | None:
    found = shutil.which("initdb") or max(glob.glob("/usr/lib/postgresql/*/bin/initdb"), default=None)
    return Path(found).parent if found else None


@contextlib.contextmanager
def postgres_database():
    """A throwaway PostgreSQL cluster on a free port of 127.0.0.1 with a database `mlflow` of user `mlflow`;
    yields its SQLAlchemy URI. Run as the `postgres` user when we are root (PostgreSQL refuses root), in a
    folder of its own under /tmp (pytest's tmp_path is root's alone); stopped and removed at the end."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    pytest.importorskip("psycopg", reason="psycopg (the PostgreSQL driver) is missing: pip install -e '.[cluster]'")
    as_user = []
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, which PostgreSQL refuses, and there is no `postgres` user to run it as")
        as_user = ["runuser", "-u", "postgres", "--"]
    folder = Path(tempfile.mkdtemp(prefix="uap-cxr-pg-"))
    (folder / "password").write_text("secret\n")
    if as_user:
        for p in (folder, folder / "password"):
            os.chown(p, owner.pw_uid, owner.pw_gid)
    port, data = free_port(), folder / "data"

    def pg(tool: str, *args: str, check: bool = True) -> None:
        proc = subprocess.run([*as_user, str(bindir / tool), *args], cwd=folder, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0 or not check, f"{tool} {' '.join(args)}: {proc.stdout}{proc.stderr}"

    try:
        pg("initdb", "-D", str(data), "-U", "mlflow", f"--pwfile={folder / 'password'}", "--auth=scram-sha-256",
           "-E", "UTF8")
        pg("pg_ctl", "-D", str(data), "-l", str(folder / "postgres.log"), "-w", "start",
           "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1")
        import psycopg  # the cluster extra: only where it is installed (importorskip above skips otherwise)
        with psycopg.connect(host="127.0.0.1", port=port, user="mlflow", password="secret", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute("CREATE DATABASE mlflow")
        yield f"postgresql://mlflow:secret@127.0.0.1:{port}/mlflow"
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "immediate", "stop", check=False)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_a_tracking_server_on_postgresql_takes_parallel_jobs(tmp_path):
    """`make server MLFLOW_BACKEND=postgresql://...`; the jobs' tracking.uri is the server's, as with SQLite."""
    with postgres_database() as db, mlflow_server(db, tmp_path) as uri:
        run_cli([*QUICK, "zeta=2,4", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "tracking=server",
                 f"tracking.uri={uri}", "-m"], tmp_path)
        runs = mlflow_runs(uri)
        parents, kids = runs[runs["tags.role"] == "parent"], runs[runs["tags.mlflow.parentRunId"].notna()]
        assert len(parents) == 1 and len(kids) == 2 and set(runs["status"]) == {"FINISHED"}
        assert set(kids["tags.mlflow.parentRunId"]) == {parents.iloc[0]["run_id"]}
        assert sorted(kids["tags.classifier_cache"]) == ["hit", "trained"]
        import sqlalchemy  # only this slow PostgreSQL test needs it: imported here, like psycopg
        with sqlalchemy.create_engine(db).connect() as conn:  # the runs are in PostgreSQL
            stored = conn.execute(sqlalchemy.text("SELECT run_uuid, status FROM runs")).all()
        assert sorted(stored) == sorted(zip(runs["run_id"], runs["status"]))
