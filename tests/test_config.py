"""Configs: every option of every group composes and validates; bad values fail at start, naming the key."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_cfg, run_cli
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pipeline.config import group_options, surrogate_config, validate
from pipeline.errors import ConfigError

GROUPS = ["data", "model", "optim", "trainer", "attack", "norm", "tracking"]


def options(group):
    return group_options(group)


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(group, option, tmp_path):
    extra = ["data.root=/some/where"] if (group, option) == ("data", "covidx") else []
    if (group, option) == ("data", "folder"):  # its classes are its class folders' names
        for c in ("normal", "pneumonia"):
            (tmp_path / "set" / c).mkdir(parents=True)
        extra = [f"data.root={tmp_path / 'set'}"]
    if (group, option) == ("model", "inception_v3"):
        extra.append("data.image_size=96")
    cfg = make_cfg([f"{group}={option}", *extra], tmp_path)
    validate(cfg)
    for key in ("data", "model", "optim", "trainer", "attack", "tracking"):
        OmegaConf.to_container(cfg[key], resolve=True)  # every interpolation resolves
    if group == "norm":
        assert cfg.attack.norm == option


PARTS = ["initializer", "objective", "step_rule", "acceptance", "stopper"]


@pytest.mark.parametrize("part, option", [(p, o) for p in PARTS for o in options(f"attack/{p}")])
def test_every_attack_part_composes_and_instantiates(part, option, tmp_path):
    extra = ["attack.initializer.path=/some/uap.npy"] if option == "from_file" else []
    cfg = make_cfg(["attack=strong_uap", f"attack/{part}={option}", *extra], tmp_path)
    validate(cfg)
    obj = instantiate(OmegaConf.to_container(cfg.attack[part], resolve=True))
    assert type(obj).__module__ == f"pipeline.attack.{'step' if part == 'step_rule' else part}"


@pytest.mark.parametrize("zeta", ["0.5", "1", "2", "4", "6", "8"])
def test_zeta_on_the_command_line_sets_the_attack_strength(zeta, tmp_path):
    assert make_cfg([f"zeta={zeta}"], tmp_path).attack.zeta == float(zeta)


def test_paper_models_have_configs():
    assert {"resnet18", "resnet50", "densenet121", "vgg16", "inception_v3", "tiny"} <= set(options("model"))


@pytest.mark.parametrize("override, key", [
    ("attack.zeta=0", "attack.zeta"), ("attack.zeta=150", "attack.zeta"), ("attack.zeta=-1", "attack.zeta"),
    ("attack.norm=l1", "attack.norm"), ("attack.target=flu", "attack.target"), ("attack.max_iter=0", "attack.max_iter"),
    ("data.image_size=16", "data.image_size"), ("trainer.max_epochs=-3", "trainer.max_epochs"),
    ("recipe.lr=0", "recipe.lr"), ("optim.optimizer.lr=fast", "optim.optimizer.lr"),
])
def test_bad_values_fail_validation_naming_the_key(override, key, tmp_path):
    cfg = make_cfg([override], tmp_path)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_console_scripts_are_installed(tmp_path):
    bin_dir = Path(sys.executable).parent
    for script in ("uap-cxr-report", "uap-cxr-bench"):
        assert (bin_dir / script).is_file(), script
    proc = subprocess.run([str(bin_dir / "uap-cxr"), "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "UAP_CXR_ROOT": str(tmp_path)})
    assert proc.returncode == 0 and "python -m pipeline +sweep=norm_grid -m" in proc.stdout


def test_cli_help_and_cfg_job(tmp_path):
    out = run_cli(["--help"], tmp_path).stdout
    assert "uap-cxr" in out and "data: covidx, cxr3, folder, phantom" in out and "+sweep=" in out
    job = run_cli(["--cfg", "job", "model=resnet18", "zeta=4"], tmp_path).stdout
    cfg = OmegaConf.create(job)
    assert cfg.model.arch == "resnet18" and cfg.attack.zeta == 4.0


@pytest.mark.parametrize("override", ["zeta=abc", "attack.zeta=0"])
def test_cli_bad_config_is_one_line_exit_2_and_leaves_no_folder_or_run(tmp_path, override):
    proc = run_cli([override, "trainer=fast"], tmp_path, check=False)
    assert proc.returncode == 2
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and "attack.zeta=" in lines[0] and "(0, 100]" in lines[0], lines
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "mlflow.db").exists()


def test_cli_unknown_group_option_lists_the_valid_ones(tmp_path):
    proc = run_cli(["model=resnet999"], tmp_path, check=False)
    assert proc.returncode != 0
    assert "resnet18" in proc.stderr and "densenet121" in proc.stderr


@pytest.mark.parametrize("option", options("threat"))
def test_every_threat_composes_and_validates(option, tmp_path):
    cfg = make_cfg(["data=cxr3", "attack=strong_uap", f"+threat={option}"], tmp_path)
    validate(cfg)
    surrogate = surrogate_config(cfg)
    assert (surrogate is not None) == option.startswith("surrogate")
    if option == "surrogate_seed":
        assert surrogate.seed == 7 and surrogate.model.name == cfg.model.name
    elif surrogate is not None:
        assert surrogate.model.name == option.removeprefix("surrogate_") and surrogate.seed == cfg.seed


@pytest.mark.parametrize("option", options("sweep"))
def test_every_sweep_composes(option, tmp_path):
    validate(make_cfg([f"+sweep={option}"], tmp_path))
