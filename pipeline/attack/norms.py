"""Lp geometry of a UAP: norms, the one projection onto the Lp ball, zeta -> eps, points on the sphere.

The projector of every attack is `project`, chosen by `attack.norm` (linf or l2).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.errors import ConfigError

NORMS = ("linf", "l2")


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ConfigError(f"attack.norm={norm!r}: expected one of {list(NORMS)} (norm=linf or norm=l2)")
    return norm


def lp_norms(x: torch.Tensor, norm: str) -> torch.Tensor:
    """The Lp norm of each row of x (N, ...) -> (N,)."""
    flat = x.flatten(1)
    return flat.abs().amax(1) if check_norm(norm) == "linf" else flat.norm(p=2, dim=1)


def project(v: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project each row of v (N, ...) onto the Lp ball of radius eps; points inside are unchanged."""
    if check_norm(norm) == "linf":
        return v.clamp(-eps, eps)
    n = lp_norms(v, norm).view(-1, *[1] * (v.ndim - 1))
    return v * torch.where(n > eps, eps / n.clamp(min=1e-12), torch.ones_like(n))


def zeta_to_eps(images: torch.Tensor, zeta: float, norm: str) -> float:
    """eps = zeta/100 x mean Lp norm of the single-channel images (N, 1, H, W) of the input set."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected single-channel images (N, 1, H, W), got {tuple(images.shape)}")
    return float(zeta) / 100.0 * lp_norms(images.double(), norm).mean().item()


def random_control(uap: torch.Tensor, eps: float, norm: str, seed: int) -> torch.Tensor:
    """The random control of a UAP: a point uniform on the same Lp sphere (same shape, norm eps), drawn
    from `seed + 1` so that it differs from anything the search itself drew from `seed`."""
    return random_uap(uap.shape, eps, norm, torch.Generator().manual_seed(seed + 1))


def random_uap(shape: Sequence[int], eps: float, norm: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """A perturbation uniform on the Lp sphere of radius eps (its norm is exactly eps).

    L2: a normalised Gaussian. L-inf: uniform in the cube, then one coordinate pushed to a face (a
    uniform point on the cube's surface has exactly one coordinate at +-eps, the face chosen uniformly).
    """
    if check_norm(norm) == "l2":
        g = torch.randn(shape, generator=generator, dtype=torch.float64)
        return (g * (eps / g.norm())).float()
    v = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * eps
    flat = v.view(-1)
    i = torch.randint(flat.numel(), (1,), generator=generator)
    flat[i] = eps if torch.rand(1, generator=generator).item() < 0.5 else -eps
    return v.float()


def per_pixel(eps: float, norm: str, numel: int) -> float:
    """The size of eps per pixel: eps itself for L-inf, eps / sqrt(H*W) for L2 (a step unit at any resolution)."""
    return eps if check_norm(norm) == "linf" else eps / numel ** 0.5
