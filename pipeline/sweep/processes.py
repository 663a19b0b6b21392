"""The processes that run a sweep: a registry per sweep (the same sweep started twice shares one parent run, and the
last process to end closes it), the launching process's state, and signals (SIGTERM / Ctrl-C stop the workers,
mark this process's running children and, unless another process runs the sweep, the parent KILLED)."""
import json
import logging
import os
import signal
import socket
from pathlib import Path

import psutil
from filelock import FileLock

from pipeline import files, tracking
from pipeline.sweep.jobs import launcher

log = logging.getLogger(__name__)


WORKER_GRACE = 60  # seconds the workers get to close their runs after a signal


def sweep_lock(cache_dir: str, shash: str) -> tuple[FileLock, Path]:
    folder = Path(cache_dir) / "sweeps"
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / f"{shash}.lock")), folder / f"{shash}.json"


def register(registry: Path, add: bool) -> list[dict]:
    """Add or remove this process in the sweep's registry (under its lock); the others still alive."""
    try:
        entries = json.loads(registry.read_text()) if registry.is_file() else []
    except ValueError:  # unreadable (written by an older version, not atomically): the live processes re-register
        entries = []
    others = [e for e in entries if e["pid"] != os.getpid() or e["host"] != socket.gethostname()]
    others = [e for e in others if tracking.process_alive(f"{e['host']}:{e['pid']}", e["created"])]
    me = {"host": socket.gethostname(), "pid": os.getpid(), "created": psutil.Process().create_time()}
    files.write_json(registry, others + [me] if add else others)
    return others


class State:
    """What the launching process knows of its sweep (for the end, an interruption and the exit code)."""
    run_id: str | None = None
    experiment_id: str | None = None
    name = "sweep"
    lock: FileLock | None = None
    registry: Path | None = None
    exit_code = 0
    signal: int | None = None


def stop_on_signal() -> None:
    """In the launching process: SIGTERM / Ctrl-C passes SIGTERM to the workers and waits (a minute at
    most) while each closes its run KILLED and exits, then interrupts the sweep; `interrupted` closes
    what is left."""
    def handler(signum, frame):
        State.signal = signum
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not break the clean-up
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs = workers()
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.Error:  # gone meanwhile
                pass
        if procs:
            log.warning("signal %d: stopping %d workers (each closes its run KILLED)", signum, len(procs))
        psutil.wait_procs(procs, timeout=WORKER_GRACE)
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def workers() -> list:
    """The processes running this sweep's jobs (joblib's loky workers; not its resource tracker, which
    ends by itself with this process)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def interrupted() -> int:
    """Clean up after a signal or Ctrl-C in the launching process: stop workers still there, mark this
    process's running children and (unless another process runs the sweep) the parent KILLED. Returns
    the exit code, 128 + the signal."""
    for p in workers():
        try:
            p.kill()
        except psutil.Error:
            pass
    code = 128 + (State.signal or signal.SIGINT)
    if not State.run_id:
        return code
    client = tracking.client()
    mine = tracking.search(State.experiment_id, f"tags.mlflow.parentRunId = '{State.run_id}' and attributes.status"
                                                f" = 'RUNNING' and tags.sweep_launcher = '{launcher()}'")
    for r in mine:
        client.set_tag(r.info.run_id, "error", "interrupted: the sweep was stopped")
        client.set_terminated(r.info.run_id, "KILLED")
    with State.lock:
        others = register(State.registry, add=False)
    if not others:
        client.set_tag(State.run_id, "error", f"interrupted (signal {State.signal or signal.SIGINT})")
        client.set_terminated(State.run_id, "KILLED")
    log.error("sweep %r interrupted%s; rerun the same command to resume", State.name,
              "" if not others else " (its parent run stays open for the other process running it)")
    return code
