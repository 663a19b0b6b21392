"""Making the configured UAP against a classifier: build the attack from its parts, warm-start it, cache it.

`attack.warm_start` (attack=strong_uap) makes the search sound in its budget by construction:

- `zetas`: a ladder of budgets (the paper's grid). The UAP made at the largest ladder zeta below this
  one lies inside this budget's ball; it is a candidate (and the search's start), and with `keep: best`
  the result fools at least as many input images. So the input-set rate never falls as zeta grows.
- `targeted: true` (non-targeted attacks): the targeted UAPs of every class at the same zeta are
  candidates too, so the non-targeted rate is at least each targeted UAP's fooling rate.

The UAPs these candidates come from are made first when missing, through a cache under
`paths.cache_dir/uaps/` (pipeline.cache) keyed by pipeline.identity.uap_key (the classifier's weights, the
input images, the attack config, eps and the seed). Each entry is made once, by whichever job needs it first
(the others wait for it), and every job finds the same one.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, open_dict

from pipeline import files
from pipeline.attack import UAP, new_attack, zeta_to_eps
from pipeline.attack.initializer import check_budget, load_uap_file
from pipeline.attack.victim import check_budget_pays_one_pass
from pipeline.cache import Cache
from pipeline.data import CXRDataModule, GrayDataset
from pipeline.data.proxy import folder_files, proxy_set
from pipeline.errors import ConfigError
from pipeline.eval import transforms
from pipeline.identity import uap_key

log = logging.getLogger(__name__)

def input_set(cfg: DictConfig, dm: CXRDataModule) -> GrayDataset:
    """The UAP's input set: the victim's own images (`own_images`), or with `attack.input_source` another
    source's (pipeline/data/proxy.py: folder, natural, noise), `input_count` of them."""
    source = cfg.attack.get("input_source") or "train"
    if source == "train":
        return own_images(cfg, dm)
    return proxy_set(source, input_count(cfg, dm), dm.image_size, cfg.seed, cfg.attack.get("input_root"))


def input_count(cfg: DictConfig, dm: CXRDataModule) -> int:
    """How many images the input set holds, without making it: `attack.input_limit` (or as many as the victim's
    input split), capped by what the source has (the victim's split, a folder's files)."""
    own = len(own_images(cfg, dm, limit=False))
    limit = cfg.attack.input_limit
    n = own if limit is None else int(limit)
    source = cfg.attack.get("input_source") or "train"
    if source == "train":
        return min(n, own)
    if source == "folder":  # listing the folder also names it when it is missing or empty
        return min(n, len(folder_files(cfg.attack.get("input_root"))))
    return n


def eps_images(cfg: DictConfig, dm: CXRDataModule) -> torch.Tensor:
    """The images eps is relative to (float (N, 1, H, W)): the victim's own, whatever the input source: the input
    set itself when it is theirs, else their whole input split (attack.input_limit then counts proxy images)."""
    own = (cfg.attack.get("input_source") or "train") == "train"
    return own_images(cfg, dm, limit=own).images.float().div(255)


def own_images(cfg: DictConfig, dm: CXRDataModule, limit: bool = True) -> GrayDataset:
    """The victim's images the UAP is made on: `attack.input_split` (a split, or splits joined by '+', e.g.
    train+val), or (`limit`) a seeded choice of `attack.input_limit` of its images."""
    parts = [dm.dataset(s) for s in str(cfg.attack.input_split).split("+")]
    ds = parts[0] if len(parts) == 1 else GrayDataset(torch.cat([p.images for p in parts]),
                                                      torch.cat([p.labels for p in parts]),
                                                      [q for p in parts for q in p.patients])
    n = cfg.attack.input_limit if limit else None
    if n is not None and n < len(ds):
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.seed))[:n].sort().values
        ds = ds.subset(idx)
    return ds


def check_queries(cfg: DictConfig, dm: CXRDataModule) -> None:
    """attack.max_queries against the input set's size, before any training (the search checks it again)."""
    if not cfg.attack.get("uap_file"):
        check_budget_pays_one_pass(cfg.attack.get("max_queries"), input_count(cfg, dm))


def build_attack(cfg: DictConfig, dm: CXRDataModule, net) -> tuple[UAP, GrayDataset]:
    """The configured attack against `net`, with eps set from its input set; and that input set."""
    inputs = input_set(cfg, dm)
    # adaptive: the UAP that fools the most input images through the transform is returned (keep: best), the
    # non-adaptive one among the candidates (make_uap), so the attacker who knows the pipeline is never weaker
    adaptive = {"keep": "best"} if cfg.attack.get("adaptive") else {}
    atk = new_attack(cfg.attack, net, dm.image_size, dm.classes, transform=transforms.build(cfg.get("transform")),
                     **adaptive)
    atk.eps = zeta_to_eps(eps_images(cfg, dm), atk.zeta, atk.norm)
    atk.n_inputs = len(inputs)
    return atk, inputs


def with_attack(cfg: DictConfig, **changes) -> DictConfig:
    """A copy of cfg with these attack keys changed (e.g. zeta, target)."""
    c = cfg.copy()
    with open_dict(c):
        for k, v in changes.items():
            c.attack[k] = v
    return c


def trainer_kwargs(cfg: DictConfig, device) -> dict:
    return {"accelerator": "gpu" if torch.device(device).type == "cuda" else "cpu",
            "enable_progress_bar": bool(cfg.trainer.get("enable_progress_bar", True))}


def load_saved_uap(cfg: DictConfig, dm: CXRDataModule) -> torch.Tensor:
    """attack.uap_file, checked: readable, the right shape, finite, within the eps of its input set (or
    projected onto the ball). Needs only the data, so a run calls it before training as well."""
    path = cfg.attack.uap_file
    v = load_uap_file(path, dm.image_size)
    eps = zeta_to_eps(eps_images(cfg, dm), float(cfg.attack.zeta), cfg.attack.norm)
    return check_budget(v, eps, cfg.attack.norm, bool(cfg.attack.get("project_uap_file", False)),
                        f"attack.uap_file={path}", "attack.project_uap_file")


def make_uap(cfg: DictConfig, dm: CXRDataModule, net, device) -> tuple[UAP, torch.Tensor, float]:
    """Make the configured UAP against `net` on its input set: (attack, uap (1, H, W), seconds of its search).

    With `attack.warm_start`, through the cache with its candidates (module docstring)."""
    atk, inputs = build_attack(cfg, dm, net)
    x_in, y_in = inputs.tensors()
    if not cfg.attack.get("warm_start"):
        candidates = adaptive_candidates(cfg, dm, net, device)
        t0 = time.perf_counter()
        uap = atk.make(x_in, y_in, trainer_kwargs=trainer_kwargs(cfg, device), seed=cfg.seed, candidates=candidates)
        return atk, uap, time.perf_counter() - t0
    with Cache(cfg.paths.cache_dir, "uaps").claim(uap_key(cfg, atk.eps, net, inputs, device)) as entry:
        cached = read_entry(entry, atk)
        if cached is not None:
            return atk, *cached
        candidates = warm_candidates(cfg, dm, net, device, atk)
        t0 = time.perf_counter()
        uap = atk.make(x_in, y_in, trainer_kwargs=trainer_kwargs(cfg, device), seed=cfg.seed, candidates=candidates)
        seconds = time.perf_counter() - t0
        write_entry(entry, atk, uap, seconds)
        log.info("%s: UAP made in %.1f s and cached at %s", atk.name, seconds, entry)
    return atk, uap, seconds


def warm_candidates(cfg: DictConfig, dm: CXRDataModule, net, device, atk: UAP) -> list[torch.Tensor]:
    """The UAPs this search weighs against its own: the previous ladder zeta's, and (non-targeted, with
    `targeted: true`) the targeted UAPs of every class at this zeta; each made first if not cached."""
    ws = cfg.attack.warm_start
    zetas = [float(z) for z in ws.get("zetas") or []]
    below = [z for z in zetas if z < atk.zeta - 1e-9]
    out = adaptive_candidates(cfg, dm, net, device)
    if below:
        prev = max(below)
        log.info("warm start: the UAP at zeta=%g%% (made first if not cached)", prev)
        out.append(make_uap(with_attack(cfg, zeta=prev), dm, net, device)[1])
    if ws.get("targeted") and not atk.targeted:
        for c in dm.classes:
            log.info("warm start: the targeted UAP to %s at zeta=%g%% (made first if not cached)", c, atk.zeta)
            out.append(make_uap(with_attack(cfg, target=c), dm, net, device)[1])
    return out


def adaptive_candidates(cfg: DictConfig, dm: CXRDataModule, net, device) -> list[torch.Tensor]:
    """For an adaptive attack (`attack.adaptive`), the same attack's UAP made without the transform: the search
    through the transform weighs it (exact rate through the transform) and returns it when it fools more. Not
    for an attacker with a query budget (`attack.max_queries`): the budget pays for one search, through the
    transform."""
    if not cfg.attack.get("adaptive") or cfg.attack.get("max_queries") is not None:
        return []
    log.info("adaptive attack: the UAP made without the transform is a candidate (made first)")
    return [make_uap(with_attack(cfg, adaptive=False), dm, net, device)[1]]


def read_entry(entry: Path, atk: UAP) -> tuple[torch.Tensor, float] | None:
    """The cached UAP (loaded into the attack, with its history) and its search's seconds; None if absent or
    unusable."""
    npy, meta_file = entry / "uap.npy", entry / "meta.json"
    if not (npy.is_file() and meta_file.is_file()):
        return None
    try:
        meta = json.loads(meta_file.read_text())
        uap = load_uap_file(npy, atk.v.shape[-1], "cached UAP")
        uap = check_budget(uap, atk.eps, atk.norm, False, f"cached UAP {npy}", "(none)")
    except (ValueError, KeyError, ConfigError) as e:
        log.warning("%s: unusable cached UAP (%s); making it again", entry, e)
        return None
    with torch.no_grad():
        atk.v.copy_(uap)
    atk.history, atk.best = meta["history"], meta.get("best")
    atk.victim.queries = int(meta.get("queries", 0))
    log.info("%s: UAP loaded from cache %s (made in %.1f s)", atk.name, entry, meta["seconds"])
    return uap, float(meta["seconds"])


def write_entry(entry: Path, atk: UAP, uap: torch.Tensor, seconds: float) -> None:
    """Atomic writes (temp file + rename): a half-written entry is never read."""
    best = None if atk.best is None else {"fr": atk.best["fr"], "from": atk.best["from"]}
    meta = {"history": atk.history, "best": best, "seconds": seconds, "queries": atk.queries, "eps": atk.eps,
            "name": atk.name,
            "made_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    files.write_npy(entry / "uap.npy", uap[0].numpy().astype(np.float32))
    files.write_json(entry / "meta.json", meta, indent=1)
