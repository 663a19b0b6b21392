"""The data modules' shared behaviour: the uint8 image store, splits by patient, loaders, augmentation, and the
fingerprint of the data a module reads (pipeline.identity keys caches and jobs by it).

Every split is preprocessed once, up front, into uint8 tensors (N, 1, H, W): reading and checking every image
before any training means a bad file stops the run at once, with its name. Items are float images in [0, 1],
the grayscale channel replicated to 3 channels, no normalisation (the paper's preprocessing).
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from pipeline import files
from pipeline.errors import ConfigError, DataError, StorageError, instantiate
from pipeline.identity import bytes_digest

log = logging.getLogger(__name__)

COVIDX_CLASSES = ("normal", "pneumonia", "COVID-19")
SPLITS = ("train", "val", "test")
MAX_IMAGE_SIZE = 1024
DEFAULT_MAX_PIXELS = 100_000_000
BYTES_PER_PIXEL = 1 + 3 * 4  # the uint8 store, plus the float (N, 3, H, W) copy the attack makes of its input set


class GrayDataset(Dataset):
    """uint8 grayscale images (N, 1, H, W) and labels; items are (3, H, W) floats in [0, 1]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, patients: Sequence[str] = ()):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"expected uint8 images of shape (N, 1, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images, self.labels = images, labels.long()
        self.patients = list(patients) or [str(i) for i in range(len(labels))]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return to_float3(self.images[i]), self.labels[i]

    def subset(self, idx) -> GrayDataset:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return GrayDataset(self.images[idx], self.labels[idx], [self.patients[i] for i in idx.tolist()])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as (N, 3, H, W) floats, and labels."""
        return to_float3(self.images), self.labels


def to_float3(img_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 1, H, W) -> float (..., 3, H, W) in [0, 1], the gray channel replicated."""
    x = img_u8.float().div_(255.0)
    return x.expand(*x.shape[:-3], 3, *x.shape[-2:]).contiguous()


def patient_split(patients: Sequence[str], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): whole patients go to val, in a seeded order, until val_fraction is reached."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(patients):
        groups.setdefault(p, []).append(i)
    order = sorted(groups)
    np.random.default_rng(seed).shuffle(order)
    target = val_fraction * len(patients)
    val: list[int] = []
    for p in order:
        if len(val) >= target:
            break
        val.extend(groups[p])
    val_set = set(val)
    train = [i for i in range(len(patients)) if i not in val_set]
    return np.array(train, dtype=np.int64), np.array(sorted(val), dtype=np.int64)


def augment_batch(x: torch.Tensor, shift=0.0, scale=0.0, rotate=0.0, brightness=0.0, contrast=0.0) -> torch.Tensor:
    """Light random augmentation of a training batch (B, C, H, W) in [0, 1]: affine, brightness, contrast."""
    b = x.shape[0]
    dev = x.device
    u = lambda: torch.rand(b, device=dev) * 2 - 1  # noqa: E731 - uniform in [-1, 1]
    ang = u() * math.radians(rotate)
    s = 1 + u() * scale
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, u() * shift * 2], 1), torch.stack([sin, cos, u() * shift * 2], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    c = (1 + u() * contrast).view(b, 1, 1, 1)
    br = (u() * brightness).view(b, 1, 1, 1)
    return ((x - mean) * c + mean + br).clamp_(0, 1)


class CXRDataModule(pl.LightningDataModule):
    """Shared behaviour: splits, loaders, augmentation. Subclasses implement `load_splits`."""

    def __init__(self, classes: Sequence[str] = COVIDX_CLASSES, image_size: int = 224, val_fraction: float = 0.1,
                 seed: int = 0, batch_size: int = 32, num_workers: int = 0, augment: dict | None = None,
                 class_weights: str | None = None):
        super().__init__()
        self.classes = list(classes)
        self.image_size = int(image_size)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.augment = dict(augment) if augment else None
        self.class_weighting = class_weights
        self.sets: dict[str, GrayDataset] = {}
        self._fingerprint: str | None = None
        if not 8 <= self.image_size <= MAX_IMAGE_SIZE:
            raise ConfigError(f"data.image_size={image_size}: expected an integer in [8, {MAX_IMAGE_SIZE}]")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction={val_fraction}: expected a number in [0, 1)")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size}: expected an integer >= 1")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers}: expected an integer >= 0 (0: load in the main process)")
        if class_weights not in (None, "balanced"):
            raise ConfigError(f"data.class_weights={class_weights!r}: expected null or balanced")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def load_splits(self) -> tuple[GrayDataset, GrayDataset]:
        raise NotImplementedError

    def fingerprint_parts(self) -> list[bytes]:
        """What identifies the data this module reads, without decoding any image."""
        raise NotImplementedError

    def listing_parts(self) -> list[bytes] | None:
        """A cheap stand-in for fingerprint_parts (file names, sizes, mtimes) under which a memo may keep the
        fingerprint, or None where fingerprint_parts is cheap itself."""
        return None

    def fingerprint(self, memo: Path | str | None = None) -> str:
        """A short hash (16 hex digits) of the data this module reads; needs no setup(), memoized.

        `memo`: a JSON file that keeps, per data root and file listing (names, sizes, mtimes), the fingerprint
        found for it, so that the next process does not read unchanged files again. It saves time only: a
        listing it does not know (a fresh copy, a touched file) is read and hashed again."""
        if self._fingerprint is None:
            listing = self.listing_parts()
            key = bytes_digest(listing) if listing is not None else None
            known = read_memo(memo) if memo and key else {}
            self._fingerprint = known.get(key) or bytes_digest(self.fingerprint_parts())
            if memo and key and known.get(key) != self._fingerprint:
                write_memo(memo, {**known, key: self._fingerprint})
        return self._fingerprint

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        train_full, test = self.load_splits()
        tr, va = patient_split(train_full.patients, self.val_fraction, self.seed)
        sets = {"train": train_full.subset(tr), "val": train_full.subset(va), "test": test}
        self.check_train_split(sets["train"], len(train_full))
        self.sets = sets
        for name, ds in self.sets.items():
            counts = np.bincount(ds.labels.numpy(), minlength=self.num_classes).tolist()
            log.info("%s: %d images %s", name, len(ds), dict(zip(self.classes, counts)))

    def check_train_split(self, train: GrayDataset, n_full: int) -> None:
        """What data.val_fraction leaves for training must hold every class, and more than one image."""
        counts = np.bincount(train.labels.numpy(), minlength=self.num_classes)
        what = (f"data.val_fraction={self.val_fraction:g} leaves {len(train)} of the {n_full} training images "
                f"for training")
        if len(train) < 2:
            raise DataError(f"{what}: expected at least 2; lower data.val_fraction")
        missing = [c for c, n in zip(self.classes, counts) if n == 0]
        if missing:
            raise DataError(f"{what}, none of class {missing} (whole patients go to validation): lower "
                            f"data.val_fraction or add images of {missing}")

    def class_weights(self) -> torch.Tensor | None:
        """The training loss's class weights: data.class_weights=balanced gives each class the same total weight
        whatever its share of the training images (n / (k x n_class)); null, plain cross-entropy."""
        if self.class_weighting is None:
            return None
        counts = torch.bincount(self.dataset("train").labels, minlength=self.num_classes).float()
        weights = counts.sum() / (self.num_classes * counts.clamp(min=1))
        log.info("class weights %s", {c: round(w, 3) for c, w in zip(self.classes, weights.tolist())})
        return weights

    def dataset(self, split: str) -> GrayDataset:
        self.setup()
        if split not in self.sets:
            raise ConfigError(f"unknown split {split!r}: expected one of {list(self.sets)}")
        return self.sets[split]

    def loader(self, split: str, batch_size: int | None = None, shuffle: bool = False,
               seed: int | None = None, drop_last: bool = False) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed if seed is None else seed) if shuffle else None
        return DataLoader(self.dataset(split), batch_size=batch_size or self.batch_size, shuffle=shuffle,
                          generator=gen, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          drop_last=drop_last)

    def train_dataloader(self):
        """Shuffled training batches. A last batch of one image is dropped (a different one each epoch):
        BatchNorm cannot normalise a batch of one in training."""
        return self.loader("train", shuffle=True, drop_last=len(self.dataset("train")) % self.batch_size == 1)

    def val_dataloader(self):
        return self.loader("val")

    def test_dataloader(self):
        return self.loader("test")

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.augment and self.trainer is not None and self.trainer.training:
            x, y = batch
            batch = (augment_batch(x, **self.augment), y)
        return batch


MEMO_ENTRIES = 64  # listings a fingerprint memo keeps (the latest)


def read_memo(path: Path | str) -> dict[str, str]:
    """A fingerprint memo's entries; none where it is missing or unreadable (it only saves time)."""
    try:
        memo = json.loads(Path(path).read_text())
        return {str(k): str(v) for k, v in memo.items()} if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        return {}


def write_memo(path: Path | str, memo: dict[str, str]) -> None:
    try:
        files.write_json(path, dict(list(memo.items())[-MEMO_ENTRIES:]), indent=0)
    except StorageError as e:  # a read-only cache folder costs time, never the run
        log.warning("fingerprint memo not written: %s", e)


def check_pixel_count(path: Path, width: int, height: int, max_pixels: int) -> None:
    """Refuse an image of more than `max_pixels` pixels (data.max_pixels), from the size its header gives."""
    if width * height > max_pixels:
        raise DataError(f"image {path} is {width}x{height} = {width * height:_} pixels, more than "
                        f"data.max_pixels={max_pixels:_}: downscale it or raise data.max_pixels")


def warn_overlap(what: str, common: set[str]) -> None:
    """Warn when train and test share patients or image files (count and up to 3 examples)."""
    if common:
        log.warning("%d %s appear in both train and test (e.g. %s)", len(common), what, sorted(common)[:3])


def data_fingerprint(data_cfg, memo: Path | str | None = None) -> str:
    """The fingerprint of the data a `data` config reads (see CXRDataModule.fingerprint)."""
    return instantiate(data_cfg).fingerprint(memo)
