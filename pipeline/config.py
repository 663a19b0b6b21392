"""The composed config: composing it outside a Hydra app (report, bench, transfer) and the checks run before any
work, where a bad value names its key and what is allowed."""
from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from pipeline import CONF
from pipeline.attack import new_attack
from pipeline.data import MAX_IMAGE_SIZE, configured_classes
from pipeline.data.proxy import SOURCES, folder_files
from pipeline.errors import ConfigError
from pipeline.eval import transforms
from pipeline.precision import parse


def validate(cfg: DictConfig) -> None:
    """Every group of a composed config (the task itself is checked by pipeline.tasks.run)."""
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed={cfg.seed!r}: expected an integer in [0, 2**32)")
    classes = configured_classes(cfg.data)  # data=folder with data.classes null: its class folders
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ConfigError(f"data.classes={classes}: expected at least 2 distinct class names")
    size, min_size = cfg.data.image_size, cfg.model.get("min_image_size", 32)
    if not isinstance(size, int) or not min_size <= size <= MAX_IMAGE_SIZE:
        raise ConfigError(f"data.image_size={size}: expected an integer in [{min_size}, {MAX_IMAGE_SIZE}] "
                          f"(model {cfg.model.arch} needs >= {min_size})")
    f = cfg.get("classifier_file")
    if f is not None and not Path(str(f)).expanduser().is_file():
        raise ConfigError(f"classifier_file={f}: file not found (expected a classifier saved by the pipeline, e.g. "
                          f"outputs/cache/classifiers/<key>/classifier.pt)")
    epochs = cfg.trainer.max_epochs
    if not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"trainer.max_epochs={epochs}: expected an integer >= 1")
    lr = cfg.optim.optimizer.get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0 < lr <= 1:
        raise ConfigError(f"optim.optimizer.lr={lr!r} (recipe.lr with optim=adamw_onecycle): "
                          f"expected a number in (0, 1]")
    a = cfg.attack  # the keys around the search here; the module's own (norm, zeta, target...) by new_attack below
    least = 1 if a.get("step_rule") else 0  # a search needs a pass; the random control has none
    if not isinstance(a.max_iter, int) or a.max_iter < least:
        raise ConfigError(f"attack.max_iter={a.max_iter}: expected an integer >= {least}")
    ws = a.get("warm_start")
    if ws:
        zetas = ws.get("zetas") or []
        if not all(isinstance(z, (int, float)) and 0 < z <= 100 for z in zetas):
            raise ConfigError(f"attack.warm_start.zetas={list(zetas)}: expected a list of percentages in (0, 100]")
    if not set(str(a.input_split).split("+")) <= {"train", "val", "test"}:
        raise ConfigError(f"attack.input_split={a.input_split!r}: expected train, val, test or splits joined by +"
                          f" (train+val)")
    if a.input_limit is not None and (not isinstance(a.input_limit, int) or a.input_limit < 1):
        raise ConfigError(f"attack.input_limit={a.input_limit}: expected null or an integer >= 1")
    source = a.get("input_source") or "train"
    if source not in SOURCES:
        raise ConfigError(f"attack.input_source={source!r}: expected one of {list(SOURCES)}")
    if source == "folder":
        folder_files(a.get("input_root"))  # a missing or empty folder, named now
    if a.get("black_box") and ws:
        raise ConfigError("attack.warm_start: its candidates are white-box UAPs, which attack.black_box=true "
                          "cannot make; set attack.warm_start=null (a surrogate's UAP can start the search: "
                          "attack/initializer=from_file)")
    if surrogate_config(cfg) is not None and a.get("black_box"):
        raise ConfigError("attack.surrogate_model / attack.surrogate_seed: a transferred UAP is made white-box on the "
                          "surrogate; attack.black_box=true queries the victim itself: set one or the other")
    # every attack key, the parts' too, checked by the classes that use them (whatever the task: one schema)
    new_attack(cfg.attack, torch.nn.Identity(), int(cfg.data.image_size), classes,
               transform=transforms.build(cfg.get("transform")))  # the transform's own keys too
    task = str(cfg.get("task", "attack"))
    if (cfg.get("transform") or a.get("adaptive")) and task not in ("attack", "evaluate"):
        raise ConfigError(f"transform / attack.adaptive: the hospital's pipeline is measured by task=attack and "
                          f"task=evaluate; task={task} measures without it: leave transform=none")
    if cfg.get("defense"):
        check_defense(cfg.defense)
        if task == "defense":
            defense_black_box_config(cfg)  # an unknown attack name, named now
    check_precision(cfg)
    busy = cfg.tracking.get("busy_timeout")
    if busy is not None and (not isinstance(busy, (int, float)) or isinstance(busy, bool) or busy <= 0):
        raise ConfigError(f"tracking.busy_timeout={busy!r}: expected a number of seconds > 0")
    check_min_zeta(cfg.min_zeta)


def check_precision(cfg: DictConfig) -> None:
    parse(cfg.get("precision", "auto"))
    r = cfg.get("precision_recheck", 0.0)
    if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0 <= r < 1:
        raise ConfigError(f"precision_recheck={r!r}: expected a share in [0, 1) of the largest |logit|")
    if cfg.trainer.get("precision") is not None:
        raise ConfigError(f"trainer.precision={cfg.trainer.precision!r}: set the top-level key instead "
                          f"(precision=auto|32|bf16), which every loop obeys, training included")


def check_defense(d: DictConfig) -> None:
    method = d.get("method", "uap_finetune")
    if method not in ("uap_finetune", "uat"):
        raise ConfigError(f"defense.method={method!r}: expected uap_finetune or uat (defense=uap_finetune|uat)")
    if method == "uat" and not 0 < float(d.step) <= 1:
        raise ConfigError(f"defense.step={d.step}: expected a share of eps in (0, 1]")
    if d.get("black_box_attack"):
        q = d.get("black_box_queries")
        if q is not None and (not isinstance(q, int) or q < 1):
            raise ConfigError(f"defense.black_box_queries={q}: expected null or an integer >= 1")
    if not isinstance(d.rounds, int) or d.rounds < 1:
        raise ConfigError(f"defense.rounds={d.rounds}: expected an integer >= 1")
    if not isinstance(d.epochs, int) or d.epochs < 1:
        raise ConfigError(f"defense.epochs={d.epochs}: expected an integer >= 1")
    if not 0 < float(d.fraction) <= 1:
        raise ConfigError(f"defense.fraction={d.fraction}: expected a number in (0, 1]")


def check_min_zeta(m: DictConfig) -> None:
    if not 0 < float(m.target_fr) <= 1:
        raise ConfigError(f"min_zeta.target_fr={m.target_fr}: expected a rate in (0, 1]")
    if not 0 < float(m.low) < float(m.high) <= 100:
        raise ConfigError(f"min_zeta.low={m.low}, min_zeta.high={m.high}: expected 0 < low < high <= 100")
    if float(m.tol) <= 0 or int(m.max_probes) < 2:
        raise ConfigError(f"min_zeta.tol={m.tol}, min_zeta.max_probes={m.max_probes}: "
                          "expected tol > 0, max_probes >= 2")


def surrogate_config(cfg: DictConfig) -> DictConfig | None:
    """The config of the surrogate a transferred UAP is made on (attack.surrogate_model: another architecture,
    attack.surrogate_seed: another training seed; both may be set), or None (the UAP is made on the victim)."""
    name, seed = cfg.attack.get("surrogate_model"), cfg.attack.get("surrogate_seed")
    if name is None and seed is None:
        return None
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32):
        raise ConfigError(f"attack.surrogate_seed={seed!r}: expected null or an integer in [0, 2**32)")
    c = cfg.copy()
    with open_dict(c):
        if name is not None:
            try:
                c.model = compose_group("model", str(name))
            except ConfigError as e:
                raise ConfigError(f"attack.surrogate_model: {e}") from None
        if seed is not None:
            c.seed = seed
        c.attack.surrogate_model = c.attack.surrogate_seed = None
    return c


def defense_black_box_config(cfg: DictConfig) -> DictConfig | None:
    """The config of the black-box attacker a defense is also measured against: `defense.black_box_attack` (a
    conf/attack name, e.g. nes_uap) with its own input set, at the run's norm, zeta and target, with
    `defense.black_box_queries`; None when unset."""
    name = cfg.defense.get("black_box_attack") if cfg.get("defense") else None
    if not name:
        return None
    try:
        attack = compose_group("attack", str(name))
    except ConfigError as e:
        raise ConfigError(f"defense.black_box_attack: {e}") from None
    c = cfg.copy()
    with open_dict(c):
        c.attack = attack
        for k in ("norm", "zeta", "target", "clip"):
            c.attack[k] = cfg.attack[k]
        c.attack.max_queries = cfg.defense.get("black_box_queries")
    return c


def compose(overrides: list[str] = ()) -> DictConfig:
    """conf/config.yaml with these overrides, as `python -m pipeline` composes it (for the report, the bench and
    the transfer task: one set of defaults for every entry point)."""
    if GlobalHydra.instance().is_initialized():  # inside `python -m pipeline` (task=transfer): Hydra's own loader
        return hydra_compose(config_name="config", overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def group_options(group: str) -> list[str]:
    """The options of a config group (conf/<group>/*.yaml), without the bases they share (`_timm.yaml`)."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


def compose_group(group: str, option: str) -> DictConfig:
    """One option of a config group, composed through Hydra (its defaults, such as a shared base, applied)."""
    if option not in group_options(group):
        raise ConfigError(f"{group}={option!r}: unknown; expected one of {group_options(group)}")
    return compose([f"{group}={option}"])[group]
