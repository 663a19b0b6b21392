"""data=folder: class folders of images (a seeded test split, or train/ and test/ folders), classes found or
listed, patients from file names, clear errors naming the folder, and one run from the command line."""
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_cfg, mlflow_runs, run_cli

from pipeline.config import validate
from pipeline.data import FolderDataModule, load_image
from pipeline.errors import ConfigError, DataError

pytestmark = pytest.mark.realdata  # the images are cxr3's (../shared/data/cxr3)

CLASSES = ("normal", "pneumonia", "COVID-19")


def cxr3_pngs(cxr3: Path, per_class: int) -> dict[str, list[Path]]:
    """The first `per_class` images of each class of cxr3's training split."""
    rows = [line.split() for line in (cxr3 / "train.txt").read_text().splitlines() if line.strip()]
    return {c: [cxr3 / "images" / r[1] for r in rows if r[2] == c][:per_class] for c in CLASSES}


def class_folders(cxr3: Path, root: Path, per_class: int = 6, patients: int | None = None) -> Path:
    """root/<class>/ holding `per_class` cxr3 images of the class, named `<class>{patient}_{i}.png` (patients
    given: images i of a class spread over that many patients, else one patient per image)."""
    for c, pngs in cxr3_pngs(cxr3, per_class).items():
        (root / c).mkdir(parents=True)
        for i, png in enumerate(pngs):
            patient = i % patients if patients else i
            shutil.copy(png, root / c / f"{c.replace('-', '')}{patient}_{i}.png")
    return root


def module(root: Path, **kw) -> FolderDataModule:
    kw = {"image_size": 32, "val_fraction": 0.0, "test_fraction": 1 / 3, **kw}
    dm = FolderDataModule(root=str(root), **kw)
    dm.setup()
    return dm


def test_class_folders_load_sorted_with_a_seeded_test_split_of_every_class(cxr3_root, tmp_path, caplog):
    root = class_folders(cxr3_root, tmp_path / "set")
    (root / "notes.txt").write_text("not a class")  # files beside the class folders, and non-images in them,
    (root / "normal" / "Thumbs.db").write_bytes(b"x")  # are left out, like hidden files
    (root / "normal" / "._normal0_0.png").write_bytes(b"AppleDouble")
    (root / ".cache").mkdir()
    with caplog.at_level(logging.INFO, logger="pipeline.data.folder"):
        dm = module(root)
    assert dm.classes == ["COVID-19", "normal", "pneumonia"] and dm.num_classes == 3
    train, test = dm.dataset("train"), dm.dataset("test")
    assert len(train) == 12 and len(test) == 6
    assert np.bincount(test.labels.numpy()).tolist() == [2, 2, 2]
    assert "image-level split" in caplog.text
    again = module(root)
    assert again.dataset("test").patients == test.patients  # the split is seeded (data.test_seed)...
    assert module(root, seed=7).dataset("test").patients == test.patients  # ... not by the training seed
    assert module(root, test_seed=1).dataset("test").patients != test.patients
    # the pixels are load_image's
    name = test.patients[0]
    assert np.array_equal(test.images[0, 0].numpy(), load_image(root / name, 1 / 6, 32))


def test_listed_classes_set_the_order_and_must_match_the_folders(cxr3_root, tmp_path):
    root = class_folders(cxr3_root, tmp_path / "set", per_class=3)
    dm = module(root, classes=list(CLASSES))
    assert dm.classes == list(CLASSES)
    normal = [p for p, y in zip(dm.dataset("train").patients, dm.dataset("train").labels) if y == 0]
    assert normal and all(p.startswith("normal/") for p in normal)
    with pytest.raises(DataError, match=r"no folder for \['flu'\]"):
        FolderDataModule(root=str(root), classes=["normal", "pneumonia", "COVID-19", "flu"])
    with pytest.raises(DataError, match=r"folders not among them \['COVID-19'\]") as e:
        FolderDataModule(root=str(root), classes=["normal", "pneumonia"])
    assert str(root) in str(e.value)
    (root / "COVID-19").rename(root / "COVID (19)")  # a class name must be usable in metric names
    with pytest.raises(DataError, match=r"class names \['COVID \(19\)'\] hold characters other than"):
        FolderDataModule(root=str(root))


def test_train_and_test_folders_are_the_split(cxr3_root, tmp_path):
    root = tmp_path / "set"
    class_folders(cxr3_root, root / "train", per_class=4)
    class_folders(cxr3_root, root / "test", per_class=2)
    dm = module(root, test_fraction=0.9)  # no test split drawn: test_fraction is not used
    assert len(dm.dataset("train")) == 12 and len(dm.dataset("test")) == 6
    assert all(p.startswith("test/") for p in dm.dataset("test").patients)
    shutil.rmtree(root / "test" / "pneumonia")
    with pytest.raises(DataError, match=rf"{re.escape(str(root / 'test'))}: its class folders .*\(no folder for "
                                        rf"\['pneumonia'\]"):
        FolderDataModule(root=str(root))


def test_empty_or_missing_folders_are_errors_naming_them(cxr3_root, tmp_path):
    root = class_folders(cxr3_root, tmp_path / "set", per_class=2)
    (root / "tb").mkdir()
    tb = re.escape(str(root / "tb"))
    with pytest.raises(DataError, match=rf"class folder {tb} has no images \(expected files ending in"):
        module(root)
    (root / "tb" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=rf"class folder {tb} has no images"):
        FolderDataModule(root=str(root)).fingerprint()
    (tmp_path / "flat").mkdir()
    shutil.copy(next((root / "normal").iterdir()), tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path / 'flat'))}: no class folders \(expected one "):
        FolderDataModule(root=str(tmp_path / "flat"))
    (tmp_path / "one" / "normal").mkdir(parents=True)
    with pytest.raises(DataError, match=r"found 1 class folder \['normal'\]: expected at least 2"):
        FolderDataModule(root=str(tmp_path / "one"))
    with pytest.raises(DataError, match=rf"data.root not found: {re.escape(str(tmp_path / 'nowhere'))}"):
        FolderDataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="data.root is not set"):
        FolderDataModule(root="???")
    with pytest.raises(ConfigError, match=r"data.test_fraction=0: expected a number in \(0, 1\)"):
        FolderDataModule(root=str(tmp_path / "set"), test_fraction=0)


def test_patient_pattern_keeps_a_patients_images_on_one_side(cxr3_root, tmp_path, caplog):
    root = class_folders(cxr3_root, tmp_path / "set", per_class=12, patients=4)  # 3 images per patient
    dm = module(root, patient_pattern=r"^(\w+?)_", test_fraction=0.25, val_fraction=0.2)
    sides = {s: set(dm.dataset(s).patients) for s in ("train", "val", "test")}
    assert sides["train"] and sides["val"] and sides["test"]
    assert not (sides["train"] & sides["val"]) and not (sides["train"] & sides["test"])
    assert not (sides["val"] & sides["test"])
    assert {"normal0", "pneumonia3", "COVID191"} <= set().union(*sides.values())
    assert len(dm.dataset("test")) == 9  # one patient (3 images) of each class
    with caplog.at_level(logging.WARNING, logger="pipeline.data.folder"):
        dm = module(root, patient_pattern=r"^patient(\d+)-")
    assert "matches 0 of 36 file names: image-level split for the other 36" in caplog.text
    assert len(set(dm.dataset("test").patients)) == len(dm.dataset("test"))
    with pytest.raises(ConfigError, match=r"data.patient_pattern=.*: expected one group, the patient id"):
        FolderDataModule(root=str(root), patient_pattern=r"^\w+_")
    with pytest.raises(ConfigError, match=r"data.patient_pattern='\(': not a regular expression"):
        FolderDataModule(root=str(root), patient_pattern="(")


def test_a_patient_with_images_in_two_classes_stays_on_one_side(cxr3_root, tmp_path, caplog):
    root = class_folders(cxr3_root, tmp_path / "set", per_class=6)  # patients normal0 .. normal5, ...
    for c, name in (("normal", "shared_a.png"), ("pneumonia", "shared_b.png"), ("pneumonia", "shared_c.png"),
                    ("pneumonia", "extra1_a.png"), ("pneumonia", "extra2_a.png")):
        shutil.copy(next((root / c).iterdir()), root / c / name)  # patient `shared`: 1 normal, 2 pneumonia images
    sides = set()
    for test_seed in range(8):
        dm = FolderDataModule(root=str(root), patient_pattern=r"^(\w+?)_", test_fraction=1 / 3, test_seed=test_seed)
        train, test = dm.split_test(dm.with_patients(dm.listed()))
        shared = {it.name: it in test for it in train + test if it.patient == "shared"}
        assert len(shared) == 3 and len(set(shared.values())) == 1, (test_seed, shared)
        assert not {it.patient for it in train} & {it.patient for it in test}
        for label in range(3):  # every class on both sides, about a third of it in test (the shared patient's
            n = sum(it.label == label for it in train + test)  # images may add to a class's share)
            assert n / 3 <= sum(it.label == label for it in test) <= n / 3 + 2
            assert any(it.label == label for it in train)
        sides |= set(shared.values())
    assert sides == {True, False}  # some seeds put the patient in test, others in train
    with caplog.at_level(logging.WARNING):
        dm = module(root, patient_pattern=r"^(\w+?)_", test_seed=1)
    assert "appear in both train and test" not in caplog.text
    assert not set(dm.dataset("test").patients) & set(dm.dataset("train").patients + dm.dataset("val").patients)


def test_fingerprint_follows_the_files_not_where_they_lie(cxr3_root, tmp_path):
    root = class_folders(cxr3_root, tmp_path / "a", per_class=2)
    first = FolderDataModule(root=str(root)).fingerprint()
    shutil.copytree(root, tmp_path / "b")
    assert FolderDataModule(root=str(tmp_path / "b")).fingerprint() == first
    (tmp_path / "b" / "normal").rename(tmp_path / "b" / "healthy")  # a class renamed: other labels
    assert FolderDataModule(root=str(tmp_path / "b")).fingerprint() != first
    assert FolderDataModule(root=str(root), classes=["pneumonia", "normal", "COVID-19"]).fingerprint() != first
    f = next((root / "normal").iterdir())
    f.write_bytes(f.read_bytes() + b"\0")
    assert FolderDataModule(root=str(root)).fingerprint() != first


def test_config_takes_its_classes_from_the_folders(cxr3_root, tmp_path):
    root = class_folders(cxr3_root, tmp_path / "set", per_class=2)
    validate(make_cfg(["data=folder", f"data.root={root}", "attack.target=COVID-19"], tmp_path))
    with pytest.raises(ConfigError, match=r"attack.target='flu'"):
        validate(make_cfg(["data=folder", f"data.root={root}", "attack.target=flu"], tmp_path))
    with pytest.raises(ConfigError, match="data.root is not set"):
        validate(make_cfg(["data=folder"], tmp_path))


def test_cli_run_on_a_class_folder_set_with_a_dicom_among_the_pngs(cxr3_root, tmp_path):
    from test_dicom import png_to_dicom

    root = class_folders(cxr3_root, tmp_path / "set", per_class=6)
    png = next((root / "normal").glob("*.png"))
    png_to_dicom(png, png.with_suffix(".dcm"), bits=12)
    png.unlink()
    run_cli(["data=folder", f"data.root={root}", "data.image_size=32", "data.val_fraction=0", "data.num_workers=0",
             "data.test_fraction=0.3", "model=tiny", "trainer=fast", "trainer.max_epochs=1", "attack.max_iter=1"],
            tmp_path / "store", timeout=300)
    run = mlflow_runs(tmp_path / "store").iloc[0]
    assert run["status"] == "FINISHED" and run["tags.choice.data"] == "folder"
    assert run["metrics.train_n"] == 12 and run["metrics.test_n"] == 6
    assert 0 <= run["metrics.test_fr"] <= 1 and 0 <= run["metrics.test_acc"] <= 1
