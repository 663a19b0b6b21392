"""Universal adversarial perturbations: a LightningModule holding `v` (module.py) and the parts that
search for it (initializer, objective, step, acceptance, stopper: one file each), composed in
conf/attack/*.yaml. `norms.project` is the one projection onto the Lp ball."""
from pipeline.attack.module import UAP, indexed, new_attack
from pipeline.attack.norms import (
    NORMS,
    check_norm,
    lp_norms,
    per_pixel,
    project,
    random_control,
    random_uap,
    zeta_to_eps,
)

__all__ = ["UAP", "indexed", "new_attack", "NORMS", "check_norm", "lp_norms", "per_pixel", "project", "random_control",
           "random_uap", "zeta_to_eps"]
