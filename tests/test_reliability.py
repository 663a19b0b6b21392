"""Reliability: interrupted runs keep what they logged, bad cache files are rebuilt, clear errors early."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, ROOT, make_cfg, mlflow_runs, run_cli
from test_data import good_lines, write_set

from pipeline import tasks
from pipeline.attack import lp_norms
from pipeline.attack.initializer import check_budget, load_uap_file
from pipeline.classifier import new_classifier, save_checkpoint, train_or_load
from pipeline.errors import ConfigError, UserError, instantiate
from pipeline.identity import classifier_key, job_hash


def interruptible() -> None:
    """In the child: Ctrl-C as on a terminal. A test run started in the background (`make test &`, nohup)
    inherits SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(args, root):
    env = {**os.environ, "UAP_CXR_ROOT": str(root), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=interruptible)


def wait_for(proc, text, timeout=180):
    seen, t0 = [], time.time()
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"{text!r} not seen:\n{''.join(seen)[-3000:]}")


@pytest.mark.parametrize("sig, when, epochs", [(signal.SIGTERM, "training tiny", 40),  # long training
                                               (signal.SIGINT, "fgsm_uap: eps=", 20)])  # then a long attack
def test_interrupted_run_is_killed_and_keeps_what_was_logged(tmp_path, sig, when, epochs):
    args = ["trainer=fast", f"trainer.max_epochs={epochs}", "attack.max_iter=200", "attack.delta=0"]
    proc = start(args, tmp_path)
    wait_for(proc, when)
    time.sleep(2)
    proc.send_signal(sig)
    proc.communicate(timeout=300)  # it stops within seconds; a loaded machine takes longer to close the run
    assert proc.returncode != 0
    run = mlflow_runs(tmp_path).iloc[0]
    assert run["status"] == "KILLED" and "interrupted" in run["tags.error"]
    assert run["params.model.arch"] == "test_resnet"  # logged before the interruption, kept
    entry = next((tmp_path / "outputs" / "cache" / "classifiers").iterdir())
    if sig == signal.SIGTERM:  # interrupted while training: no cache entry, no half-written file
        assert not (entry / "classifier.pt").exists()
        assert not list(entry.glob("*.tmp"))
    else:  # interrupted while making the UAP: the classifier and its metrics were kept
        assert (entry / "classifier.pt").exists() and run["metrics.test_acc"] > 0.5


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other_model"])
def test_a_bad_cache_entry_is_detected_and_rebuilt(tmp_path, damage):
    cfg = make_cfg([*FAST, "trainer.max_epochs=2"], tmp_path)  # what is checked is the cache, not the classifier
    dm = instantiate(cfg.data)
    dm.setup()
    model, meta = train_or_load(cfg, dm)
    ckpt = Path(meta["path"])
    assert meta["cache_hit"] is False and ckpt.parent.name == classifier_key(cfg, dm)
    if damage == "garbage":
        ckpt.write_bytes(b"not a checkpoint")
    elif damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    else:  # a valid file, but the weights of another architecture
        other = make_cfg([*FAST, "model=tiny_effnet"], tmp_path)
        net = new_classifier(other, dm.classes)
        save_checkpoint(net, ckpt, {"arch": net.arch, "classes": net.classes})
    cfg2 = make_cfg([*FAST, "trainer.max_epochs=2"], tmp_path)
    rebuilt, meta = train_or_load(cfg2, dm)
    assert meta["cache_hit"] is False
    assert torch.load(ckpt, weights_only=True)["meta"]["arch"] == "test_resnet"
    again, meta2 = train_or_load(cfg2, dm)
    assert meta2["cache_hit"] is True
    for a, b in zip(model.net.state_dict().values(), again.net.state_dict().values()):
        assert torch.equal(a, b)  # the rebuilt entry is the same deterministic classifier


def test_uap_file_of_the_wrong_shape_or_corrupt_is_a_clear_error(tmp_path):
    np.save(tmp_path / "u.npy", np.zeros((32, 32), np.float32))
    with pytest.raises(ConfigError, match=r"shape \(32, 32\), expected \(64, 64\)"):
        load_uap_file(str(tmp_path / "u.npy"), 64)
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="cannot read a .npy array"):
        load_uap_file(str(tmp_path / "bad.npy"), 64)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError):  # no pickle from a file
        load_uap_file(str(tmp_path / "obj.npy"), 64)
    assert load_uap_file(str(tmp_path / "u.npy"), 32).shape == (1, 32, 32)


def test_uap_file_with_nan_strings_or_an_archive_is_a_one_line_error(tmp_path):
    bad = np.zeros((8, 8), np.float32)
    bad[2, 3] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ConfigError, match="1 values are NaN or infinite"):
        load_uap_file(str(tmp_path / "nan.npy"), 8)
    np.save(tmp_path / "str.npy", np.array([["a"] * 8] * 8))
    with pytest.raises(ConfigError, match="expected a numeric array"):
        load_uap_file(str(tmp_path / "str.npy"), 8)
    np.savez(tmp_path / "arch.npz", v=np.zeros((8, 8), np.float32))
    with pytest.raises(ConfigError, match="npz archive"):
        load_uap_file(str(tmp_path / "arch.npz"), 8)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_uap_file_beyond_its_budget_is_refused_unless_projected(norm):
    v = torch.full((1, 8, 8), 0.5)
    with pytest.raises(ConfigError, match="exceeds eps=0.01.*attack.project_uap_file=true"):
        check_budget(v, 0.01, norm, False, "attack.uap_file=u.npy", "attack.project_uap_file")
    p = check_budget(v, 0.01, norm, True, "attack.uap_file=u.npy", "attack.project_uap_file")
    assert lp_norms(p[None], norm).item() == pytest.approx(0.01, rel=1e-5)
    inside = v * 0.01 / lp_norms(v[None], norm).item()  # on the sphere: float tolerance, not refused
    assert torch.equal(check_budget(inside, 0.01, norm, False, "k", "p"), inside)


def test_cli_uap_file_beyond_its_budget_fails_before_it_is_logged_as_a_result(tmp_path):
    np.save(tmp_path / "big.npy", np.full((64, 64), 0.5, np.float32))
    proc = run_cli([*FAST, f"attack.uap_file={tmp_path / 'big.npy'}"], tmp_path, check=False)
    assert proc.returncode == 2
    text = proc.stdout + proc.stderr
    assert "attack.uap_file=" in text and "exceeds eps" in text and "Traceback" not in text
    assert list(mlflow_runs(tmp_path)["status"]) == ["FAILED"]


def test_unreachable_tracking_server_fails_at_start(tmp_path):
    t0 = time.time()
    proc = run_cli(["tracking=server", "tracking.uri=http://127.0.0.1:9", "trainer=fast"], tmp_path, check=False)
    assert proc.returncode == 2 and time.time() - t0 < 60
    text = proc.stdout + proc.stderr
    assert "not reachable" in text and "make server" in text and "Traceback" not in text
    assert not (tmp_path / "outputs" / "cache" / "classifiers").exists()  # nothing was trained


def test_unknown_names_list_the_valid_options(tmp_path):
    for override, valid in (("attack=pgd", "fgsm_uap"), ("norm=l1", "linf"), ("+sweep=nope", "norm_grid"),
                            ("data=mnist", "cxr3")):
        proc = run_cli([override], tmp_path, check=False)
        assert proc.returncode != 0 and valid in proc.stderr, override


@pytest.mark.parametrize("override, message", [
    (["seed=-1"], "seed=-1: expected an integer in [0, 2**32)"),
    (["data.image_size=100000"], "data.image_size=100000: expected an integer in [32, 1024]"),
    (["attack.batch_size=0"], "attack.batch_size=0: expected an integer >= 1"),
    (["attack.stopper.patience=-1"], "attack.stopper.patience=-1"),
    (["data=cxr3", f"data.root={ROOT / 'README.md'}"], "README.md is not a folder")])
def test_bad_values_are_caught_before_any_data_or_training(tmp_path, override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        tasks.run(make_cfg(override, tmp_path))
    assert not (tmp_path / "outputs" / "cache" / "classifiers").exists()  # nothing trained


def test_a_bad_value_is_one_line_and_exit_2_on_the_command_line(tmp_path):
    proc = run_cli(["attack.batch_size=0"], tmp_path, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "attack.batch_size=0: expected an integer >= 1" in text and "Traceback" not in text
    assert not (tmp_path / "outputs" / "cache").exists()


def test_edited_data_is_a_new_classifier_and_a_new_job(tmp_path):
    """The classifier cache key and the sweep's job hash follow the data actually read, not its path."""
    data = tmp_path / "set"
    write_set(data, good_lines("tr"), good_lines("te"))
    cfg = make_cfg(["data=covidx", f"data.root={data}", "data.train_dir=images", "data.test_dir=images",
                    "data.image_size=32"], tmp_path)
    assert classifier_key(cfg) != classifier_key(make_cfg(["data=covidx", f"data.root={tmp_path}",
                                                           "data.image_size=32"]))
    key, job = classifier_key(cfg), job_hash(cfg)
    assert (classifier_key(cfg), job_hash(cfg)) == (key, job)  # stable while nothing changes
    train = data / "train.txt"
    train.write_text(train.read_text().replace(" normal src", " pneumonia src", 1))  # one label edited
    assert classifier_key(cfg) != key and job_hash(cfg) != job
    train.write_text(train.read_text().replace(" pneumonia src", " normal src", 1))
    assert classifier_key(cfg) == key
    img = next((data / "images").iterdir())
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))  # touched: the same bytes
    assert (classifier_key(cfg), job_hash(cfg)) == (key, job)
    img.write_bytes(img.read_bytes()[:-4] + b"\0\0\0\0")  # an image rewritten
    assert classifier_key(cfg) != key and job_hash(cfg) != job


def test_make_ui_and_server_bind_localhost_unless_mlflow_host_is_set():
    env = {**os.environ, "HOST": "my-laptop.example.org"}  # many shells set HOST: it must not expose the UI
    text = subprocess.run(["make", "-n", "ui", "server"], cwd=ROOT, env=env, capture_output=True, text=True).stdout
    assert text.count("--host 127.0.0.1") == 2 and "my-laptop" not in text
    text = subprocess.run(["make", "-n", "ui", "MLFLOW_HOST=0.0.0.0"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "--host 0.0.0.0" in text


def test_tasks_are_a_registry_and_evaluate_applies_a_saved_uap(phantom_model):
    """task=evaluate: a saved UAP on this data and classifier (loaded from the cache), logged like any run."""
    cfg, _, _ = phantom_model
    root = Path(cfg.paths.root_dir)
    assert {"train", "attack", "evaluate", "defense", "min_zeta", "transfer"} <= set(tasks.TASKS)
    with pytest.raises(ConfigError, match="task='nope': expected one of"):
        tasks.run(make_cfg([*FAST, "task=nope"], root))
    with pytest.raises(ConfigError, match="attack.uap_file is not set"):
        tasks.run(make_cfg([*FAST, "task=evaluate"], root))
    np.save(root / "zero.npy", np.zeros((64, 64), np.float32))
    m = tasks.run(make_cfg([*FAST, "task=evaluate", f"attack.uap_file={root / 'zero.npy'}"], root))
    assert m["test_fr"] == 0.0 and m["uap_norm"] == 0.0 and 0 <= m["test_fr_random"] <= 1
    run = mlflow_runs(root).iloc[0]
    assert run["tags.task"] == "evaluate" and run["tags.classifier_cache"] == "hit" and run["status"] == "FINISHED"
