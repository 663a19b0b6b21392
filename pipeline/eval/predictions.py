"""Batched evaluation: clean, UAP and random-control predictions of a split in one pass.

The clean predictions of a classifier on a split are the same for every UAP: the jobs of a sweep that share a
process (one classifier, many UAPs) predict them once, memoised by a digest of the weights and the images.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from pipeline import precision
from pipeline.data import GrayDataset, to_float3
from pipeline.eval.transforms import Pipeline
from pipeline.identity import digest, tensors_digest
from pipeline.precision import eval_batch

CLEAN: OrderedDict[str, torch.Tensor] = OrderedDict()  # digest -> clean predictions, the newest few
CLEAN_KEPT = 16


def clean_key(net: nn.Module, images: torch.Tensor, mode, recheck: float, transform: str = "none",
              draws: tuple[int, int] = (0, 0)) -> str:
    """What the clean predictions depend on: the weights (and buffers), the images, the precision mode, the
    transform the images pass through (and what its draws depend on: the seed and the batch size)."""
    return digest({"net": type(net).__name__, "weights": tensors_digest(net.state_dict().values()),
                   "images": tensors_digest([images]), "shape": list(images.shape), "mode": str(mode),
                   "recheck": recheck, **({"transform": transform, "draws": list(draws)} if transform != "none"
                                          else {})})


@torch.no_grad()
def predict(net: nn.Module, ds: GrayDataset, perturbations: dict[str, torch.Tensor | None],
            batch_size: int | None = None, clip: bool = False, device: torch.device | str = "cpu",
            transform: Pipeline | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Predicted classes of every image of `ds` under each perturbation (None = clean), one forward per batch.

    The inputs of all perturbations are stacked into one batch, so a split costs one pass over the data; in the
    network's evaluation mode (precision.mode_of), with bf16's close calls predicted again in fp32. With a
    `transform` (the hospital's pipeline), every input passes through it first, an image and its perturbed
    copies with the same draws of its random parameters (seeded by `seed` and the batch).
    """
    transform = transform or None
    batch_size = batch_size or max(1, eval_batch(device) // len(perturbations))
    net = net.eval().to(device)
    mode, recheck = precision.mode_of(net, "eval"), precision.recheck_of(net)
    names = list(perturbations)
    known = {}
    if any(v is None for v in perturbations.values()):
        key = clean_key(net, ds.images, mode, recheck, str(transform or "none"), (seed, batch_size))
        if key in CLEAN:
            CLEAN.move_to_end(key)
            known = {n: CLEAN[key] for n, v in perturbations.items() if v is None}
            names = [n for n in names if n not in known]
            if not names:
                return known
    vs = [perturbations[n] for n in names]
    vs = [None if v is None else v.to(device) for v in vs]
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for start in range(0, len(ds), batch_size):
        x = to_float3(ds.images[start:start + batch_size]).to(device)
        xs = []
        for v in vs:
            xv = x if v is None else x + v
            xv = xv.clamp(0, 1) if (clip and v is not None) else xv
            xs.append(xv if transform is None else transform(xv, seed=seed * 1_000_003 + start))
        preds = precision.predicted(net, torch.cat(xs), mode, recheck).view(len(xs), -1).cpu()
        for n, p in zip(names, preds):
            out[n].append(p)
    result = {n: torch.cat(p) for n, p in out.items()}
    for n in names:
        if perturbations[n] is None:
            CLEAN[key] = result[n]
            while len(CLEAN) > CLEAN_KEPT:
                CLEAN.popitem(last=False)
    return {n: known[n] if n in known else result[n] for n in perturbations}
