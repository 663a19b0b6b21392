"""The synthetic phantom set, the embedded default (no files): chest radiographs rendered in memory with a chest
silhouette, two lung fields, class-specific findings (normal: clear; pneumonia: dense lobar opacity; COVID-19:
bilateral peripheral ground-glass patches), random anatomy, contrast and noise. Deterministic under its seed."""
from __future__ import annotations

import json
import logging

import numpy as np
import torch

from pipeline.data.base import CXRDataModule, GrayDataset
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


def _blob(X, Y, cx, cy, sx, sy, sharp=4.0):
    """A soft-edged ellipse, 1 inside and 0 outside."""
    r = np.sqrt(((X - cx) / sx) ** 2 + ((Y - cy) / sy) ** 2)
    return 1 / (1 + np.exp((r - 1) * sharp * 4))


def _gauss(X, Y, cx, cy, s):
    return np.exp(-((X - cx) ** 2 + (Y - cy) ** 2) / (2 * s * s))


def render_phantom(label: int, size: int, rng: np.random.Generator, noise: float, strength: float) -> np.ndarray:
    """One phantom chest radiograph in [0, 1] (bright = dense), class 0 normal, 1 pneumonia, 2 COVID-19."""
    lin = np.linspace(-1, 1, size)
    X, Y = np.meshgrid(lin, lin)
    j = lambda s: rng.uniform(-s, s)  # noqa: E731 - random jitter
    body = _blob(X, Y, j(0.04), 0.1 + j(0.04), 0.82 + j(0.06), 1.0 + j(0.05), sharp=3)
    img = 0.08 + 0.5 * body
    # ribs: curved stripes over the chest
    ribs = 0.5 + 0.5 * np.sin((Y + 0.35 * X ** 2) * (13 + j(2)) + rng.uniform(0, 2 * np.pi))
    img += 0.05 * body * ribs ** 3
    lungs, lung_masks = np.zeros_like(X), []
    for side in (-1, 1):
        m = _blob(X, Y, side * (0.36 + j(0.04)), -0.02 + j(0.05), 0.24 + j(0.04), 0.5 + j(0.06), sharp=2.5)
        lung_masks.append((side, m))
        lungs += m
    lungs = np.clip(lungs, 0, 1)
    img -= (0.33 + j(0.05)) * lungs
    img += (0.12 + j(0.03)) * _blob(X, Y, 0.08 + j(0.04), 0.28 + j(0.05), 0.2 + j(0.03), 0.28 + j(0.04), sharp=2)
    # vessels / benign densities, any class (so that "a bright spot" alone is not the class)
    for _ in range(rng.integers(1, 4)):
        img += 0.06 * _gauss(X, Y, j(0.6), j(0.5), rng.uniform(0.02, 0.05)) * lungs
    s = strength * rng.uniform(0.6, 1.2)
    if label == 1:  # pneumonia: one dense lobar opacity, upper or lower part of one lung
        side, m = lung_masks[rng.integers(0, 2)]
        cut = j(0.15) + (0.15 if rng.random() < 0.7 else -0.35)
        lobe = m * (1 / (1 + np.exp(-(Y - cut) * 14)))
        img += s * (0.24 + j(0.04)) * lobe
    elif label == 2:  # COVID-19: bilateral, peripheral, hazy (ground-glass) patches
        for side, m in lung_masks:
            for _ in range(rng.integers(2, 4)):
                cx = side * (0.52 + j(0.06))
                cy = rng.uniform(-0.05, 0.45)
                img += s * 0.11 * _gauss(X, Y, cx, cy, rng.uniform(0.08, 0.14)) * m
    # acquisition: contrast, brightness, gamma, noise
    img = img * rng.uniform(0.85, 1.15) + j(0.05)
    img = np.clip(img, 0, 1) ** rng.uniform(0.85, 1.2)
    img = img + rng.normal(0, noise, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


# --------------------------------------------------------------------------- phantom

class PhantomDataModule(CXRDataModule):
    """Synthetic CXR-like phantoms built in memory; balanced classes, deterministic under `seed`."""

    def __init__(self, n_train: int = 600, n_test: int = 300, noise: float = 0.04, finding_strength: float = 0.7, **kw):
        super().__init__(**kw)
        if len(self.classes) != 3:
            raise ConfigError(f"data.classes={self.classes}: the phantom has exactly 3 classes "
                              "(normal, pneumonia, COVID-19)")
        for key, val in (("n_train", n_train), ("n_test", n_test)):
            if int(val) < 3 * 2:
                raise ConfigError(f"data.{key}={val}: expected an integer >= 6 (at least 2 images per class)")
        self.n = {"train": int(n_train), "test": int(n_test)}
        self.noise = float(noise)
        self.strength = float(finding_strength)

    def fingerprint_parts(self) -> list[bytes]:
        """The phantom is generated from its parameters: they are its data."""
        params = {"n_train": self.n["train"], "n_test": self.n["test"], "noise": self.noise,
                  "finding_strength": self.strength, "seed": self.seed, "image_size": self.image_size,
                  "classes": self.classes}
        return [b"phantom", json.dumps(params, sort_keys=True).encode()]

    def load_splits(self):
        out = []
        for k, split in enumerate(("train", "test")):
            rng = np.random.default_rng([self.seed, k])
            n = self.n[split]
            labels = np.arange(n) % 3
            rng.shuffle(labels)
            imgs = np.stack([render_phantom(int(c), self.image_size, rng, self.noise, self.strength) for c in labels])
            u8 = torch.from_numpy(np.round(imgs * 255).astype(np.uint8)[:, None])
            out.append(GrayDataset(u8, torch.from_numpy(labels), [f"{split}-{i}" for i in range(n)]))
        return tuple(out)
