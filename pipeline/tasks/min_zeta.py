"""`python -m pipeline task=min_zeta`: the smallest zeta at which a UAP reaches a target test FR.

Bisection over zeta (`min_zeta.low` .. `min_zeta.high`, widened when the bracket does not hold the
answer) until high - low <= tol. Each probe makes the configured UAP at that zeta and is logged as a
child run of the task's run; the result (`min_zeta`, the smallest probed zeta meeting the target, with
`min_zeta_below`, the largest probed zeta that missed it) is logged on the task's run. FR is assumed to
grow with zeta; the probes' table shows where it does not.
"""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, open_dict

from pipeline import files, tracking
from pipeline.attack.build import make_uap
from pipeline.eval.metrics import attack_rate
from pipeline.eval.predictions import predict

log = logging.getLogger(__name__)


def search(cfg: DictConfig, dm, net, out: Path, device, parent_run_id: str) -> dict[str, float]:
    m = cfg.min_zeta
    target_fr, tol = float(m.target_fr), float(m.tol)
    test = dm.dataset("test")
    probes: dict[float, float] = {}

    def meets(z: float) -> bool:
        z = round(z, 6)
        if z not in probes:
            if len(probes) >= int(m.max_probes):
                raise StopIteration
            pcfg = cfg.copy()
            with open_dict(pcfg):
                pcfg.attack.zeta = z
            with tracking.start_run(pcfg, run_name=f"min_zeta-probe-z{z:g}", tags={"task": "min_zeta_probe"},
                                    parent_run_id=parent_run_id):
                atk, uap, seconds = make_uap(pcfg, dm, net, device)
                p = predict(net, test, {"clean": None, "uap": uap}, clip=atk.clip, device=device)
                fr = attack_rate(p["clean"], p["uap"], atk.target)
                tracking.log_metrics({"zeta": z, "eps": atk.eps, "probe_fr": fr, "uap_seconds": seconds})
            probes[z] = fr
            log.info("min_zeta probe: zeta=%g%% -> test %s %.3f (target %.2f)", z,
                     "TSR" if atk.target is not None else "FR", fr, target_fr)
        return probes[z] >= target_fr

    lo, hi = float(m.low), float(m.high)
    found = True
    try:
        while not meets(hi):  # widen upwards until the target is met
            lo, hi = hi, min(hi * 2, 100.0)
            if lo >= 100.0:
                found = False
                break
        while found and meets(lo):  # and downwards until it is missed
            hi, lo = lo, lo / 2
        while found and hi - lo > tol:
            mid = (lo + hi) / 2
            if meets(mid):
                hi = mid
            else:
                lo = mid
    except StopIteration:
        log.warning("min_zeta: max_probes=%d reached before the tolerance", int(m.max_probes))
    met = sorted(z for z, fr in probes.items() if fr >= target_fr)
    missed = sorted(z for z, fr in probes.items() if fr < target_fr)
    result = {"min_zeta": met[0] if met else float("nan"),
              "min_zeta_below": max((z for z in missed if not met or z < met[0]), default=float("nan")),
              "min_zeta_probes": len(probes), "min_zeta_target_fr": target_fr}
    files.write_json(out / "min_zeta_probes.json", {
        "target_fr": target_fr, "tol": tol, "probes": [{"zeta": z, "fr": fr} for z, fr in sorted(probes.items())],
        **result}, indent=1)
    tracking.log_artifact(out / "min_zeta_probes.json")
    log.info("min_zeta: smallest zeta reaching test FR %.2f: %s%% "
             "(largest probe below it that missed: %s%%; %d probes)",
             target_fr, result["min_zeta"], result["min_zeta_below"], len(probes))
    return result
