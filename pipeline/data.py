"""Data modules: the synthetic phantom set (default) and COVIDx-format folders (COVIDx, cxr3).

Every split is preprocessed once, up front, into uint8 tensors (N, 1, H, W): reading and
checking every image before any training means a bad file stops the run at once, with its name.
Items are float images in [0, 1], the grayscale channel replicated to 3 channels, no normalisation
(the paper's preprocessing).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import posixpath
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from pipeline import files
from pipeline.errors import ConfigError, DataError, StorageError, instantiate
from pipeline.phantom import render_phantom

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
            key = digest(listing) if listing is not None else None
            known = read_memo(memo) if memo and key else {}
            self._fingerprint = known.get(key) or digest(self.fingerprint_parts())
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


# --------------------------------------------------------------------------- COVIDx format

@dataclass(frozen=True)
class Record:
    patient: str
    filename: str
    label: int
    source: str
    line: int


def read_label_file(path: Path, classes: Sequence[str]) -> list[Record]:
    """Parse a COVIDx label file: one image per line, `patient_id filename class source`."""
    if not path.is_file():
        raise DataError(f"label file not found: {path} (expected a COVIDx label file with lines "
                        f"'patient_id filename class source')")
    records: list[Record] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(label_lines(path), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 4:
            raise DataError(f"{path}:{n}: expected 4 space-separated fields 'patient_id filename class source', "
                            f"got {len(fields)}: {line[:120]!r}")
        patient, filename, cls, source = fields
        if cls not in classes:
            raise DataError(f"{path}:{n}: unknown class {cls!r}; expected one of {list(classes)}")
        p = Path(filename)
        if p.is_absolute() or ".." in p.parts:
            raise DataError(f"{path}:{n}: filename {filename!r} must be a relative path inside the image folder")
        name = posixpath.normpath(filename)  # a.png and ./a.png are one file (links: image_paths)
        if name in seen:
            raise DataError(f"{path}:{n}: duplicate filename {filename!r} (first on line {seen[name]})")
        seen[name] = n
        records.append(Record(patient, filename, classes.index(cls), source, n))
    if not records:
        raise DataError(f"label file is empty: {path} (expected lines 'patient_id filename class source')")
    return records


def label_lines(path: Path) -> list[str]:
    """The lines of a label file, decoded as UTF-8 (a BOM ignored); a line that is not UTF-8 is an error naming
    the line, not text with replacement characters that later reads as a missing image."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read label file {path}: {e.strerror or e}") from None
    data = data.removeprefix(b"\xef\xbb\xbf")
    lines = []
    for n, raw in enumerate(data.split(b"\n"), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}): "
                            f"save the label file as UTF-8") from None
    return lines


def to_gray8(im: Image.Image) -> Image.Image:
    """8-bit grayscale. 16-bit and 32-bit integer images are scaled by their true bit depth, the smallest of
    8, 10, 12, 14, 16 bits holding their maximum (12-bit exports in 16-bit PNGs are common); float images,
    and integers outside [0, 65535], by their min-max range. Other modes convert as PIL does."""
    if im.mode not in ("I", "F") and not im.mode.startswith("I;16"):
        return im.convert("L")
    a = np.nan_to_num(np.asarray(im, dtype=np.float64))
    lo, hi = float(a.min()), float(a.max())
    if im.mode != "F" and lo >= 0 and hi < 2 ** 16:
        lo, hi = 0.0, float(2 ** next(b for b in (8, 10, 12, 14, 16) if hi < 2 ** b) - 1)
    a = (a - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.round(a).clip(0, 255).astype(np.uint8))


def upright(im: Image.Image, path: Path) -> Image.Image:
    """The image as it is meant to be seen: its EXIF orientation applied (a photo or JPEG stored rotated), so
    that the top crop removes the top. Unreadable EXIF is warned about and the pixels kept as stored."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception as e:  # noqa: BLE001 - malformed EXIF in an otherwise readable image
        log.warning("image %s: EXIF orientation unreadable (%s); using the pixels as stored", path, e)
        return im


def load_image(path: Path, crop_top: float, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The paper's preprocessing: grayscale, drop the top `crop_top` of the rows, resize to size x size.
    An image of more than `max_pixels` pixels is refused from its header, before it is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is max_pixels
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise DataError(f"image {path} is {w}x{h} = {w * h:_} pixels, more than "
                                    f"data.max_pixels={max_pixels:_}: downscale it or raise data.max_pixels")
                im.load()
                im = to_gray8(upright(im, path))
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"image {path} is too large for PIL: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e} (expected a readable PNG/JPEG image)") from None
    w, h = im.size
    top = int(round(h * crop_top))
    if h - top < 2 or w < 2:
        raise DataError(f"image {path} is too small ({w}x{h}) to crop {crop_top:.3f} of its rows")
    im = im.crop((0, top, w, h)).resize((size, size), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


class CovidxDataModule(CXRDataModule):
    """A COVIDx-format folder: `train.txt` / `test.txt` and an image folder per split."""

    def __init__(self, root: str, train_file: str = "train.txt", test_file: str = "test.txt",
                 train_dir: str = "train", test_dir: str = "test", crop_top: float = 1 / 6,
                 max_pixels: int = DEFAULT_MAX_PIXELS, **kw):
        super().__init__(**kw)
        if root in (None, "", "???"):
            raise ConfigError("data.root is not set: expected the path of a COVIDx-format folder, "
                              "e.g. data.root=../shared/data/cxr3")
        self.root = Path(root).expanduser()
        self.files = {"train": (train_file, train_dir), "test": (test_file, test_dir)}
        self.crop_top = float(crop_top)
        if not 0 <= self.crop_top < 1:
            raise ConfigError(f"data.crop_top={crop_top}: expected a fraction in [0, 1)")
        self.max_pixels = int(max_pixels)
        if self.max_pixels < 1:
            raise ConfigError(f"data.max_pixels={max_pixels}: expected an integer >= 1")

    def check_root(self) -> None:
        """data.root must be an existing folder."""
        expected = f"expected a folder with {self.files['train'][0]} and {self.files['test'][0]}"
        if not self.root.exists():
            raise DataError(f"data.root not found: {self.root} ({expected})")
        if not self.root.is_dir():
            raise DataError(f"data.root={self.root} is not a folder ({expected})")

    def read_split(self, split: str) -> tuple[list[Record], Path]:
        label_file, image_dir = self.files[split]
        records = read_label_file(self.root / label_file, self.classes)
        folder = self.root / image_dir
        if not folder.is_dir():
            raise DataError(f"image folder not found: {folder} (data.{split}_dir={image_dir!r}, relative to data.root)")
        present = {r.label for r in records}
        missing = [c for i, c in enumerate(self.classes) if i not in present]
        if missing:
            raise DataError(f"{self.root / label_file}: no image of class {missing} in the {split} split; "
                            f"every split needs every class {self.classes}")
        return records, folder

    def image_paths(self, split: str, records: list[Record], folder: Path) -> list[Path]:
        """The resolved path of every image of a split; none may leave the image folder (symlinks), none may be
        listed twice under two spellings (`a.png`, `./a.png`, a link to it)."""
        root, paths, seen = folder.resolve(), [], {}
        label_file = self.root / self.files[split][0]
        for r in records:
            try:
                path = (folder / r.filename).resolve()
            except (OSError, RuntimeError) as e:  # a symlink loop (RuntimeError before Python 3.13)
                raise DataError(f"{label_file}:{r.line}: cannot resolve {r.filename!r}: {e}") from None
            if root not in path.parents:
                raise DataError(f"{label_file}:{r.line}: {r.filename!r} escapes the image folder {folder}")
            if path in seen:
                first = seen[path]
                raise DataError(f"{label_file}:{r.line}: {r.filename!r} is the same image as {first.filename!r} "
                                f"on line {first.line}: list each image once")
            seen[path] = r
            paths.append(path)
        return paths

    def load_split(self, records: list[Record], paths: list[Path]) -> GrayDataset:
        imgs = np.empty((len(records), 1, self.image_size, self.image_size), dtype=np.uint8)
        for i, path in enumerate(paths):
            imgs[i, 0] = load_image(path, self.crop_top, self.image_size, self.max_pixels)
        labels = torch.tensor([r.label for r in records])
        return GrayDataset(torch.from_numpy(imgs), labels, [r.patient for r in records])

    def check_memory(self, n_images: int) -> None:
        """Refuse a data set whose images (uint8 store plus the attack's float copy) would not fit in memory."""
        need, avail = n_images * self.image_size ** 2 * BYTES_PER_PIXEL, psutil.virtual_memory().available
        if need > avail:
            raise ConfigError(f"data.image_size={self.image_size}: {n_images} images need about "
                              f"{need / 2 ** 30:.1f} GiB of memory, only {avail / 2 ** 30:.1f} GiB is available: "
                              "lower data.image_size")

    def load_splits(self):
        self.check_root()
        # parse both label files first so that a malformed line fails before any image is read
        parsed = {split: self.read_split(split) for split in ("train", "test")}
        paths = {split: self.image_paths(split, *parsed[split]) for split in parsed}
        self.check_memory(sum(len(p) for p in paths.values()))
        root = self.root.resolve()
        warn_overlap("images", {os.path.relpath(p, root) for p in set(paths["train"]) & set(paths["test"])})
        log.info("reading images from %s (crop_top=%.3f, %d px)", self.root, self.crop_top, self.image_size)
        train, test = (self.load_split(parsed[s][0], paths[s]) for s in ("train", "test"))
        warn_overlap("patients", set(train.patients) & set(test.patients))
        return train, test

    def fingerprint_parts(self) -> list[bytes]:
        """Each label file's bytes, and each listed image's name and the hash of its bytes (no decoding): a copy
        of the same files has the same fingerprint wherever it lies and whatever its mtimes."""
        parts = []
        for label_file, image_dir, records, folder in self.listed_files():
            parts.append((self.root / label_file).read_bytes())  # readable: read_split has decoded it
            for r in records:
                with self.image_errors(label_file, r, folder):
                    parts.append(f"{image_dir}/{r.filename} ".encode() + file_sha256(folder / r.filename))
        return parts

    def listing_parts(self) -> list[bytes]:
        """The data root, each label file's bytes, and each listed image's name, size and mtime (os.stat)."""
        parts = [str(self.root.resolve()).encode()]
        for label_file, image_dir, records, folder in self.listed_files():
            parts.append((self.root / label_file).read_bytes())
            for r in records:
                with self.image_errors(label_file, r, folder):
                    st = os.stat(folder / r.filename)
                parts.append(f"{image_dir}/{r.filename} {st.st_size} {st.st_mtime_ns}".encode())
        return parts

    def listed_files(self):
        """(label file, image folder name, records, image folder) per split, checked by read_split."""
        self.check_root()
        for split, (label_file, image_dir) in self.files.items():
            records, folder = self.read_split(split)
            yield label_file, image_dir, records, folder

    @contextlib.contextmanager
    def image_errors(self, label_file: str, r: Record, folder: Path):
        """An image that is missing or cannot be read: a DataError naming its label file and line."""
        try:
            yield
        except FileNotFoundError:
            raise DataError(f"{self.root / label_file}:{r.line}: image not found: {folder / r.filename}") from None
        except OSError as e:  # a symlink loop, a name too long, no permission...
            raise DataError(f"{self.root / label_file}:{r.line}: cannot read image {folder / r.filename}: "
                            f"{e.strerror or e}") from None


def digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()[:16]


def file_sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.digest()


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


def warn_overlap(what: str, common: set[str]) -> None:
    """Warn when train and test share patients or image files (count and up to 3 examples)."""
    if common:
        log.warning("%d %s appear in both train and test (e.g. %s)", len(common), what, sorted(common)[:3])


def data_fingerprint(data_cfg, memo: Path | str | None = None) -> str:
    """The fingerprint of the data a `data` config reads (see CXRDataModule.fingerprint)."""
    return instantiate(data_cfg).fingerprint(memo)


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
