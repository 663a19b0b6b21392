"""Image files under a data root: one file (PNG, JPEG, TIFF, BMP or DICOM) read to the paper's preprocessing, and
the base of the data modules that read such files (covidx, folder): their root and preprocessing keys, the
root check, the memory check, the uint8 image store, and the errors of an image hashed or listed."""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.data.base import BYTES_PER_PIXEL, DEFAULT_MAX_PIXELS, CXRDataModule, check_pixel_count
from pipeline.data.dicom import DICOM_SUFFIX, is_dicom, read_dicom
from pipeline.errors import ConfigError, DataError
from pipeline.identity import file_sha256

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", DICOM_SUFFIX)


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


def read_picture(path: Path, max_pixels: int) -> Image.Image:
    """A PNG / JPEG / TIFF / BMP file as an upright 8-bit grayscale PIL image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is max_pixels
            with Image.open(path) as im:
                check_pixel_count(path, *im.size, max_pixels)
                im.load()
                return to_gray8(upright(im, path))
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"image {path} is too large for PIL: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e} (expected a readable PNG/JPEG image)") from None


def read_gray8(path: Path, max_pixels: int) -> Image.Image:
    """Any image file as 8-bit grayscale: DICOM (.dcm) through pydicom, to [0, 1] then 255 grey levels; the
    other formats through PIL."""
    if is_dicom(path):
        return Image.fromarray(np.round(read_dicom(path, max_pixels) * 255).astype(np.uint8))
    return read_picture(path, max_pixels)


def load_image(path: Path, crop_top: float, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The paper's preprocessing: grayscale, drop the top `crop_top` of the rows, resize to size x size.
    An image of more than `max_pixels` pixels is refused from its header, before it is decoded."""
    im = read_gray8(Path(path), max_pixels)
    w, h = im.size
    top = int(round(h * crop_top))
    if h - top < 2 or w < 2:
        raise DataError(f"image {path} is too small ({w}x{h}) to crop {crop_top:.3f} of its rows")
    im = im.crop((0, top, w, h)).resize((size, size), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def check_data_root(root: Path, holding: str) -> None:
    """data.root must be an existing folder; `holding` says what it should hold (`train.txt and test.txt`)."""
    if not root.exists():
        raise DataError(f"data.root not found: {root} (expected a folder with {holding})")
    if not root.is_dir():
        raise DataError(f"data.root={root} is not a folder (expected a folder with {holding})")


@contextlib.contextmanager
def file_errors(path: Path, where: str = ""):
    """An image that is missing or cannot be read while it is hashed or listed: a DataError naming it, after
    `where` (the label file and line that lists it) when given."""
    prefix = f"{where}: " if where else ""
    try:
        yield
    except FileNotFoundError:
        raise DataError(f"{prefix}image not found: {path}") from None
    except OSError as e:  # a symlink loop, a name too long, no permission...
        raise DataError(f"{prefix}cannot read image {path}: {e.strerror or e}") from None


class ImageFilesDataModule(CXRDataModule):
    """The base of the modules that read image files under `data.root`: the root, the preprocessing keys
    (crop_top, max_pixels), the root check, the memory check, the images read into the uint8 store, and the
    parts of the fingerprint (and of its listing) for each image file."""

    ROOT_EXPECTED = "the path of a data folder"  # what data.root should be, said when it is not set
    ROOT_HOLDS = "the data's images"  # what the data.root folder should hold, said when it is missing

    def __init__(self, root: str, crop_top: float = 1 / 6, max_pixels: int = DEFAULT_MAX_PIXELS, **kw):
        super().__init__(**kw)
        if root in (None, "", "???"):
            raise ConfigError(f"data.root is not set: expected {self.ROOT_EXPECTED}")
        self.root = Path(root).expanduser()
        self.crop_top = float(crop_top)
        if not 0 <= self.crop_top < 1:
            raise ConfigError(f"data.crop_top={crop_top}: expected a fraction in [0, 1)")
        self.max_pixels = int(max_pixels)
        if self.max_pixels < 1:
            raise ConfigError(f"data.max_pixels={max_pixels}: expected an integer >= 1")

    def root_holds(self) -> str:
        """What the data.root folder should hold, said when it is missing or not a folder."""
        return self.ROOT_HOLDS

    def check_root(self) -> None:
        """data.root must be an existing folder."""
        check_data_root(self.root, self.root_holds())

    @staticmethod
    def hash_part(name: str, path: Path, where: str = "") -> bytes:
        """An image's part of the fingerprint: its name and the hash of its bytes (no decoding)."""
        with file_errors(path, where):
            return f"{name} ".encode() + file_sha256(path)

    @staticmethod
    def listing_part(name: str, path: Path, where: str = "") -> bytes:
        """An image's part of the listing: its name, size and mtime (os.stat)."""
        with file_errors(path, where):
            st = os.stat(path)
        return f"{name} {st.st_size} {st.st_mtime_ns}".encode()

    def check_memory(self, n_images: int) -> None:
        """Refuse a data set whose images (uint8 store plus the attack's float copy) would not fit in memory."""
        need, avail = n_images * self.image_size ** 2 * BYTES_PER_PIXEL, psutil.virtual_memory().available
        if need > avail:
            raise ConfigError(f"data.image_size={self.image_size}: {n_images} images need about "
                              f"{need / 2 ** 30:.1f} GiB of memory, only {avail / 2 ** 30:.1f} GiB is available: "
                              "lower data.image_size")

    def read_images(self, paths: Sequence[Path]) -> torch.Tensor:
        """The images at `paths`, preprocessed (crop_top, image_size), as uint8 (N, 1, image_size, image_size)."""
        imgs = np.empty((len(paths), 1, self.image_size, self.image_size), dtype=np.uint8)
        for i, path in enumerate(paths):
            imgs[i, 0] = load_image(path, self.crop_top, self.image_size, self.max_pixels)
        return torch.from_numpy(imgs)
