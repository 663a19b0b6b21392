"""Input sets for an attacker without the victim's training images (`attack.input_source`; Minagi, Hirano &
Takemoto, J. Imaging 8:38, 2022):

    folder   every image under `attack.input_root` (another hospital's COVIDx-format folder, any image folder)
    natural  natural photographs: the sample images scikit-image ships, cut into random crops (the `proxy` extra)
    noise    no images at all: procedural noise (uniform, and Gaussian noise smoothed at random scales)

Each is grayscale uint8 at the data's image size, like the victim's own images; `n` images in a seeded order.
They carry no labels of their own: the search labels every input by the victim's clean prediction.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.data.base import GrayDataset
from pipeline.data.images import IMAGE_SUFFIXES, load_image
from pipeline.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SOURCES = ("train", "folder", "natural", "noise")
# the scikit-image sample images bundled with its wheel (others are downloaded on first use: not here)
NATURAL = ("astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass",
           "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text", "cell")


def proxy_set(source: str, n: int, size: int, seed: int, root: str | None = None) -> GrayDataset:
    """`n` images of the source (`folder`: at most as many as the folder has), uint8 (n, 1, size, size)."""
    if source == "folder":
        images = folder_images(root, n, size, seed)
    elif source == "natural":
        images = natural_images(n, size, seed)
    elif source == "noise":
        images = noise_images(n, size, seed)
    else:
        raise ConfigError(f"attack.input_source={source!r}: expected one of {list(SOURCES)}")
    log.info("input set: %d %s images (%s), labelled by the victim's predictions", len(images), source,
             root if source == "folder" else "seeded")
    return GrayDataset(images, torch.full((len(images),), -1, dtype=torch.long),
                       [f"{source}:{i}" for i in range(len(images))])


def folder_files(root: str | None) -> list[Path]:
    """The image files under `root` (recursively), sorted; a clear error naming the folder when there are none."""
    if not root:
        raise ConfigError("attack.input_source=folder needs attack.input_root (a folder of images)")
    folder = Path(str(root)).expanduser()
    if not folder.is_dir():
        raise DataError(f"attack.input_root={root}: folder not found")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise DataError(f"attack.input_root={root}: no image files ({', '.join(IMAGE_SUFFIXES)}) under it")
    return paths


def folder_images(root: str | None, n: int, size: int, seed: int) -> torch.Tensor:
    paths = folder_files(root)
    order = np.random.default_rng(seed).permutation(len(paths))[:n]
    return torch.from_numpy(np.stack([load_image(paths[i], 0.0, size) for i in sorted(order)]))[:, None]


def natural_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Random square crops (a third of the shorter side to all of it) of scikit-image's sample photographs,
    grayscale, resized; the photographs taken in turn."""
    try:
        import skimage.data
        from skimage.color import rgb2gray
    except ImportError:
        raise ConfigError("attack.input_source=natural needs scikit-image: pip install -e '.[proxy]' "
                          "(make install installs it)") from None
    photos = []
    for name in NATURAL:
        a = getattr(skimage.data, name)()
        a = rgb2gray(a[..., :3]) if a.ndim == 3 else a.astype(np.float64) / (255.0 if a.dtype == np.uint8 else 1.0)
        photos.append((np.clip(a, 0, 1) * 255).astype(np.uint8))
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        a = photos[i % len(photos)]
        h, w = a.shape
        side = int(rng.uniform(1 / 3, 1.0) * min(h, w))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(a[top:top + side, left:left + side])
        out[i] = np.asarray(crop.resize((size, size), Image.BILINEAR))
    return torch.from_numpy(out)[:, None]


def noise_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Half uniform noise, half Gaussian noise smoothed at a random scale (1 to size/4 pixels) and stretched to
    [0, 1]: textures from fine to blotchy, with no image content."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g)
    for i in range(n // 2, n):
        scale = float(torch.empty(1).uniform_(0, np.log(max(2.0, size / 4)), generator=g).exp())
        k = int(2 * round(2 * scale) + 1)
        t = torch.arange(k, dtype=torch.float32) - k // 2
        w = torch.exp(-t ** 2 / (2 * scale ** 2))
        w = (w / w.sum()).view(1, 1, 1, k)
        z = torch.randn(1, 1, size, size, generator=g)
        z = F.conv2d(F.pad(z, (k // 2, k // 2, 0, 0), mode="circular"), w)
        z = F.conv2d(F.pad(z, (0, 0, k // 2, k // 2), mode="circular"), w.transpose(2, 3))
        x[i] = (z - z.min()) / (z.max() - z.min()).clamp_min(1e-12)
    return (x * 255).round().to(torch.uint8)
