"""Class-per-subfolder image sets (skin lesions, OCT, a hospital's export sorted by diagnosis): `root/<class>/<image>`,
or `root/train/<class>/` and `root/test/<class>/` when the root has train/ and test/ folders. Without them the
test split is drawn from every class's images (data.test_fraction, seeded by data.test_seed), whole patients: a
patient's images, in whatever classes, are all in train or all in test. Patients come from the file names
(data.patient_pattern); where none can be derived, images are split one by one."""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.data.base import DEFAULT_MAX_PIXELS, GrayDataset, warn_overlap
from pipeline.data.images import IMAGE_SUFFIXES, ImageFilesDataModule, check_data_root
from pipeline.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLIT_DIRS = ("train", "test")
LAYOUT = "one subfolder of images per class (root/<class>/*.png), or train/ and test/ folders holding them"
CLASS_NAME = re.compile(r"[\w.\- ]+")  # what MLflow takes in a metric name (test_sens_<class>)


@dataclass(frozen=True)
class Item:
    split: str      # the split folder (train, test), or `all` where the root has none
    name: str       # the path relative to data.root, with / (`train/normal/a.png`, `normal/a.png`)
    path: Path
    label: int
    patient: str    # from data.patient_pattern, else the name (the image is its own patient)


def has_split_dirs(root: Path) -> bool:
    """Whether the root holds train/ and test/ folders, each with the class folders."""
    return all((root / d).is_dir() for d in SPLIT_DIRS)


def subfolders(folder: Path) -> list[str]:
    """The names of the folders in `folder` (hidden ones left out), sorted."""
    try:
        return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise DataError(f"cannot list {folder}: {e.strerror or e}") from None


def find_classes(root: Path, classes: list[str] | None = None) -> list[str]:
    """The class names: `classes` when given (its folders must be exactly those present), else the class
    folders' names, sorted. With train/ and test/ folders, both must hold the same class folders."""
    check_data_root(root, LAYOUT)
    tops = [root / d for d in SPLIT_DIRS] if has_split_dirs(root) else [root]
    found = {top: subfolders(top) for top in tops}
    for top, names in found.items():
        if not names:
            raise DataError(f"{top}: no class folders (expected {LAYOUT})")
    names = classes if classes is not None else found[tops[0]]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.classes={names}: expected distinct class names")
    what = "data.classes" if classes is not None else f"the class folders of {tops[0]}"
    for top, present in found.items():
        missing, extra = [c for c in names if c not in present], [c for c in present if c not in names]
        if missing or extra:
            diff = [f"no folder for {missing}"] * bool(missing) + [f"folders not among them {extra}"] * bool(extra)
            raise DataError(f"{top}: its class folders {present} do not match {what} {names} ({', '.join(diff)})")
    if len(names) < 2:
        raise DataError(f"{tops[0]}: found {len(names)} class folder {names}: expected at least 2 classes")
    bad = [c for c in names if not CLASS_NAME.fullmatch(c)]
    if bad:
        raise DataError(f"{tops[0]}: class names {bad} hold characters other than letters, digits, _ - . and "
                        f"spaces; rename those folders (a class name is part of metric names, test_sens_<class>)")
    return list(names)


def configured_classes(data: DictConfig) -> list[str]:
    """The class names a data config gives: data.classes, or where it is null (data=folder) the class folders
    under data.root."""
    if data.get("classes") is not None:
        return list(data.classes)
    if OmegaConf.is_missing(data, "root") or not data.get("root"):
        raise ConfigError(f"data.root is not set: expected the path of a folder with {LAYOUT}")
    return find_classes(Path(str(data.root)).expanduser())


def image_files(folder: Path) -> list[Path]:
    """The image files of a class folder (hidden files left out), sorted; none is an error naming the folder."""
    try:
        paths = sorted(Path(e.path) for e in os.scandir(folder)
                       if e.name[0] != "." and Path(e.name).suffix.lower() in IMAGE_SUFFIXES and e.is_file())
    except OSError as e:
        raise DataError(f"cannot list {folder}: {e.strerror or e}") from None
    if not paths:
        raise DataError(f"class folder {folder} has no images (expected files ending in {', '.join(IMAGE_SUFFIXES)})")
    return paths


class FolderDataModule(ImageFilesDataModule):
    """A folder of class folders (see the module's docstring). Images may be PNG, JPEG, TIFF, BMP or DICOM."""

    ROOT_EXPECTED = f"the path of a folder with {LAYOUT}"
    ROOT_HOLDS = LAYOUT

    def __init__(self, root: str, classes: list[str] | None = None, test_fraction: float = 0.2, test_seed: int = 0,
                 patient_pattern: str | None = None, crop_top: float = 1 / 6, max_pixels: int = DEFAULT_MAX_PIXELS,
                 **kw):
        super().__init__(root=root, crop_top=crop_top, max_pixels=max_pixels, classes=(), **kw)
        self.test_fraction = float(test_fraction)
        self.test_seed = int(test_seed)
        self.pattern = self.compile_pattern(patient_pattern)
        self.check_root()
        self.split_dirs = has_split_dirs(self.root)
        if not self.split_dirs and not 0 < self.test_fraction < 1:
            raise ConfigError(f"data.test_fraction={test_fraction}: expected a number in (0, 1) ({self.root} has "
                              f"no train/ and test/ folders, so the test split is drawn from its images)")
        self.classes = find_classes(self.root, list(classes) if classes is not None else None)

    @staticmethod
    def compile_pattern(pattern: str | None) -> re.Pattern | None:
        if pattern is None:
            return None
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"data.patient_pattern={pattern!r}: not a regular expression: {e}") from None
        if compiled.groups != 1:
            raise ConfigError(f"data.patient_pattern={pattern!r}: expected one group, the patient id in the file "
                              f"name (e.g. '^(\\w+?)_'), found {compiled.groups}")
        return compiled

    def listed(self) -> list[Item]:
        """Every image under the root, split folder by split folder, class by class; its patient its name."""
        tops = [(d, self.root / d, f"{d}/") for d in SPLIT_DIRS] if self.split_dirs else [("all", self.root, "")]
        return [Item(split, f"{prefix}{c}/{p.name}", p, label, f"{prefix}{c}/{p.name}")
                for split, top, prefix in tops for label, c in enumerate(self.classes) for p in image_files(top / c)]

    def with_patients(self, items: list[Item]) -> list[Item]:
        """The items with the patient data.patient_pattern finds in their file names; the log says where the
        split is image-level (no pattern, or file names it does not match)."""
        if self.pattern is None:
            log.info("%s: image-level split (data.patient_pattern is null): each image is its own patient", self.root)
            return items
        found = [self.pattern.search(it.path.name) for it in items]
        ids = [m.group(1) if m and m.group(1) else None for m in found]
        unmatched = [it.name for it, i in zip(items, ids) if i is None]
        if unmatched:
            log.warning("data.patient_pattern=%r matches %d of %d file names: image-level split for the other %d "
                        "(e.g. %s)", self.pattern.pattern, len(items) - len(unmatched), len(items), len(unmatched),
                        unmatched[:3])
        return [replace(it, patient=i) if i is not None else it for it, i in zip(items, ids)]

    def split_test(self, items: list[Item]) -> tuple[list[Item], list[Item]]:
        """(train, test): whole patients to test until data.test_fraction of each class's images is reached, a
        patient's images in every class with it (a patient is never on both sides), seeded by data.test_seed (not
        by the training seed: every seed is measured on the same test images).

        Class by class, the patients with images of the class are taken in a seeded order (the sorted ids
        shuffled by data.test_seed) and go to test, with all their images, until the class's test share is met;
        images a patient already in test brought from another class count toward it. Where no patient has
        images in two classes, this is a seeded patient split of each class on its own."""
        by_patient: dict[str, list[Item]] = {}
        for it in items:
            by_patient.setdefault(it.patient, []).append(it)
        in_test: set[str] = set()
        count = [0] * len(self.classes)  # test images per class
        for label in range(len(self.classes)):
            target = self.test_fraction * sum(it.label == label for it in items)
            order = sorted({it.patient for it in items if it.label == label})
            np.random.default_rng(self.test_seed).shuffle(order)
            for p in order:
                if count[label] >= target:
                    break
                if p not in in_test:
                    in_test.add(p)
                    for it in by_patient[p]:
                        count[it.label] += 1
        train = [it for it in items if it.patient not in in_test]
        test = [it for it in items if it.patient in in_test]
        for label, c in enumerate(self.classes):
            if not any(it.label == label for it in train):
                mine = [it for it in items if it.label == label]
                raise DataError(f"{self.root / c}: data.test_fraction={self.test_fraction:g} leaves none of its "
                                f"{len(mine)} images ({len({it.patient for it in mine})} patients) for training: "
                                "lower data.test_fraction or add images of other patients")
        return train, test

    def load_splits(self):
        items = self.with_patients(self.listed())
        if self.split_dirs:
            train, test = [it for it in items if it.split == "train"], [it for it in items if it.split == "test"]
            how = "train/ and test/ folders"
        else:
            train, test = self.split_test(items)
            how = f"test split {self.test_fraction:g} of each class, seeded {self.test_seed}"
        self.check_memory(len(train) + len(test))
        log.info("reading images from %s (%s, crop_top=%.3f, %d px)", self.root, how, self.crop_top, self.image_size)
        train_set, test_set = self.dataset_of(train), self.dataset_of(test)
        warn_overlap("patients", set(train_set.patients) & set(test_set.patients))
        return train_set, test_set

    def dataset_of(self, items: list[Item]) -> GrayDataset:
        labels = torch.tensor([it.label for it in items], dtype=torch.long)
        return GrayDataset(self.read_images([it.path for it in items]), labels, [it.patient for it in items])

    def fingerprint_parts(self) -> list[bytes]:
        """The classes in their order, and each image's name (relative to the root) and the hash of its bytes
        (no decoding): a copy of the same files has the same fingerprint wherever it lies."""
        parts = [b"classes " + json.dumps(self.classes).encode()]
        return parts + [self.hash_part(it.name, it.path) for it in self.listed()]

    def listing_parts(self) -> list[bytes]:
        """The data root, the classes, and each image's name, size and mtime (os.stat)."""
        parts = [str(self.root.resolve()).encode(), b"classes " + json.dumps(self.classes).encode()]
        return parts + [self.listing_part(it.name, it.path) for it in self.listed()]
