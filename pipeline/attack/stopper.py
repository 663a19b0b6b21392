"""The stopper: when a UAP search (one start of it) ends (conf/attack/stopper/).

After every pass over the input set: stop once the fooling rate (targeted: success rate) reaches
1 - delta, after `max_passes` passes, or, with `patience`, when the best input-set rate has not improved
by more than `min_delta` for that many passes.
"""
from __future__ import annotations

from pipeline.errors import ConfigError


class Stopper:
    def __init__(self, max_passes: int = 15, delta: float = 0.2, patience: int | None = None, min_delta: float = 0.0):
        if not isinstance(max_passes, int) or max_passes < 0:
            raise ConfigError(f"attack.max_iter={max_passes}: expected an integer >= 0 (passes over the input set)")
        if not 0 <= float(delta) < 1:
            raise ConfigError(f"attack.delta={delta}: expected a number in [0, 1)")
        if patience is not None and (not isinstance(patience, int) or patience < 1):
            raise ConfigError(f"attack.stopper.patience={patience}: expected null or an integer >= 1")
        self.max_passes, self.delta = max_passes, float(delta)
        self.patience, self.min_delta = patience, float(min_delta)

    def reason(self, frs: list[float]) -> str | None:
        """Why to stop after these per-pass rates of the current start (None: go on)."""
        if frs and frs[-1] >= 1 - self.delta:
            return f"fooling rate {frs[-1]:.3f} >= 1 - delta"
        if len(frs) >= self.max_passes:
            return f"{self.max_passes} passes"
        if self.patience and len(frs) > self.patience:
            if max(frs[-self.patience:]) <= max(frs[:-self.patience]) + self.min_delta:
                return f"no progress for {self.patience} passes"
        return None
