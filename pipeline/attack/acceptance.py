"""Acceptance rules: whether a step's candidate v replaces the current one (conf/attack/acceptance/).

`choose(fools, fooled)` gets, for the images of the step, whether each candidate fools each image
(K, B) and whether the current v does (B,), and returns the index of the candidate to keep or None.
A rule with `check = False` needs no evaluation of the candidates: the (single) candidate is kept. A rule with
`scores = True` judges by probabilities instead (`choose_score`): what a black-box attacker sees.
"""
from __future__ import annotations

import torch


class Always:
    """Keep every step (gradient methods: the objective, not a vote, decides)."""

    check, scores = False, False

    def choose(self, fools: torch.Tensor | None, fooled: torch.Tensor) -> int | None:
        return 0


class IfFoolsMore:
    """The paper's rule, accept-if-it-flips: for one image, keep the step only if it fools that image; for
    a batch, keep the candidate that fools the most images of the batch, if it fools more than the
    current v does (images already fooled count too, so nothing is undone unseen)."""

    check, scores = True, False

    def choose(self, fools: torch.Tensor, fooled: torch.Tensor) -> int | None:
        counts = fools.sum(1)
        best = int(counts.argmax())
        return best if counts[best] > fooled.sum() else None


class IfScoreImproves:
    """U-SimBA's rule: keep the best candidate if its score, summed over the step's images, improves on the
    current v's. An image's score is the probability of the class to leave (non-targeted: its clean prediction;
    lower is better) or to reach (targeted; the module negates it, so that lower is better too)."""

    check, scores = True, True

    def choose_score(self, scores: torch.Tensor, current: float) -> int | None:
        """The index of the lowest of the candidates' scores (K,) (the module negates what is to rise), if it is
        lower than the current one."""
        best = int(scores.argmin())
        return best if bool(scores[best] < current) else None
