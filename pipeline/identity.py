"""What identifies a result: the one hash, and the one list of config keys that define none.

Every place that asks "is this the same result?" asks here: the classifier cache (`classifier_key`), the
UAP cache (`uap_key`), a sweep's resume (`job_hash`, tag `job_hash`), the run names (pipeline.job) and
the report's grouping of runs (pipeline.report.tables). A key that changes no result (where files and the store are,
progress display, how Hydra launches) is listed once, below; every other key of the resolved config is part of
the identity of what it configures.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import precision
from pipeline.errors import UserError, instantiate

# Display keys: they change where results go or how a run looks, never what it computes.
DISPLAY_GROUPS = {"paths", "tracking", "hydra"}  # files and folders, the MLflow store, Hydra's launcher and run dirs
DISPLAY_KEYS = {"sweep_name", "resume", "model.name", "attack.name"}  # bookkeeping and display names
DISPLAY_LEAVES = {"num_workers", "enable_progress_bar", "log_every_n_steps", "enable_model_summary"}  # at any depth
# keys added after results were made, at the value that does what came before them (the white-box attacker with the
# training images): left out of every identity at that value, so that earlier cache entries and finished jobs
# keep their keys; any other value defines the result like any key
NEUTRAL = {"attack.black_box": False, "attack.max_queries": None, "attack.input_source": "train",
           "attack.input_root": None, "attack.surrogate_model": None, "attack.surrogate_seed": None,
           "attack.adaptive": False, "attack.targeted_overrides": None, "transform": {},
           "defense.method": "uap_finetune",
           "defense.black_box_attack": None, "defense.black_box_queries": 10000}
# top-level sections read by one task only: another task's result does not depend on them
TASK_SECTIONS = {"defense": "defense", "min_zeta": "min_zeta", "transfer": "transfer"}

# bumped when a code change alters what training (CLASSIFIER_VERSION) or a search (UAP_VERSION) produces, so
# that older cache entries and finished jobs are not reused (classifier 2: best-validation weights taken after
# the module's epoch-end hook; 3: EXIF orientation applied, a last training batch of one image dropped)
CLASSIFIER_VERSION = 3
UAP_VERSION = 1
# the config sections a trained classifier depends on (with the seed, its data's fingerprint and precision)
CLASSIFIER_PARTS = ("data", "model", "optim", "trainer", "recipe")


def is_display(key: str) -> bool:
    """Whether a dotted config key (`tracking.uri`, `trainer.enable_progress_bar`) changes no result."""
    parts = key.lstrip("+~").split(".")
    return parts[0] in DISPLAY_GROUPS or ".".join(parts) in DISPLAY_KEYS or parts[-1] in DISPLAY_LEAVES


def read_by(key: str, task: str) -> bool:
    """Whether a run of `task` reads this dotted key (defense.* only the defense, min_zeta.* only min_zeta...)."""
    owner = TASK_SECTIONS.get(key.lstrip("+~").split(".")[0])
    return owner is None or owner == task


def defining(container: Any, prefix: str = "") -> Any:
    """A plain config container without its display keys (at every depth)."""
    if isinstance(container, dict):
        return {k: defining(v, f"{prefix}{k}.") for k, v in container.items()
                if not is_display(f"{prefix}{k}") and not is_neutral(f"{prefix}{k}", v)}
    return container


def is_neutral(key: str, value: Any) -> bool:
    """Whether a key holds the value that does what came before it was added (NEUTRAL)."""
    return key in NEUTRAL and value == NEUTRAL[key] and type(value) is type(NEUTRAL[key])


def canonical(obj: Any) -> Any:
    """Integer-valued floats written as integers (zeta=2 and zeta=2.0 are one config), at every depth."""
    if isinstance(obj, dict):
        return {str(k): canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, float) and obj.is_integer():
        return int(obj)
    return obj


def digest(obj: Any) -> str:
    """The identity hash: 16 hex digits of the SHA-256 of the canonical JSON of a plain container."""
    blob = json.dumps(canonical(obj), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def bytes_digest(parts: list[bytes]) -> str:
    """16 hex digits of the SHA-256 of byte strings, each prefixed by its length (a data set's listing and
    contents: pipeline.data)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()[:16]


def file_sha256(path: Path) -> bytes:
    """The SHA-256 of a file's bytes (an image of a data set), read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.digest()


def tensors_digest(tensors: Iterable[torch.Tensor]) -> str:
    """16 hex digits of the SHA-256 of these tensors' bytes (a classifier's weights, an input set)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def config_part(cfg: DictConfig, key: str) -> Any:
    """One top-level config entry, resolved, as a plain container without its display keys."""
    v = cfg[key]
    return defining(OmegaConf.to_container(v, resolve=True), f"{key}.") if OmegaConf.is_config(v) else v


def data_key(cfg: DictConfig, dm=None) -> str:
    """The fingerprint of the data this config reads (label files and the images' bytes: pipeline.data),
    memoized under paths.cache_dir. A folder that cannot be read has none: the run then fails on it at once,
    with its own error."""
    memo = Path(cfg.paths.cache_dir) / "data_fingerprints.json" if OmegaConf.select(cfg, "paths.cache_dir") else None
    try:
        return (dm if dm is not None else instantiate(cfg.data)).fingerprint(memo)
    except UserError:
        return "unreadable"


def classifier_identity(cfg: DictConfig, dm=None) -> dict:
    """What defines a trained classifier: its config sections (without display keys), the seed, the data's
    fingerprint, the precision training used (a bf16-trained classifier is not an fp32 one) and the version."""
    parts = {k: config_part(cfg, k) for k in CLASSIFIER_PARTS if k in cfg}
    return {**parts, "seed": cfg.seed, "version": CLASSIFIER_VERSION, "data_fingerprint": data_key(cfg, dm),
            "precision": str(precision.resolve(cfg)["train"])}


def classifier_key(cfg: DictConfig, dm=None) -> str:
    return digest(classifier_identity(cfg, dm))


def job_hash(cfg: DictConfig, dm=None) -> str:
    """Identity of a job's result (a sweep's resume): the resolved config without display keys and without the
    sections its task does not read, the data's fingerprint (edited data is not a done job), the versions of
    training and of the searches, and the precision modes the loops use (auto's choice on this device)."""
    task = str(cfg.get("task", "attack"))
    container = {k: config_part(cfg, k) for k in cfg if not is_display(str(k)) and read_by(str(k), task)}
    container = {k: v for k, v in container.items() if not is_neutral(str(k), v)}
    container.update(classifier_version=CLASSIFIER_VERSION, uap_version=UAP_VERSION,
                     data_fingerprint=data_key(cfg, dm), precision_modes=precision.describe(precision.resolve(cfg)))
    return digest(container)


def uap_key(cfg: DictConfig, eps: float, net, inputs, device) -> str:
    """Identity of a UAP: the classifier's weights, the input images and labels, the attack config (without the
    saved-UAP keys, which a search does not read), eps, the seed, the device type and the precision of the
    search and of its exact rates."""
    attack = config_part(cfg, "attack")
    for k in ("uap_file", "project_uap_file"):
        attack.pop(k, None)
    if attack.get("adaptive"):  # searched through the hospital's pipeline: the transform defines it too
        attack["transform"] = config_part(cfg, "transform")
    return digest({"weights": tensors_digest(net.state_dict().values()),
                   "inputs": tensors_digest([inputs.images, inputs.labels]), "attack": attack, "eps": f"{eps:.10g}",
                   "seed": cfg.seed, "device": torch.device(device).type,
                   "precision": precision.describe(precision.modes_of(net)), "version": UAP_VERSION})
