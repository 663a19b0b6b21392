"""DICOM images: .dcm files made from cxr3's PNGs load to the PNG's pixels (bit depths, MONOCHROME1, rescale,
windows), a compressed file without a decoder, a multi-frame or colour file is refused naming it, and a
COVIDx-format folder of .dcm files trains and evaluates like one of PNGs."""
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import mlflow_runs, run_cli
from PIL import Image

from pipeline.data import CovidxDataModule, load_image, read_dicom
from pipeline.errors import ConfigError, DataError

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

CLASSES = ("normal", "pneumonia", "COVID-19")


def write_dicom(path: Path, stored: np.ndarray, bits: int = 16, photometric: str = "MONOCHROME2",
                signed: bool = False, syntax=ExplicitVRLittleEndian, pixel_data: bytes | None = None, **elements):
    """A DICOM file holding `stored` (rows, columns) as its stored values, BitsAllocated 16; `elements` set as
    they are (RescaleSlope=..., WindowCenter=...)."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, int(signed)
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = pixel_data if pixel_data is not None else \
        np.asarray(stored).astype(np.int16 if signed else np.uint16).tobytes()
    if pixel_data is not None:
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def png_to_dicom(png: Path, out: Path, bits: int = 16, photometric: str = "MONOCHROME2", signed: bool = False,
                 slope: float | None = None, intercept: float = 0.0, exact_window: bool = False, **elements) -> Path:
    """The 8-bit PNG as a DICOM file of `bits` stored bits, its grey levels spread over the stored range
    (inverted for MONOCHROME1); with a rescale slope / intercept, and a window mapped exactly onto the range."""
    v = np.asarray(Image.open(png).convert("L")).astype(np.float64)
    top = 2 ** bits - 1
    stored = np.round(v * top / 255)
    if photometric == "MONOCHROME1":
        stored = top - stored
    if signed:
        stored -= 2 ** (bits - 1)
    if slope is not None:
        elements.update(RescaleSlope=slope, RescaleIntercept=intercept)
    if exact_window:  # LINEAR: lo -> 0 and hi -> 1 for width - 1 = hi - lo, center - 0.5 = (lo + hi) / 2
        lo = -(2 ** (bits - 1)) if signed else 0
        lo, hi = (lo * (slope or 1) + intercept, (lo + top) * (slope or 1) + intercept)
        elements.update(WindowCenter=(lo + hi) / 2 + 0.5, WindowWidth=hi - lo + 1)
    return write_dicom(out, stored, bits, photometric, signed, **elements)


def cxr3_rows(cxr3: Path, split: str, per_class: int) -> list[list[str]]:
    """The first `per_class` lines of each class in cxr3's label file `split`.txt, split into fields."""
    rows = [line.split() for line in (cxr3 / f"{split}.txt").read_text().splitlines() if line.strip()]
    return [r for c in CLASSES for r in [r for r in rows if r[2] == c][:per_class]]


VARIANTS = {
    "16-bit MONOCHROME2": {},
    "12-bit MONOCHROME2": {"bits": 12},
    "12-bit MONOCHROME1": {"bits": 12, "photometric": "MONOCHROME1"},
    "16-bit signed": {"signed": True},
    "12-bit rescaled, exact window": {"bits": 12, "slope": 2.0, "intercept": -1024.0, "exact_window": True},
    "16-bit MONOCHROME1, window": {"photometric": "MONOCHROME1", "exact_window": True},
    "12-bit rescaled, no window": {"bits": 12, "slope": 0.5, "intercept": 100.0},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.realdata
def test_dicom_made_from_a_png_loads_like_the_png(variant, cxr3_root, tmp_path):
    for r in cxr3_rows(cxr3_root, "test", 1):
        png = cxr3_root / "images" / r[1]
        dcm = png_to_dicom(png, tmp_path / f"{png.stem}.DCM", **VARIANTS[variant])  # the suffix in any case
        for crop, size in ((0.0, 256), (1 / 6, 64)):
            ref, out = load_image(png, crop, size), load_image(dcm, crop, size)
            assert out.shape == ref.shape == (size, size) and out.dtype == np.uint8
            assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1, (variant, png.name, crop, size)


def test_a_window_maps_as_specified_the_first_of_several(tmp_path):
    s = np.arange(64 * 64).reshape(64, 64)  # 0 .. 4095, the whole 12-bit range
    c, w = 2048.0, 1024.0
    expect = np.clip((s - (c - 0.5)) / (w - 1) + 0.5, 0, 1)  # DICOM's LINEAR window
    f = write_dicom(tmp_path / "w.dcm", s, 12, WindowCenter=[c, 100.0], WindowWidth=[w, 50.0])
    assert np.allclose(read_dicom(f), expect, atol=1e-9)
    f = write_dicom(tmp_path / "w1.dcm", s, 12, "MONOCHROME1", WindowCenter=c, WindowWidth=w)
    assert np.allclose(read_dicom(f), 1 - expect, atol=1e-9)
    # a VOI LUT: 4096 entries of 8 bits, scaled by its own output depth
    lut = Dataset()
    lut.add_new(0x00283002, "US", [4096, 0, 8])  # LUT Descriptor: entries, first value mapped, bits
    lut.add_new(0x00283006, "US", [i // 16 for i in range(4096)])  # LUT Data
    f = write_dicom(tmp_path / "lut.dcm", s, 12, VOILUTSequence=[lut])
    assert np.allclose(read_dicom(f), (s // 16) / 255, atol=1e-9)
    # no window: the stored bit depth, whatever the values; a negative slope makes the lowest stored value brightest
    f = write_dicom(tmp_path / "dark.dcm", np.full((8, 8), 1023), 12)
    assert np.allclose(read_dicom(f), 1023 / 4095)
    f = write_dicom(tmp_path / "neg.dcm", s, 12, RescaleSlope=-1.0, RescaleIntercept=4095.0)
    assert np.allclose(read_dicom(f), (4095 - s) / 4095)


def test_a_window_or_lut_that_cannot_be_applied_is_an_error_naming_the_file_and_the_step(tmp_path):
    s = np.arange(64).reshape(8, 8)
    f = write_dicom(tmp_path / "w0.dcm", s, 12, WindowCenter=2048.0, WindowWidth=0.0)
    with pytest.raises(DataError, match=rf"DICOM {re.escape(str(f))}: cannot apply the window \(WindowCenter=2048.0, "
                                        r"WindowWidth=0.0, VOILUTFunction=LINEAR\): ValueError: .*Window Width"):
        load_image(f, 0.0, 8)
    f = write_dicom(tmp_path / "exact.dcm", s, 12, WindowCenter=2048.0, WindowWidth=0.0, VOILUTFunction="LINEAR_EXACT")
    with pytest.raises(DataError, match=r"exact.dcm: cannot apply the window \(.*VOILUTFunction=LINEAR_EXACT\)"):
        read_dicom(f)
    assert read_dicom(write_dicom(tmp_path / "half.dcm", s, 12, WindowCenter=2048.0, WindowWidth=0.5,
                                  VOILUTFunction="LINEAR_EXACT")).shape == (8, 8)  # LINEAR_EXACT takes widths < 1
    lut = Dataset()  # a modality LUT of 10 entries holding 2
    lut.add_new(0x00283002, "US", [10, 0, 16])
    lut.add_new(0x00283006, "US", [1, 2])
    lut.add_new(0x00283004, "LO", "HU")
    f = write_dicom(tmp_path / "mlut.dcm", s, 12, ModalityLUTSequence=[lut])
    with pytest.raises(DataError, match=r"mlut.dcm: cannot apply the modality LUT \(ModalityLUTSequence "
                                        r"LUTDescriptor=\[10, 0, 16\]\): IndexError"):
        read_dicom(f)
    f = write_dicom(tmp_path / "flat.dcm", s, 12, RescaleSlope=0.0, RescaleIntercept=5.0)
    with pytest.raises(DataError, match=r"flat.dcm: cannot scale its values: their output range is 5 \.\. 5 "
                                        r"\(RescaleSlope=0.0"):
        read_dicom(f)


def test_presentation_lut_shape_inverse_inverts_once(tmp_path):
    s = np.arange(64 * 64).reshape(64, 64)
    plain = read_dicom(write_dicom(tmp_path / "a.dcm", s, 12))
    assert np.allclose(plain, s / 4095)
    f = write_dicom(tmp_path / "inv.dcm", s, 12, PresentationLUTShape="INVERSE")
    assert np.allclose(read_dicom(f), 1 - plain)
    f = write_dicom(tmp_path / "m1.dcm", s, 12, "MONOCHROME1", PresentationLUTShape="INVERSE")  # as DX files pair them
    assert np.allclose(read_dicom(f), 1 - plain)
    f = write_dicom(tmp_path / "id.dcm", s, 12, PresentationLUTShape="IDENTITY")
    assert np.allclose(read_dicom(f), plain)


def test_compressed_dicom_without_a_decoder_is_refused_naming_the_file_and_the_package(tmp_path):
    f = write_dicom(tmp_path / "jls.dcm", np.zeros((16, 16)), 12, syntax=JPEGLSLossless,
                    pixel_data=encapsulate([b"\xff\xd8\xff\xf7" + bytes(32)]))
    with pytest.raises(DataError) as e:
        load_image(f, 0.0, 16)
    msg = str(e.value)
    assert str(f) in msg and "JPEG-LS" in msg and "pylibjpeg" in msg and "gdcm" in msg and "install" in msg


def test_multiframe_colour_oversized_and_non_dicom_files_are_refused_naming_them(tmp_path):
    f = write_dicom(tmp_path / "frames.dcm", np.zeros((2, 8, 8)), NumberOfFrames=2)
    with pytest.raises(DataError, match=rf"{re.escape(str(f))}.*2 frames"):
        load_image(f, 0.0, 8)
    f = write_dicom(tmp_path / "rgb.dcm", np.zeros((8, 8)), 8, photometric="RGB", SamplesPerPixel=3)
    with pytest.raises(DataError, match=rf"{re.escape(str(f))} is a colour image"):
        load_image(f, 0.0, 8)
    f = write_dicom(tmp_path / "big.dcm", np.zeros((20, 30)), 12)
    with pytest.raises(DataError, match=r"30x20 = 600 pixels, more than data.max_pixels=500"):
        load_image(f, 0.0, 8, max_pixels=500)
    (tmp_path / "fake.dcm").write_bytes(b"not a dicom file" * 20)
    with pytest.raises(DataError, match=r"fake.dcm: not a DICOM file"):
        load_image(tmp_path / "fake.dcm", 0.0, 8)
    with pytest.raises(DataError, match=r"image not found: .*gone.dcm"):
        load_image(tmp_path / "gone.dcm", 0.0, 8)


def test_missing_pydicom_is_a_config_error_naming_the_extra(tmp_path, monkeypatch):
    f = write_dicom(tmp_path / "a.dcm", np.zeros((8, 8)), 12)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # `import pydicom` raises ImportError
    with pytest.raises(ConfigError, match=r"pydicom: pip install -e '\.\[dicom\]'"):
        load_image(f, 0.0, 8)


def covidx_set(cxr3: Path, out: Path, dicom: bool, per_class=(4, 2)) -> Path:
    """A COVIDx-format folder of `per_class` train / test images per class from cxr3's test split, as PNG or
    as 12-bit DICOM (every other one MONOCHROME1) under images/."""
    rows = cxr3_rows(cxr3, "test", sum(per_class))
    (out / "images").mkdir(parents=True)
    lines = {"train": [], "test": []}
    for c in CLASSES:
        mine = [r for r in rows if r[2] == c]
        for split, chosen in (("train", mine[:per_class[0]]), ("test", mine[per_class[0]:])):
            for i, (patient, name, label, source) in enumerate(chosen):
                png = cxr3 / "images" / name
                if dicom:
                    name = Path(name).with_suffix(".dcm").name
                    png_to_dicom(png, out / "images" / name, 12, ("MONOCHROME2", "MONOCHROME1")[i % 2])
                else:
                    shutil.copy(png, out / "images" / name)
                lines[split].append(f"{patient} {name} {label} {source}\n")
    for split, text in lines.items():
        (out / f"{split}.txt").write_text("".join(text))
    return out


@pytest.mark.realdata
def test_covidx_folder_of_dicoms_reads_like_its_pngs_and_is_fingerprinted(cxr3_root, tmp_path):
    pngs, dcms = covidx_set(cxr3_root, tmp_path / "png", False), covidx_set(cxr3_root, tmp_path / "dcm", True)

    def module(root):
        dm = CovidxDataModule(root=str(root), train_dir="images", test_dir="images", image_size=64, val_fraction=0)
        dm.setup()
        return dm

    a, b = module(pngs), module(dcms)
    for split, n in (("train", 12), ("test", 6)):
        x, y = a.dataset(split), b.dataset(split)
        assert len(y) == n and y.labels.tolist() == x.labels.tolist() and y.patients == x.patients
        assert (y.images.int() - x.images.int()).abs().max() <= 1, split
    first = b.fingerprint()
    assert first != a.fingerprint()
    assert CovidxDataModule(root=str(dcms), train_dir="images", test_dir="images").fingerprint() == first
    f = next((dcms / "images").glob("*.dcm"))
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # one pixel's byte
    f.write_bytes(bytes(data))
    assert CovidxDataModule(root=str(dcms), train_dir="images", test_dir="images").fingerprint() != first


@pytest.mark.realdata
def test_cli_evaluate_on_a_covidx_folder_of_dicoms(cxr3_root, tmp_path):
    data = covidx_set(cxr3_root, tmp_path / "hospital", True)
    np.save(tmp_path / "zero.npy", np.zeros((32, 32), np.float32))
    run_cli(["task=evaluate", "data=covidx", f"data.root={data}", "data.train_dir=images", "data.test_dir=images",
             "data.image_size=32", "data.val_fraction=0", "data.num_workers=0", "model=tiny", "trainer=fast",
             "trainer.max_epochs=1", "attack.max_iter=1", f"attack.uap_file={tmp_path / 'zero.npy'}"],
            tmp_path / "store", timeout=300)
    run = mlflow_runs(tmp_path / "store").iloc[0]
    assert run["status"] == "FINISHED" and run["tags.task"] == "evaluate"
    assert run["metrics.train_n"] == 12 and run["metrics.test_n"] == 6
    assert run["metrics.test_fr"] == 0.0 and 0 <= run["metrics.test_acc"] <= 1
