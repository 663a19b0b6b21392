"""The synthetic phantom chest radiographs of the default data set (pipeline.data.PhantomDataModule): a
chest silhouette, two lung fields, class-specific findings, random anatomy, contrast and noise."""
from __future__ import annotations

import numpy as np


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
