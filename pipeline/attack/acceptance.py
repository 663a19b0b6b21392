"""Acceptance rules: whether a step's candidate v replaces the current one (conf/attack/acceptance/).

`choose(fools, fooled)` gets, for the images of the step, whether each candidate fools each image
(K, B) and whether the current v does (B,), and returns the index of the candidate to keep or None.
A rule with `check = False` needs no evaluation of the candidates: the (single) candidate is kept.
"""
from __future__ import annotations

import torch


class Always:
    """Keep every step (gradient methods: the objective, not a vote, decides)."""

    check = False

    def choose(self, fools: torch.Tensor | None, fooled: torch.Tensor) -> int | None:
        return 0


class IfFoolsMore:
    """The paper's rule, accept-if-it-flips: for one image, keep the step only if it fools that image; for
    a batch, keep the candidate that fools the most images of the batch, if it fools more than the
    current v does (images already fooled count too, so nothing is undone unseen)."""

    check = True

    def choose(self, fools: torch.Tensor, fooled: torch.Tensor) -> int | None:
        counts = fools.sum(1)
        best = int(counts.argmax())
        return best if counts[best] > fooled.sum() else None
