"""Shared fixtures: config composition, a temporary project root, a subprocess runner, trained classifiers."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from pipeline.classifier import train_or_load
from pipeline.tracking import flat_key

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
CXR3 = (ROOT / ".." / "shared" / "data" / "cxr3").resolve()

# the fast phantom recipe the tests share: small images, the tiny model, few epochs. Its precision is the
# default, auto (bf16 where the CPU has bf16 units, fp32 elsewhere): the bounds these tests assert hold in both,
# and a test whose numbers need one precision sets it (tests/test_precision.py)
FAST = ["trainer=fast", "trainer.max_epochs=20"]


def make_cfg(overrides: list[str] = (), root: Path | None = None) -> DictConfig:
    """Compose conf/config.yaml with overrides, as `python -m pipeline` would (minus hydra's runtime)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    if root is not None:
        with open_dict(cfg):
            cfg.paths.root_dir = str(root)
            cfg.paths.output_dir = str(root / "outputs" / "run")
    return cfg


def cells(line: str) -> list[str]:
    """The cells of a markdown table row (report tables, docs/results.md)."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def run_cli(args: list[str], root: Path, check: bool = True, timeout: int = 600,
            module: str = "pipeline") -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` in a subprocess, with the project root (store, cache, outputs) at `root`."""
    env = {**os.environ, "UAP_CXR_ROOT": str(root), "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def mlflow_runs(root: Path | str, experiment: str = "uap-cxr"):
    """All runs of the store under `root` (or of the tracking server at the URI `root`), as a pandas DataFrame;
    metric columns under the code's flat names (`metrics.test_fr` for MLflow's `test/fr`, tracking.flat_key)."""
    mlflow.set_tracking_uri(root if str(root).startswith("http") else f"sqlite:///{root}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string="", max_results=1000)
    return runs.rename(columns=lambda c: "metrics." + flat_key(c[8:]) if c.startswith("metrics.") else c)


def assert_cache_hit(runs, second: subprocess.CompletedProcess) -> None:
    """Two identical runs, oldest first in `runs` (mlflow_runs): the first trained the classifier, the second
    (`second`, its process) loaded it from the cache and said so."""
    assert list(runs["tags.classifier_cache"]) == ["trained", "hit"]
    assert "loaded from cache" in second.stderr + second.stdout


@pytest.fixture(scope="session")
def cxr3_root() -> Path:
    """../shared/data/cxr3: skipped when absent, except under CI=true where it must be there."""
    if not (CXR3 / "train.txt").is_file():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true but the real data set is missing at {CXR3}")
        pytest.skip(f"real data not found at {CXR3}")
    return CXR3


@pytest.fixture(scope="session")
def phantom_model(tmp_path_factory):
    """The tiny classifier trained once on the fast phantom recipe: (cfg, datamodule, classifier)."""
    root = tmp_path_factory.mktemp("phantom")
    cfg = make_cfg(FAST, root)
    dm = instantiate(cfg.data)
    dm.setup()
    model, _ = train_or_load(cfg, dm)
    return cfg, dm, model
