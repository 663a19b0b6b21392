"""Data: the phantom set and the COVIDx reader, including every bad input's clear error."""
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import torch
from conftest import make_cfg
from omegaconf import OmegaConf
from PIL import Image

from pipeline.data import CovidxDataModule, PhantomDataModule, data_fingerprint, load_image, patient_split
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
    names = images if images is not None else {line.split()[1] for line in lines_train + lines_test
                                               if len(line.split()) > 1}
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
    return CovidxDataModule(root=str(root), train_dir="images", test_dir="images", image_size=16, val_fraction=0.15,
                            seed=0, **kw)


def test_covidx_reader_parses_maps_classes_and_splits_by_patient(tmp_path):
    write_set(tmp_path, good_lines("p"), good_lines("q", 2, 2))
    dm = dm_for(tmp_path)
    dm.setup()
    tr, va, te = dm.dataset("train"), dm.dataset("val"), dm.dataset("test")
    assert len(tr) + len(va) == 12 and len(te) == 6 and len(va) == 2  # one patient of 6
    assert te.labels.tolist() == [0, 0, 1, 1, 2, 2]  # COVIDx order normal, pneumonia, COVID-19
    assert set(tr.patients).isdisjoint(va.patients) and len(va) > 0
    assert tr.images.shape[1:] == (1, 16, 16) and tr.images.dtype == torch.uint8


def test_balanced_class_weights_are_inverse_class_frequencies_of_train(tmp_path):
    # train: 6 normal, 2 pneumonia, 4 COVID-19 (12 images, 3 classes): weights 12 / (3 x count)
    lines = good_lines("p", 6)[:6] + good_lines("p", 2)[2:4] + good_lines("p", 4)[8:]
    write_set(tmp_path, lines, good_lines("q", 2, 2))
    dm = CovidxDataModule(root=str(tmp_path), train_dir="images", test_dir="images", image_size=16, val_fraction=0,
                          seed=0, class_weights="balanced")
    assert len(dm.dataset("train")) == 12 and len(dm.dataset("val")) == 0  # val_fraction=0: every image trains
    assert torch.allclose(dm.class_weights(), torch.tensor([12 / 18, 12 / 6, 12 / 12]))
    assert dm_for(tmp_path).class_weights() is None  # the default: plain cross-entropy
    with pytest.raises(ConfigError, match="data.class_weights='inverse'"):
        dm_for(tmp_path, class_weights="inverse")


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
    ("root_is_a_file", "is not a folder"),
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
    ("symlink_loop", "train.txt:1: cannot"),  # the OS refuses the path (ELOOP)
    ("not_utf8", "train.txt:2: not UTF-8 text (byte 0xe9 at column 2)"),
    ("same_image_twice", "train.txt:13: duplicate filename './p_normal_0.png' (first on line 1)"),
    ("same_image_by_a_link", "train.txt:13: 'link.png' is the same image as 'p_normal_0.png' on line 1"),
    ("label_file_is_a_folder", "label file not found"),
])
def test_bad_input_gives_one_clear_error(tmp_path, case, expect):
    train, test = good_lines("p"), good_lines("q", 2, 2)
    root = tmp_path / "set"
    write_set(root, train, test)
    if case == "missing_root":
        root = tmp_path / "nope"
    elif case == "root_is_a_file":
        root = root / "train.txt"
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
        (root / "test.txt").write_text("\n".join(line for line in test if " pneumonia " not in line))
    elif case == "symlink_loop":
        (root / "images" / "p_normal_0.png").unlink()
        (root / "images" / "p_normal_0.png").symlink_to("p_normal_0.png")
    elif case == "not_utf8":  # Latin-1: 'é' is one byte, not UTF-8
        (root / "train.txt").write_bytes("\n".join([train[0], "p\xe9 p_normal_1.png normal src", *train[2:]])
                                         .encode("latin-1"))
    elif case == "same_image_twice":
        (root / "train.txt").write_text("\n".join([*train, "p9 ./p_normal_0.png normal src"]))
    elif case == "same_image_by_a_link":
        (root / "images" / "link.png").symlink_to("p_normal_0.png")
        (root / "train.txt").write_text("\n".join([*train, "p9 link.png normal src"]))
    elif case == "label_file_is_a_folder":
        (root / "train.txt").unlink()
        (root / "train.txt").mkdir()
    dm = dm_for(root)
    with pytest.raises(DataError) as err:
        dm.fingerprint()  # taken before the run opens: the same clear error, or none, never a traceback
        dm.setup()
    msg = str(err.value)
    assert expect in msg
    if case in ("missing_image", "not_an_image", "truncated"):
        assert "q_pneumonia_1.png" in msg
    if case == "symlink_loop":  # reading the images, as setup does, says the same
        assert "p_normal_0.png" in msg and "symbolic links" in msg
        with pytest.raises(DataError, match="train.txt:1: cannot resolve 'p_normal_0.png'"):
            dm_for(root).setup()


def test_unset_root_is_a_config_error():
    with pytest.raises(ConfigError, match="data.root is not set"):
        CovidxDataModule(root="???")


# --------------------------------------------------------------------------- image depth and size

def save16(path: Path, a: np.ndarray) -> None:
    im = Image.fromarray(a.astype(np.uint16))
    assert im.mode == "I;16"
    im.save(path)


def test_16_and_12_bit_pngs_load_like_their_8_bit_original(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (60, 50)).astype(np.uint16)
    Image.fromarray(x.astype(np.uint8)).save(tmp_path / "a8.png")
    save16(tmp_path / "a16.png", x * 257)
    save16(tmp_path / "a12.png", x * 16 + x // 16)
    ref = load_image(tmp_path / "a8.png", 1 / 6, 24)
    # the 8-bit path is today's: convert("L"), crop, bilinear resize
    with Image.open(tmp_path / "a8.png") as im:
        old = np.asarray(im.convert("L").crop((0, 10, 50, 60)).resize((24, 24), Image.BILINEAR))
    assert np.array_equal(ref, old)
    for name in ("a16.png", "a12.png"):
        out = load_image(tmp_path / name, 1 / 6, 24)
        diff = np.abs(out.astype(int) - ref)
        assert diff.max() <= 1 and diff.mean() < 0.5, name


def test_float_image_is_scaled_by_its_range(tmp_path):
    Image.fromarray(np.linspace(-3, 5, 40 * 30, dtype=np.float32).reshape(40, 30)).save(tmp_path / "f.tif")
    out = load_image(tmp_path / "f.tif", 0.0, 30)
    assert out.min() <= 2 and out.max() >= 253


def test_16_bit_copy_of_a_cxr3_image_loads_like_the_original(tmp_path, cxr3_root):
    src = sorted((cxr3_root / "images").glob("*.png"))[0]
    with Image.open(src) as im:
        x = np.asarray(im.convert("L")).astype(np.uint16)
    save16(tmp_path / "c16.png", x * 257)
    ref, out = load_image(src, 1 / 6, 128), load_image(tmp_path / "c16.png", 1 / 6, 128)
    assert abs(float(out.mean()) - float(ref.mean())) < 0.5


def test_an_image_over_max_pixels_is_refused_from_its_header(tmp_path):
    write_set(tmp_path, good_lines("p"), good_lines("q", 2, 2))  # 60 x 40 images
    name = tmp_path / "images" / "p_normal_0.png"
    data = name.read_bytes()
    name.write_bytes(data[: len(data) // 2])  # truncated: decoding it would fail otherwise
    with pytest.raises(DataError) as err:
        dm_for(tmp_path, max_pixels=1000).setup()
    msg = str(err.value)
    assert "p_normal_0.png" in msg and "60x40" in msg and "data.max_pixels=1_000" in msg
    with pytest.raises(ConfigError, match="data.max_pixels=0"):
        dm_for(tmp_path, max_pixels=0)


def test_pil_decompression_bomb_names_the_file_and_its_warning_is_silenced(tmp_path, monkeypatch):
    write_set(tmp_path, good_lines("p"), good_lines("q", 2, 2))  # 2400 pixels each
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # PIL warns above 2000, fails above 4000
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        dm_for(tmp_path).setup()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match=r"images/p_normal_0\.png is too large for PIL"):
        dm_for(tmp_path).setup()


def test_image_size_above_1024_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data.image_size=2048: expected an integer in \[8, 1024\]"):
        PhantomDataModule(image_size=2048)
    PhantomDataModule(image_size=1024)


def test_a_set_that_does_not_fit_in_memory_is_refused_before_reading(tmp_path, monkeypatch):
    write_set(tmp_path, good_lines("p"), good_lines("q", 2, 2))
    (tmp_path / "images" / "p_normal_0.png").write_text("not read")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=2 ** 20))  # 1 MiB
    with pytest.raises(ConfigError) as err:
        CovidxDataModule(root=str(tmp_path), train_dir="images", test_dir="images", image_size=1024).setup()
    assert "data.image_size=1024: 18 images need about 0.2 GiB" in str(err.value)
    assert "only 0.0 GiB is available" in str(err.value)
    dm_for(tmp_path).check_memory(18)  # 16 px: 60 KB, fits


# --------------------------------------------------------------------------- label files

def test_a_utf8_bom_in_a_label_file_is_ignored(tmp_path):
    write_set(tmp_path, good_lines("p"), good_lines("q", 2, 2))
    (tmp_path / "train.txt").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "train.txt").read_bytes())
    train, test = dm_for(tmp_path).load_splits()
    assert train.patients[0] == "pnormal0" and len(train) == 12


def test_an_image_in_both_train_and_test_is_warned(tmp_path, caplog):
    train, test = good_lines("p"), good_lines("q", 2, 2)
    test[0] = "other " + train[0].split(" ", 1)[1]  # another patient id, the same file
    write_set(tmp_path, train, test)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        dm_for(tmp_path).setup()
    assert "1 images appear in both train and test (e.g. ['images/p_normal_0.png'])" in caplog.text


# --------------------------------------------------------------------------- fingerprint

def test_fingerprint_follows_the_labels_and_the_image_contents(tmp_path):
    root = tmp_path / "set"
    write_set(root, good_lines("p"), good_lines("q", 2, 2))
    fp = lambda path=root: dm_for(path).fingerprint()  # noqa: E731 - a fresh module: fingerprints are memoized
    dm = dm_for(root)
    first = dm.fingerprint()
    assert len(first) == 16 and int(first, 16) >= 0 and not dm.sets  # no setup() needed
    assert fp() == first
    # an identical copy elsewhere, with new mtimes (a fresh copy, a download): the same data
    shutil.copytree(root, tmp_path / "copy", copy_function=shutil.copyfile)
    assert fp(tmp_path / "copy") == first
    # one label changed
    train = (root / "train.txt").read_text()
    (root / "train.txt").write_text(train.replace("p_normal_0.png normal", "p_normal_0.png pneumonia"))
    assert fp() != first and dm.fingerprint() == first
    (root / "train.txt").write_text(train)
    assert fp() == first
    # an image touched to another mtime: the same bytes
    img = root / "images" / "q_COVID-19_1.png"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert fp() == first
    # an image rewritten with other pixels, and one byte flipped at the same size and mtime
    Image.fromarray(np.zeros((40, 60), np.uint8)).save(img)
    assert fp() != first
    shutil.copyfile(tmp_path / "copy" / "images" / img.name, img)
    assert fp() == first
    st, data = img.stat(), bytearray(img.read_bytes())
    data[-5] ^= 1
    img.write_bytes(bytes(data))
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fp() != first


def test_fingerprint_memo_is_keyed_by_the_listing(tmp_path):
    """The memo spares reading unchanged files again; a fresh copy or an edited file is read and hashed anew."""
    root, memo = tmp_path / "set", tmp_path / "cache" / "data_fingerprints.json"
    write_set(root, good_lines("p"), good_lines("q", 2, 2))
    first = dm_for(root).fingerprint(memo)
    assert list(json.loads(memo.read_text()).values()) == [first]
    # a memo entry is used as it stands for the same listing (here one planted to show it is read)...
    key = next(iter(json.loads(memo.read_text())))
    memo.write_text(json.dumps({key: "0" * 16}))
    assert dm_for(root).fingerprint(memo) == "0" * 16
    # ...and any change to the listing (an image rewritten) is hashed again, and remembered beside it
    Image.fromarray(np.full((40, 60), 7, np.uint8)).save(root / "images" / "q_COVID-19_1.png")
    second = dm_for(root).fingerprint(memo)
    assert second not in (first, "0" * 16) and second == dm_for(root).fingerprint()
    assert sorted(json.loads(memo.read_text()).values()) == sorted(["0" * 16, second])
    memo.write_text("not json")  # an unreadable memo costs time, never the fingerprint
    assert dm_for(root).fingerprint(memo) == second


def test_fingerprint_of_the_phantom_is_its_parameters_and_of_a_config():
    a = PhantomDataModule(image_size=32, n_train=60, n_test=30, seed=0)
    assert a.fingerprint() == PhantomDataModule(image_size=32, n_train=60, n_test=30, seed=0).fingerprint()
    for kw in ({"seed": 1}, {"image_size": 48}, {"noise": 0.05}, {"finding_strength": 0.5}, {"n_test": 33}):
        assert PhantomDataModule(**{"image_size": 32, "n_train": 60, "n_test": 30, "seed": 0, **kw}).fingerprint() \
            != a.fingerprint(), kw
    cfg = make_cfg(["data=phantom", "seed=3"]).data
    assert data_fingerprint(cfg) == PhantomDataModule(**{k: v for k, v in cfg.items() if k != "_target_"}).fingerprint()


def test_data_fingerprint_of_a_covidx_config(tmp_path):
    write_set(tmp_path, good_lines("p"), good_lines("q", 2, 2))
    cfg = OmegaConf.create({"_target_": "pipeline.data.CovidxDataModule", "root": str(tmp_path),
                            "train_dir": "images", "test_dir": "images"})
    assert data_fingerprint(cfg) == dm_for(tmp_path).fingerprint()


def test_fingerprint_of_cxr3_is_fast(cxr3_root):
    t = time.perf_counter()
    fp = data_fingerprint(make_cfg(["data=cxr3", f"data.root={cxr3_root}"]).data)
    dt = time.perf_counter() - t
    print(f"cxr3 fingerprint {fp} in {dt:.3f} s")
    assert dt < 1


@pytest.mark.parametrize("val_fraction, expect", [
    (0.5, "none of class"),  # whole patients go to validation: here every normal one
    (0.95, "0 of the 12 training images for training: expected at least 2"),
])
def test_a_validation_split_that_empties_training_or_a_class_is_refused(tmp_path, val_fraction, expect):
    write_set(tmp_path, good_lines("p"), good_lines("q", 2, 2))
    dm = CovidxDataModule(root=str(tmp_path), train_dir="images", test_dir="images", image_size=16,
                          val_fraction=val_fraction, seed=0)
    with pytest.raises(DataError, match=f"data.val_fraction={val_fraction:g} leaves .*{expect}"):
        dm.setup()


def test_num_workers_below_zero_is_a_config_error():
    with pytest.raises(ConfigError, match="data.num_workers=-1: expected an integer >= 0"):
        phantom(0, num_workers=-1)


@pytest.mark.parametrize("n_train, drops", [(33, True), (34, False), (32, False)])
def test_a_last_training_batch_of_one_image_is_dropped(n_train, drops):
    """BatchNorm cannot train on a batch of one image: 33 images at batch 32 drop the 33rd (a different one each
    epoch); other remainders keep every image."""
    dm = PhantomDataModule(image_size=16, n_train=n_train, n_test=6, val_fraction=0.0, batch_size=32)
    sizes = [len(y) for _, y in dm.train_dataloader()]
    assert sizes == ([32] if drops else [32] * (n_train // 32) + ([n_train % 32] if n_train % 32 else []))


def test_exif_orientation_is_applied_before_the_top_crop(tmp_path):
    """A JPEG stored on its side with an EXIF orientation tag is turned upright first, so the crop removes its
    top rows (here a bright band) and not a side."""
    upright = np.full((120, 90), 40, np.uint8)
    upright[:20] = 250  # the top sixth
    stored = np.ascontiguousarray(np.rot90(upright, -1))  # rotated 90 degrees clockwise: the band is on the right
    exif = Image.Exif()
    exif[0x0112] = 8  # orientation: rotate 90 degrees counter-clockwise to view
    Image.fromarray(stored).save(tmp_path / "side.jpg", quality=95, exif=exif)
    out = load_image(tmp_path / "side.jpg", 1 / 6, 30)
    assert out.max() < 90, out.max()  # the band was cropped away
    Image.fromarray(stored).save(tmp_path / "plain.jpg", quality=95)  # the same pixels without the tag
    assert load_image(tmp_path / "plain.jpg", 1 / 6, 30)[:, -3:].min() > 200  # the band stays, on the side
