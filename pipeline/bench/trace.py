"""The bench's instrument on a UAP search: its exact input-set rate against its own clock, as a callback.

The measurements are made beside the search (its clock paused), so the trace says how soon a method reaches a
rate without its time including the measuring. After every pass the pass's own exact rate is used when the
search measured one (keep: best, exact_fr, patience); `every` > 0 also measures every that many steps.
"""
from __future__ import annotations

import pytorch_lightning as pl


class RateTrace(pl.Callback):
    """`points`: (seconds of the search, exact input-set rate of v) along a UAP search (pipeline.attack.UAP)."""

    def __init__(self, every: int = 0):
        self.every, self.points, self.seen = int(every), [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every and (batch_idx + 1) % self.every == 0:
            self.measure(pl_module, None)

    # a pass's history entry is written in the module's own epoch-end hook, which runs after the callbacks':
    # it is read at the next pass's start or at the end of the start, with v still as the pass left it
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.after_pass(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.after_pass(pl_module)

    def after_pass(self, atk) -> None:
        for h in atk.history[self.seen:]:
            self.measure(atk, h)
        self.seen = len(atk.history)

    def measure(self, atk, entry: dict | None) -> None:
        if entry is not None and entry.get("fr_exact") is not None:
            self.points.append((entry["seconds"], entry["fr_exact"]))
            return
        t = atk.clock.elapsed() if entry is None else entry["seconds"]
        with atk.clock.paused():
            self.points.append((t, atk.exact_rate(atk.v.detach())))


class QueryTrace(pl.Callback):
    """`points`: (queries used, held-out rate of v) whenever the search's query count passes one of `checkpoints`
    (and at its end); `rate(v)` is measured directly on the classifier, beside the search: it is not an attacker's
    query, and the search's clock is paused."""

    def __init__(self, checkpoints, rate):
        self.checkpoints, self.rate, self.points = sorted(checkpoints), rate, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        while self.checkpoints and pl_module.queries >= self.checkpoints[0]:
            self.checkpoints.pop(0)
            self.measure(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.points or self.points[-1][0] != pl_module.queries:
            self.measure(pl_module)

    def measure(self, atk) -> None:
        with atk.clock.paused():
            self.points.append((atk.queries, self.rate(atk.v.detach().cpu())))
