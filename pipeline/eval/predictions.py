"""Batched evaluation: clean, UAP and random-control predictions of a split in one pass."""
from __future__ import annotations

import torch
import torch.nn as nn

from pipeline import precision
from pipeline.data import GrayDataset, to_float3

# inputs per forward pass in evaluation: CPU convolutions run fastest on small batches (measured on this 2-core
# machine at 128 px, batches of 32 vs 128: mobilenetv3_large_100 1.8x, test_resnet 1.6x, resnet18 1.2x the
# images per second), GPUs on large ones
EVAL_BATCH = {"cpu": 32, "cuda": 256}


def eval_batch(device: torch.device | str) -> int:
    return EVAL_BATCH.get(torch.device(device).type, 128)


@torch.no_grad()
def predict(net: nn.Module, ds: GrayDataset, perturbations: dict[str, torch.Tensor | None],
            batch_size: int | None = None,
            clip: bool = False, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Predicted classes of every image of `ds` under each perturbation (None = clean), one forward per batch.

    The inputs of all perturbations are stacked into one batch, so a split costs one pass over the data; in the
    network's evaluation mode (precision.mode_of), with bf16's close calls predicted again in fp32.
    """
    batch_size = batch_size or max(1, eval_batch(device) // len(perturbations))
    net = net.eval().to(device)
    mode, recheck = precision.mode_of(net, "eval"), precision.recheck_of(net)
    names = list(perturbations)
    vs = [None if v is None else v.to(device) for v in perturbations.values()]
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for start in range(0, len(ds), batch_size):
        x = to_float3(ds.images[start:start + batch_size]).to(device)
        xs = []
        for v in vs:
            xv = x if v is None else x + v
            xs.append(xv.clamp(0, 1) if (clip and v is not None) else xv)
        preds = precision.predicted(net, torch.cat(xs), mode, recheck).view(len(xs), -1).cpu()
        for n, p in zip(names, preds):
            out[n].append(p)
    return {n: torch.cat(p) for n, p in out.items()}
