"""COVIDx-format folders (COVIDx itself, cxr3, another hospital's export): label files `train.txt` / `test.txt`
with lines `patient_id filename class source`, images under the split folders, read and checked up front."""
from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.data.base import DEFAULT_MAX_PIXELS, GrayDataset, warn_overlap
from pipeline.data.images import ImageFilesDataModule
from pipeline.errors import DataError

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


class CovidxDataModule(ImageFilesDataModule):
    """A COVIDx-format folder: `train.txt` / `test.txt` and an image folder per split. Images may be PNG, JPEG,
    TIFF, BMP or DICOM (.dcm, the `dicom` extra)."""

    ROOT_EXPECTED = "the path of a COVIDx-format folder, e.g. data.root=../shared/data/cxr3"

    def __init__(self, root: str, train_file: str = "train.txt", test_file: str = "test.txt",
                 train_dir: str = "train", test_dir: str = "test", crop_top: float = 1 / 6,
                 max_pixels: int = DEFAULT_MAX_PIXELS, **kw):
        super().__init__(root=root, crop_top=crop_top, max_pixels=max_pixels, **kw)
        self.files = {"train": (train_file, train_dir), "test": (test_file, test_dir)}

    def root_holds(self) -> str:
        return f"{self.files['train'][0]} and {self.files['test'][0]}"

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
        labels = torch.tensor([r.label for r in records])
        return GrayDataset(self.read_images(paths), labels, [r.patient for r in records])

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
                parts.append(self.hash_part(f"{image_dir}/{r.filename}", folder / r.filename,
                                            f"{self.root / label_file}:{r.line}"))
        return parts

    def listing_parts(self) -> list[bytes]:
        """The data root, each label file's bytes, and each listed image's name, size and mtime (os.stat)."""
        parts = [str(self.root.resolve()).encode()]
        for label_file, image_dir, records, folder in self.listed_files():
            parts.append((self.root / label_file).read_bytes())
            for r in records:
                parts.append(self.listing_part(f"{image_dir}/{r.filename}", folder / r.filename,
                                               f"{self.root / label_file}:{r.line}"))
        return parts

    def listed_files(self):
        """(label file, image folder name, records, image folder) per split, checked by read_split."""
        self.check_root()
        for split, (label_file, image_dir) in self.files.items():
            records, folder = self.read_split(split)
            yield label_file, image_dir, records, folder
