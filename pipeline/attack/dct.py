"""The low-frequency DCT basis the black-box searches move in (Guo et al. 2019, SimBA-DCT; Koga & Takemoto 2022).

An image (H, W) is `D.T @ C @ D` for its coefficients C under the orthonormal DCT-II matrix D (`dct_matrix`):
coefficient (r, c) alone gives the basis image `outer(D[r], D[c])`, of L2 norm 1. Low (r, c) are smooth,
image-wide patterns; a perturbation built from them survives the classifier's pooling and transfers across
images, which is why universal black-box searches start there.
"""
from __future__ import annotations

import math

import torch


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix (n, n): row k is the k-th cosine basis vector."""
    i = torch.arange(n, dtype=torch.float64)
    d = torch.cos(math.pi * (i[None, :] + 0.5) * i[:, None] / n) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def block_order(size: int, freq_dim: int, stride: int, generator: torch.Generator) -> torch.Tensor:
    """Coefficient indices (r * size + c) in U-SimBA's order: the freq_dim x freq_dim lowest frequencies in a
    random order, then each further shell of `stride` rows and columns in a random order of its own."""
    freq_dim = min(freq_dim, size)
    first = torch.tensor([r * size + c for r in range(freq_dim) for c in range(freq_dim)])
    shells = [first[torch.randperm(len(first), generator=generator)]]
    for i in range(freq_dim, size, stride):
        j = min(i + stride, size)
        shell = torch.tensor([r * size + c for r in range(j) for c in range(j) if r >= i or c >= i])
        shells.append(shell[torch.randperm(len(shell), generator=generator)])
    return torch.cat(shells)


class Basis:
    """Basis images of one size: single coefficients (`image`) and random low-frequency directions (`random`)."""

    def __init__(self, size: int):
        self.size = size
        self.d = dct_matrix(size).float()

    def image(self, index: int) -> torch.Tensor:
        """The basis image of coefficient `index` (r * size + c), (1, H, W), L2 norm 1."""
        r, c = divmod(int(index), self.size)
        return torch.outer(self.d[r], self.d[c])[None]

    def random(self, k: int, freq_dim: int, generator: torch.Generator) -> torch.Tensor:
        """k directions (k, 1, H, W) of L2 norm 1, Gaussian in the freq_dim x freq_dim lowest coefficients."""
        f = min(freq_dim, self.size)
        coef = torch.zeros(k, self.size, self.size)
        coef[:, :f, :f] = torch.randn(k, f, f, generator=generator)
        img = self.d.T @ coef @ self.d
        return (img / img.flatten(1).norm(dim=1).view(-1, 1, 1))[:, None]
