"""COVIDx-format folders (COVIDx itself, cxr3, another hospital's export): label files `train.txt` / `test.txt`
with lines `patient_id filename class source`, images under the split folders, read and checked up front."""
from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.data.base import (
    BYTES_PER_PIXEL,
    DEFAULT_MAX_PIXELS,
    CXRDataModule,
    GrayDataset,
    warn_overlap,
)
from pipeline.errors import ConfigError, DataError
from pipeline.identity import file_sha256

log = logging.getLogger(__name__)


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
