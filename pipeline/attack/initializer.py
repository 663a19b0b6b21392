"""Initializers: where a UAP search starts (conf/attack/initializer/).

Each is called as `init(shape, eps, norm, generator)` and returns a (1, H, W) tensor inside the Lp ball
of radius eps. Restarts (`attack.restarts`) start from `RandomSphere` points of their own.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.attack.norms import lp_norms, project, random_uap
from pipeline.errors import ConfigError


class Zeros:
    """v = 0 (the paper's and ART's start)."""

    def __call__(self, shape: Sequence[int], eps: float, norm: str, generator: torch.Generator) -> torch.Tensor:
        return torch.zeros(shape)


class RandomSphere:
    """Uniform on the Lp sphere of radius `radius` x eps (1.0: the sphere of the budget itself)."""

    def __init__(self, radius: float = 1.0):
        if not 0 < float(radius) <= 1:
            raise ConfigError(f"attack.initializer.radius={radius}: expected a number in (0, 1]")
        self.radius = float(radius)

    def __call__(self, shape, eps, norm, generator):
        return random_uap(shape, eps * self.radius, norm, generator)


def load_uap_file(path: str | Path, size: int, key: str = "attack.uap_file") -> torch.Tensor:
    """A saved UAP (.npy, H x W or 1 x H x W, finite floats) as a (1, H, W) tensor; a clear error otherwise."""
    p = Path(path)
    try:
        arr = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ConfigError(f"{key}={path}: cannot read a .npy array ({e})") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive loads as a mapping of arrays
        raise ConfigError(f"{key}={path}: expected one .npy array (np.save), got an .npz archive")
    if arr.dtype.kind not in "fiu":
        raise ConfigError(f"{key}={path}: expected a numeric array, got dtype {arr.dtype}")
    if arr.shape not in ((size, size), (1, size, size)):
        raise ConfigError(f"{key}={path}: shape {arr.shape}, expected ({size}, {size}) for data.image_size={size}")
    if not np.isfinite(arr).all():
        raise ConfigError(f"{key}={path}: {int((~np.isfinite(arr)).sum())} values are NaN or infinite")
    return torch.from_numpy(arr.astype(np.float32)).view(1, size, size)


class FromFile:
    """A saved UAP (.npy) as the start; one whose Lp norm exceeds eps is an error unless `project: true`."""

    def __init__(self, path: str, project: bool = False):
        if not path:
            raise ConfigError("attack.initializer.path is not set: expected the .npy file of a UAP")
        self.path, self.project = str(path), bool(project)

    def __call__(self, shape, eps, norm, generator):
        v = load_uap_file(self.path, shape[-1], "attack.initializer.path")
        return check_budget(v, eps, norm, self.project, f"attack.initializer.path={self.path}",
                            "attack.initializer.project")


def check_budget(v: torch.Tensor, eps: float, norm: str, allow_project: bool, what: str,
                 project_key: str) -> torch.Tensor:
    """v itself when inside the Lp ball of radius eps (float tolerance), projected when allowed, else an error
    naming `what` (the key and file) and the key that allows the projection."""
    n = lp_norms(v[None], norm).item()
    if n <= eps * (1 + 1e-5):
        return v
    if allow_project:
        return project(v[None], eps, norm)[0]
    raise ConfigError(f"{what}: its {norm} norm {n:.5g} exceeds eps={eps:.5g} (zeta's budget); "
                      f"set the matching zeta, or project it onto the ball with {project_key}=true")
