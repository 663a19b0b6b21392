"""The victim classifier as the attack reaches it: every image it forwards is counted (a query), and a black-box
attacker gets probabilities only.

A white-box search calls `logits` (gradients to the input allowed); every attack calls `probabilities` and
`predict`. With `black_box=True`, `logits` is refused and so is any input that carries a gradient, so a
black-box attack cannot use more than it is given by mistake. With `max_queries`, a call that would forward more
images than are left raises `OutOfQueries` before it runs: the count never passes the budget. With a `transform`
(an adaptive attacker, `attack.adaptive`), every image passes through it before the network, with fresh draws of
its random parameters at every call and straight-through gradients where it has none (pipeline.eval.transforms).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pipeline import precision
from pipeline.errors import ConfigError


class OutOfQueries(Exception):
    """The query budget (attack.max_queries) cannot pay for the next call."""


class BlackBoxViolation(RuntimeError):
    """A black-box attack asked the victim for more than probabilities (a bug in the attack, not in the input)."""


def check_budget_pays_one_pass(max_queries: int | None, n_inputs: int) -> None:
    """attack.max_queries must pay for one pass over the input set (its clean predictions, the labels of the
    search) or the search cannot start."""
    if max_queries is not None and max_queries < n_inputs:
        raise ConfigError(f"attack.max_queries={max_queries}: less than one pass over the {n_inputs} input images "
                          f"(their clean predictions); expected >= {n_inputs}")


class Victim:
    def __init__(self, net: nn.Module, black_box: bool = False, max_queries: int | None = None, transform=None):
        self.net, self.black_box, self.max_queries = net, bool(black_box), max_queries
        self.transform = transform or None
        self.queries = 0

    def left(self) -> float:
        return float("inf") if self.max_queries is None else self.max_queries - self.queries

    def afford(self, n: int) -> None:
        """Raise OutOfQueries unless n more queries fit the budget (a step checks its whole cost first)."""
        if n > self.left():
            raise OutOfQueries(f"{n} more queries, {self.left():.0f} left of attack.max_queries={self.max_queries}")

    def _count(self, x: torch.Tensor) -> None:
        self.afford(len(x))
        self.queries += len(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """White-box: fp32 logits in the classifier's attack mode, differentiable to x."""
        if self.black_box:
            raise BlackBoxViolation("a black-box attack asked for the victim's logits (and their gradients)")
        self._count(x)
        return precision.logits(self.net, self.piped(x), precision.mode_of(self.net, "attack"))

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """What a scoring interface returns: class probabilities (B, C), no gradient."""
        self._refuse_gradients(x)
        self._count(x)
        return precision.logits(self.net, self.piped(x.detach()), precision.mode_of(self.net, "eval")).softmax(1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted classes (B,), as the evaluation predicts them (bf16 close calls rechecked in fp32)."""
        self._refuse_gradients(x)
        self._count(x)
        return precision.predicted(self.net, self.piped(x.detach()), precision.mode_of(self.net, "eval"),
                                   precision.recheck_of(self.net))

    def piped(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.transform is None else self.transform(x)

    def _refuse_gradients(self, x: torch.Tensor) -> None:
        if self.black_box and x.requires_grad:
            raise BlackBoxViolation("a black-box attack passed the victim an input that requires a gradient")
