"""What a hospital's pipeline does to an image before the model sees it (`transform=...`, conf/transform/):
lossy JPEG, resizing down and back, Gaussian blur, a median filter, fewer grey levels. Applied to every image at
evaluation (clean, UAP and random control alike), composable as a list (`transform=[resize,jpeg]`, in that
order).

Each transform maps float images (B, C, H, W) to the same shape; the ones that store the image in 8 or fewer
bits (JPEG, bit depth) clip it to [0, 1] as a stored image is, the others leave its range as it is. A
parameter given as a range `[low, high]` is drawn per image: at evaluation from a generator seeded per batch
(`seed`), so that an image and its perturbed copies get the same draw and reruns agree; in an adaptive attack
(`attack.adaptive`) afresh at every call, so the search optimises the expectation over the transform (EOT).

The non-differentiable ones (JPEG, bit depth, median) pass the gradient straight through (BPDA: forward the
transform, backward the identity), so that an adaptive attacker's gradient is not blocked by them: a
transform is not credited with robustness that is only a masked gradient.
"""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.errors import ConfigError, instantiate


def draw(value, n: int, gen: torch.Generator | None) -> torch.Tensor:
    """A parameter for n images: a number repeated, or for a range [low, high] uniform draws."""
    if isinstance(value, (list, tuple)):
        low, high = float(value[0]), float(value[1])
        return low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)
    return torch.full((n,), float(value), dtype=torch.float64)


def check_param(name: str, key: str, value, low: float, high: float, integer: bool = False) -> None:
    """transform.<name>.<key>: a number in [low, high], or a range [a, b] of such numbers with a <= b."""
    vals = list(value) if isinstance(value, (list, tuple)) else [value]
    ok = (len(vals) in (1, 2) and all(isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high
                                      and (not integer or float(v).is_integer()) for v in vals)
          and (len(vals) == 1 or vals[0] <= vals[1]))
    if not ok:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"transform.{name}.{key}={value!r}: expected {kind} in [{low:g}, {high:g}], or a range "
                          f"[low, high] of them")


def straight_through(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y in the forward pass, the identity's gradient in the backward pass (BPDA)."""
    return x + (y - x).detach()


class Transform:
    """One step of the pipeline; subclasses implement `apply` (per image parameters drawn by `draw`)."""
    name = "transform"
    differentiable = True

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        y = self.apply(x, gen)
        return y if self.differentiable else straight_through(x, y.to(x.dtype))

    def apply(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in vars(self).items())})"


class JPEG(Transform):
    """Lossy JPEG at `quality` (1-95), grayscale (the image's first channel, replicated back): PIL's encoder."""
    name, differentiable = "jpeg", False

    def __init__(self, quality=75):
        check_param(self.name, "quality", quality, 1, 95, integer=True)
        self.quality = quality

    @torch.no_grad()
    def apply(self, x, gen):
        q = draw(self.quality, len(x), gen).round().int().tolist()
        gray = (x[:, 0].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        out = np.empty_like(gray)
        for i, (img, quality) in enumerate(zip(gray, q)):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
            out[i] = np.asarray(Image.open(buf).convert("L"))
        y = torch.from_numpy(out).to(x.device).float().div(255)[:, None]
        return y.expand(-1, x.shape[1], -1, -1)


class Resize(Transform):
    """Down to `size` x `size` pixels (area-averaged, as an export at a lower resolution) and back (bilinear)."""
    name = "resize"

    def __init__(self, size=64):
        check_param(self.name, "size", size, 4, 4096, integer=True)
        self.size = size

    def apply(self, x, gen):
        sizes = draw(self.size, len(x), gen).round().int().tolist()
        h, w = x.shape[-2:]
        out = [F.interpolate(F.interpolate(x[i:i + 1], size=(s, s), mode="area" if s <= h else "bilinear"),
                             size=(h, w), mode="bilinear", align_corners=False) for i, s in enumerate(sizes)]
        return torch.cat(out)


class Blur(Transform):
    """Gaussian blur of standard deviation `sigma` pixels (reflect padding; the kernel spans 3 sigma)."""
    name = "blur"

    def __init__(self, sigma=1.0):
        check_param(self.name, "sigma", sigma, 0.1, 20)
        self.sigma = sigma

    def apply(self, x, gen):
        sigmas = draw(self.sigma, len(x), gen).tolist()
        return torch.cat([gaussian_blur(x[i:i + 1], s) for i, s in enumerate(sigmas)])


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(np.ceil(3 * sigma)))
    r = min(r, x.shape[-1] - 1, x.shape[-2] - 1)
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


class Median(Transform):
    """Median filter over `kernel` x `kernel` pixels (odd; reflect padding)."""
    name, differentiable = "median", False

    def __init__(self, kernel=3):
        check_param(self.name, "kernel", kernel, 3, 15, integer=True)
        if isinstance(kernel, (list, tuple)) or int(kernel) % 2 == 0:
            raise ConfigError(f"transform.median.kernel={kernel!r}: expected an odd integer in [3, 15]")
        self.kernel = int(kernel)

    @torch.no_grad()
    def apply(self, x, gen):
        """On the first channel (the images are grayscale), a few images at a time: unfold holds k x k copies."""
        r, k = self.kernel // 2, self.kernel
        b, c, h, w = x.shape
        chunk = max(1, 2 ** 24 // (k * k * h * w))
        out = []
        for i in range(0, b, chunk):
            g = F.pad(x[i:i + chunk, :1].detach(), (r, r, r, r), mode="reflect")
            out.append(F.unfold(g, k).median(dim=1).values.view(-1, 1, h, w))
        return torch.cat(out).expand(-1, c, -1, -1)


class BitDepth(Transform):
    """`bits` bits per pixel (2**bits grey levels), as a display or an export with fewer levels."""
    name, differentiable = "bitdepth", False

    def __init__(self, bits=6):
        check_param(self.name, "bits", bits, 1, 16, integer=True)
        self.bits = bits

    @torch.no_grad()
    def apply(self, x, gen):
        levels = (2 ** draw(self.bits, len(x), gen).round() - 1).to(x.dtype).to(x.device).view(-1, 1, 1, 1)
        return torch.round(x.clamp(0, 1) * levels) / levels


class Pipeline:
    """Transforms applied in order; empty: the identity (`transform=none`)."""

    def __init__(self, steps: Sequence[Transform] = ()):
        self.steps = list(steps)

    def __bool__(self) -> bool:
        return bool(self.steps)

    def __call__(self, x: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """`seed`: the draws of ranged parameters (the same seed, the same draws); None: fresh draws."""
        gen = None if seed is None else torch.Generator().manual_seed(int(seed))
        for t in self.steps:
            x = t(x, gen)
        return x

    def __str__(self) -> str:
        return " -> ".join(map(repr, self.steps)) or "none"

    @property
    def name(self) -> str:
        return "+".join(t.name for t in self.steps) or "none"


def build(cfg: Mapping | None) -> Pipeline:
    """The `transform` config (conf/transform/: a mapping name -> {_target_, params}, in order) as a Pipeline."""
    steps = []
    for name, spec in (cfg or {}).items():
        if spec is None:
            continue
        t = instantiate(spec, _convert_="all")  # ranges as plain lists
        if not isinstance(t, Transform):
            raise ConfigError(f"transform.{name}: {type(t).__name__} is not a pipeline.eval.transforms.Transform")
        steps.append(t)
    return Pipeline(steps)
