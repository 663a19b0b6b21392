"""The classifier's network: a timm model with 3 input channels, pretrained weights only from local files."""
from __future__ import annotations

import os
from pathlib import Path

import timm
import torch

from pipeline.errors import ConfigError, UserError


def build_net(arch: str, num_classes: int, pretrained: bool = False, pretrained_path: str | None = None,
              extra: dict | None = None) -> torch.nn.Module:
    """timm.create_model with 3 input channels; pretrained weights only from local files (no network)."""
    kw = dict(num_classes=num_classes, in_chans=3, **(extra or {}))
    if arch not in timm.list_models() and arch not in timm.list_models(pretrained=True):
        raise ConfigError(f"model.arch={arch!r} is not a timm model (see timm.list_models())")
    if not pretrained:
        return timm.create_model(arch, pretrained=False, **kw)
    if pretrained_path:
        path = Path(pretrained_path).expanduser()
        if not path.is_file():
            raise UserError(f"model.pretrained_path={pretrained_path}: file not found "
                            f"(expected local weights for {arch})")
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kw)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach out: weights must already be cached
    try:
        return timm.create_model(arch, pretrained=True, **kw)
    except Exception as e:  # noqa: BLE001 - timm raises many kinds when weights are absent
        raise UserError(
            f"pretrained weights for {arch!r} are not available on this machine ({type(e).__name__}: {str(e)[:200]}). "
            f"Put them in the Hugging Face / torch hub cache, or set model.pretrained_path=/path/to/weights, "
            f"or use model.pretrained=false") from None
