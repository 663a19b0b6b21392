"""One identity for results (pipeline.identity): every key of the config either defines what it configures or
changes no result; the caches, the sweep's resume, run names and the report's grouping agree on which."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import make_cfg
from omegaconf import OmegaConf, open_dict

from pipeline import identity, job
from pipeline.data import GrayDataset
from pipeline.report import tables

# written out by hand, not read from pipeline.identity: what a user expects to change no result
DISPLAY_PREFIXES = ("paths.", "tracking.", "hydra.")
DISPLAY = {"sweep_name", "resume", "model.name", "attack.name"}
DISPLAY_LEAVES = {"num_workers", "enable_progress_bar", "log_every_n_steps", "enable_model_summary"}
TASK_OF = {"defense": "defense", "min_zeta": "min_zeta", "transfer": "transfer"}  # sections one task reads
CLASSIFIER_SECTIONS = ("data.", "model.", "optim.", "trainer.", "recipe.")
BASE = ["precision=32"]  # no timing of precision modes (auto) while hashing configs
# another valid value, where changed() would give one the data module refuses
VALID_CHANGE = {"precision": "bf16", "data.classes": ["COVID-19", "pneumonia", "normal"],
                "data.augment": {"shift": 0.05}}


def expected_display(key: str) -> bool:
    return key.startswith(DISPLAY_PREFIXES) or key in DISPLAY or key.rsplit(".", 1)[-1] in DISPLAY_LEAVES


def leaves(node, prefix=""):
    """(dotted key, value) of every leaf of a plain container; lists are leaves."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], node


def changed(v):
    """Another value of the same kind."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + 1
    if isinstance(v, float):
        return v * 1.5 + 0.125
    if isinstance(v, str):
        return v + "_other"
    if isinstance(v, list):
        return [*v, v[-1] if v else "other"]
    return "other" if v is None else None


BASE_CFG = make_cfg(BASE, Path("/nonexistent"))  # a root: paths resolve outside a Hydra app
KEYS = [k for k, _ in leaves(OmegaConf.to_container(BASE_CFG, resolve=True))
        if not k.endswith("_target_") and not k.startswith("hydra.")]


def with_leaf(cfg, key, value):
    c = copy.deepcopy(cfg)
    with open_dict(c):
        OmegaConf.update(c, key, value, force_add=True)
    return c


def test_the_default_config_has_keys_of_every_kind():
    assert len(KEYS) > 60
    assert any(expected_display(k) for k in KEYS) and any(k.startswith("attack.") for k in KEYS)


@pytest.mark.parametrize("key", KEYS)
def test_each_key_defines_a_result_or_none(key, tmp_path):
    """A defining key changes the job's identity (under the task that reads it) and, where it shapes the
    classifier, the classifier's cache key; a display key changes neither."""
    cfg = make_cfg(BASE, tmp_path)
    value = VALID_CHANGE[key] if key in VALID_CHANGE else changed(OmegaConf.select(cfg, key))
    other = with_leaf(cfg, key, value)
    owner = TASK_OF.get(key.split(".")[0])
    if owner:
        cfg, other = with_leaf(cfg, "task", owner), with_leaf(other, "task", owner)
    job_changed = identity.job_hash(other) != identity.job_hash(cfg)
    classifier_changed = identity.classifier_key(other) != identity.classifier_key(cfg)
    if expected_display(key):
        assert not job_changed and not classifier_changed, f"{key}={value!r} changed an identity"
        return
    assert job_changed, f"{key}={value!r} left the job's identity unchanged"
    shapes_classifier = key.startswith(CLASSIFIER_SECTIONS) or key in ("seed", "precision")
    assert classifier_changed == shapes_classifier, (key, classifier_changed)


def test_a_section_read_by_one_task_does_not_change_another_tasks_job(tmp_path):
    cfg = make_cfg(BASE, tmp_path)
    for key in ("defense.rounds", "min_zeta.tol"):
        other = with_leaf(cfg, key, changed(OmegaConf.select(cfg, key)))
        assert identity.job_hash(other) == identity.job_hash(cfg), key


def test_hydra_settings_change_no_identity(tmp_path):
    cfg = make_cfg(BASE, tmp_path)
    moved = make_cfg([*BASE, "hydra.run.dir=elsewhere", "hydra.job.chdir=true"], tmp_path)
    assert identity.job_hash(moved) == identity.job_hash(cfg)
    assert identity.classifier_key(moved) == identity.classifier_key(cfg)


def test_integer_valued_floats_are_the_integers():
    assert identity.digest({"zeta": 2.0, "a": [1.0, 0.5]}) == identity.digest({"a": [1, 0.5], "zeta": 2})
    assert identity.digest({"zeta": 2.5}) != identity.digest({"zeta": 2})


def test_the_uap_key_follows_the_search_and_not_its_display_or_saved_uap_keys(tmp_path):
    cfg = make_cfg(BASE, tmp_path)
    net = torch.nn.Conv2d(3, 3, 1)
    inputs = GrayDataset(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 2, 0]), list("abcd"))
    key = identity.uap_key(cfg, 0.1, net, inputs, "cpu")
    for k, v in (("attack.name", "shown"), ("attack.uap_file", "x.npy"), ("tracking.uri", "sqlite:///x.db")):
        assert identity.uap_key(with_leaf(cfg, k, v), 0.1, net, inputs, "cpu") == key, k
    assert identity.uap_key(with_leaf(cfg, "attack.max_iter", 99), 0.1, net, inputs, "cpu") != key
    assert identity.uap_key(cfg, 0.2, net, inputs, "cpu") != key
    assert identity.uap_key(with_leaf(cfg, "seed", 7), 0.1, net, inputs, "cpu") != key
    with torch.no_grad():
        net.weight.add_(1)
    assert identity.uap_key(cfg, 0.1, net, inputs, "cpu") != key


def test_run_names_leave_out_display_overrides(monkeypatch, tmp_path):
    cfg = make_cfg(BASE, tmp_path)
    monkeypatch.setattr(job, "job_overrides", lambda: ["tracking.uri=sqlite:///x.db", "zeta=4",
                                                              "trainer.enable_progress_bar=false", "attack.max_iter=3"])
    short, _ = job.run_names(cfg, "attack")
    assert short.endswith("attack.max_iter=3") and "tracking" not in short and "progress" not in short


def test_the_report_groups_runs_by_defining_params_only():
    assert tables.groups_param("attack.max_iter") and tables.groups_param("seed")
    for k in ("tracking.uri", "paths.cache_dir", "data.num_workers", "trainer.enable_progress_bar", "attack.name"):
        assert not tables.groups_param(k), k
    assert not tables.groups_param("defense.rounds", "attack") and tables.groups_param("defense.rounds", "defense")


def test_keys_added_later_at_their_neutral_value_leave_earlier_identities_unchanged(tmp_path):
    """The attacker's keys (black_box, max_queries, input_source, ...) at the values that do what came before
    them: a config without them (an older run's) has the same job hash and UAP identity; another value does not."""
    cfg = make_cfg(BASE, tmp_path)
    older = copy.deepcopy(cfg)
    with open_dict(older):
        for key in identity.NEUTRAL:
            node, _, leaf = key.rpartition(".")
            del (older[node] if node else older)[leaf]
    assert identity.job_hash(older) == identity.job_hash(cfg)
    as_defense = [with_leaf(c, "task", "defense") for c in (older, cfg)]  # the defense section read too
    assert identity.job_hash(as_defense[0]) == identity.job_hash(as_defense[1])
    assert identity.config_part(older, "attack") == identity.config_part(cfg, "attack")
    for key, value in [("attack.input_source", "noise"), ("attack.max_queries", 1000), ("attack.black_box", True),
                       ("attack.adaptive", True)]:
        assert identity.job_hash(with_leaf(cfg, key, value)) != identity.job_hash(cfg), key
