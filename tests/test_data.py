"""Data: the phantom set and the COVIDx reader, including every bad input's clear error."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import CovidxDataModule, PhantomDataModule, load_image, patient_split
from pipeline.errors import ConfigError, DataError

CLASSES = ["normal", "pneumonia", "COVID-19"]


def phantom(seed, **kw):
    dm = PhantomDataModule(image_size=32, n_train=60, n_test=30, seed=seed, **kw)
    dm.setup()
    return dm


def test_phantom_is_deterministic_under_seed_and_balanced():
    a, b, c = phantom(1), phantom(1), phantom(2)
    for split in ("train", "val", "test"):
        assert torch.equal(a.dataset(split).images, b.dataset(split).images)
        assert torch.equal(a.dataset(split).labels, b.dataset(split).labels)
    assert not torch.equal(a.dataset("test").images, c.dataset("test").images)
    counts = np.bincount(a.dataset("test").labels.numpy(), minlength=3)
    assert counts.tolist() == [10, 10, 10]
    x, y = a.dataset("train")[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grayscale replicated


def test_phantom_classes_differ_in_the_lungs_not_in_trivial_statistics():
    dm = PhantomDataModule(image_size=48, n_train=300, n_test=30, seed=0)
    dm.setup()
    x, y = dm.dataset("train").tensors()
    # the global brightness of one image does not give its class away: class means overlap heavily
    m = x.mean(dim=(1, 2, 3))
    per_class = [m[y == c] for c in range(3)]
    spread = max(float(p.std()) for p in per_class)
    gap = max(float(p.mean()) for p in per_class) - min(float(p.mean()) for p in per_class)
    assert gap < 2 * spread


def write_set(root: Path, lines_train, lines_test, images=None, size=(40, 60), img_dir="images"):
    (root / img_dir).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = images if images is not None else {l.split()[1] for l in lines_train + lines_test if len(l.split()) > 1}
    for name in names:
        Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(root / img_dir / name)
    (root / "train.txt").write_text("\n".join(lines_train) + "\n")
    (root / "test.txt").write_text("\n".join(lines_test) + "\n")


def good_lines(prefix, n_per_class=4, patients_per_class=2):
    out = []
    for c in CLASSES:
        for i in range(n_per_class):
            out.append(f"{prefix}{c}{i % patients_per_class} {prefix}_{c}_{i}.png {c} src")
    return out


def dm_for(root, **kw):
    return CovidxDataModule(root=str(root), train_dir="images", test_dir="images", image_size=16, val_fraction=0.3, seed=0, **kw)


def test_covidx_reader_parses_maps_classes_and_splits_by_patient(tmp_path):
    write_set(tmp_path, good_lines("p"), good_lines("q", 2, 2))
    dm = dm_for(tmp_path)
    dm.setup()
    tr, va, te = dm.dataset("train"), dm.dataset("val"), dm.dataset("test")
    assert len(tr) + len(va) == 12 and len(te) == 6
    assert te.labels.tolist() == [0, 0, 1, 1, 2, 2]  # COVIDx order normal, pneumonia, COVID-19
    assert set(tr.patients).isdisjoint(va.patients) and len(va) > 0
    assert tr.images.shape[1:] == (1, 16, 16) and tr.images.dtype == torch.uint8


def test_patient_split_keeps_patients_whole():
    patients = ["a", "a", "b", "c", "c", "c", "d", "e"]
    tr, va = patient_split(patients, 0.4, seed=3)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(8))
    assert {patients[i] for i in tr}.isdisjoint({patients[i] for i in va})


def test_preprocessing_crops_the_top_sixth_and_resizes(tmp_path):
    img = np.zeros((60, 30), dtype=np.uint8)
    img[:10] = 255   # the top 1/6 of the rows is white, the rest black
    Image.fromarray(img).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png", 1 / 6, 20)
    assert out.shape == (20, 20) and out.max() == 0
    assert load_image(tmp_path / "a.png", 0.0, 20)[0].min() == 255


@pytest.mark.parametrize("case, expect", [
    ("missing_root", "data.root not found"),
    ("missing_label", "label file not found"),
    ("empty_label", "label file is empty"),
    ("fields", "train.txt:2: expected 4 space-separated fields"),
    ("unknown_class", "train.txt:3: unknown class 'covid'"),
    ("duplicate", "duplicate filename"),
    ("escape", "must be a relative path inside the image folder"),
    ("absolute", "must be a relative path inside the image folder"),
    ("missing_image", "image not found"),
    ("not_an_image", "cannot read image"),
    ("truncated", "cannot read image"),
    ("class_absent", "no image of class ['pneumonia'] in the test split"),
])
def test_bad_input_gives_one_clear_error(tmp_path, case, expect):
    train, test = good_lines("p"), good_lines("q", 2, 2)
    root = tmp_path / "set"
    write_set(root, train, test)
    if case == "missing_root":
        root = tmp_path / "nope"
    elif case == "missing_label":
        (root / "test.txt").unlink()
    elif case == "empty_label":
        (root / "train.txt").write_text("\n\n")
    elif case == "fields":
        (root / "train.txt").write_text("\n".join([train[0], "p1 x.png normal", *train[1:]]))
    elif case == "unknown_class":
        (root / "train.txt").write_text("\n".join([*train[:2], "p9 p_normal_0.png covid src", *train[2:]]))
    elif case == "duplicate":
        (root / "train.txt").write_text("\n".join([*train, train[0]]))
    elif case == "escape":
        (root / "train.txt").write_text("\n".join([*train, "p9 ../secret.png normal src"]))
    elif case == "absolute":
        (root / "train.txt").write_text("\n".join([*train, "p9 /etc/passwd normal src"]))
    elif case == "missing_image":
        (root / "images" / "q_pneumonia_1.png").unlink()
    elif case == "not_an_image":
        (root / "images" / "q_pneumonia_1.png").write_text("hello")
    elif case == "truncated":
        data = (root / "images" / "q_pneumonia_1.png").read_bytes()
        (root / "images" / "q_pneumonia_1.png").write_bytes(data[: len(data) // 2])
    elif case == "class_absent":
        (root / "test.txt").write_text("\n".join(l for l in test if " pneumonia " not in l))
    with pytest.raises(DataError) as err:
        dm_for(root).setup()
    msg = str(err.value)
    assert expect in msg
    if case in ("missing_image", "not_an_image", "truncated"):
        assert "q_pneumonia_1.png" in msg


def test_unset_root_is_a_config_error():
    with pytest.raises(ConfigError, match="data.root is not set"):
        CovidxDataModule(root="???")
