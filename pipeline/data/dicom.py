"""DICOM images (`.dcm`, through pydicom, the `dicom` extra): one grayscale frame to floats in [0, 1], as a viewer
shows it: the modality LUT (rescale slope / intercept), then the VOI LUT or the first window when the file has
one, MONOCHROME1 (or a Presentation LUT Shape of INVERSE) inverted so that bone is bright. A file whose LUTs or
window cannot be applied (a WindowWidth of 0) is a DataError naming it."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from pipeline.data.base import check_pixel_count
from pipeline.errors import ConfigError, DataError

DICOM_SUFFIX = ".dcm"
GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
DECODERS = "pylibjpeg with pylibjpeg-libjpeg and pylibjpeg-openjpeg, or python-gdcm"


def is_dicom(path: Path) -> bool:
    """Whether `path` is read as DICOM: its suffix is .dcm (any case)."""
    return Path(path).suffix.lower() == DICOM_SUFFIX


def read_dicom(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """The image of a single-frame grayscale DICOM file as floats in [0, 1], shape (rows, columns).

    Values pass the modality LUT, then the VOI LUT or the first window (center / width) when present and are
    scaled by the window's output range; without one they are scaled by the stored bit depth (BitsStored, signed
    when PixelRepresentation is 1) carried through the modality LUT. MONOCHROME1, or PresentationLUTShape
    INVERSE, is inverted (1 - x). A file of more than `max_pixels` pixels (Rows x Columns) is refused before its
    pixels are decoded; one whose modality LUT, VOI LUT or window cannot be applied is a DataError naming the
    step and its elements."""
    pydicom = import_pydicom()
    ds = read_header(pydicom, path)
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if max_pixels is not None:
        check_pixel_count(path, cols, rows, max_pixels)
    modality_lut, windowing = lut_functions()
    pixels = decode(ds, path)
    with lut_errors(path, "modality LUT", modality_elements(ds)):
        a = modality_lut(pixels, ds)
        lo, hi = output_range(ds)  # pydicom's windowing maps a window onto lo (below it) .. hi (above it)
    lut = voi_lut_item(ds)
    if lut is not None:
        with lut_errors(path, "VOI LUT", f"LUTDescriptor={lut.get('LUTDescriptor')}"):
            a = apply_voi_lut(a, lut, little_endian(ds))
            lo, hi = 0.0, float(2 ** int(lut.LUTDescriptor[2]) - 1)
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        with lut_errors(path, "window", window_elements(ds)):
            a = windowing(a, ds, index=0)
    else:  # the largest modality value is the brightest, whatever the sign of the slope
        lo, hi = min(lo, hi), max(lo, hi)
    if hi == lo:
        raise DataError(f"DICOM {path}: cannot scale its values: their output range is {lo:g} .. {hi:g} "
                        f"({modality_elements(ds)})")
    x = np.clip((np.asarray(a, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
    return 1.0 - x if inverted(ds) else x


def inverted(ds) -> bool:
    """Whether the lowest value is shown white: MONOCHROME1, or a Presentation LUT Shape of INVERSE (DX files
    pair the two; either inverts the image once)."""
    shape = str(ds.get("PresentationLUTShape") or "").strip().upper()
    return ds.PhotometricInterpretation == "MONOCHROME1" or shape == "INVERSE"


@contextlib.contextmanager
def lut_errors(path: Path, what: str, elements: str):
    """A modality LUT, VOI LUT or window that cannot be applied (a WindowWidth below 1, a LUT shorter than its
    descriptor, a value that is not a number): a DataError naming the file, the step and its elements."""
    try:
        yield
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - pydicom raises ValueError, KeyError, IndexError, TypeError...
        raise DataError(f"DICOM {path}: cannot apply the {what} ({elements}): {type(e).__name__}: {e}") from None


def modality_elements(ds) -> str:
    """The elements the modality LUT and the output range read, as `name=value` for an error."""
    if ds.get("ModalityLUTSequence"):
        return f"ModalityLUTSequence LUTDescriptor={ds.ModalityLUTSequence[0].get('LUTDescriptor')}"
    names = ("RescaleSlope", "RescaleIntercept", "BitsStored", "PixelRepresentation")
    return ", ".join(f"{n}={ds.get(n)}" for n in names)


def window_elements(ds) -> str:
    """The elements of the window, as `name=value` for an error."""
    names = ("WindowCenter", "WindowWidth")
    found = [f"{n}={ds.get(n)}" for n in names]
    return ", ".join(found + [f"VOILUTFunction={ds.get('VOILUTFunction') or 'LINEAR'}"])


def import_pydicom():
    try:
        import pydicom
    except ImportError:
        raise ConfigError("reading .dcm images needs pydicom: pip install -e '.[dicom]' "
                          "(make install installs it)") from None
    return pydicom


def lut_functions():
    """pydicom's apply_modality_lut and apply_windowing (pydicom.pixels from 3.0, pixel_data_handlers before)."""
    try:
        from pydicom.pixels import apply_modality_lut, apply_windowing
    except ImportError:
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_windowing
    return apply_modality_lut, apply_windowing


def read_header(pydicom, path: Path):
    """The dataset of `path`, its pixel data not yet read; a grayscale single-frame image or a DataError."""
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path), defer_size="1 MB")
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except InvalidDicomError:
        raise DataError(f"cannot read DICOM {path}: not a DICOM file (expected the 'DICM' preamble at byte 128; "
                        f"files ending in .dcm are read as DICOM)") from None
    except Exception as e:  # noqa: BLE001 - pydicom raises many kinds on a truncated or malformed file
        raise DataError(f"cannot read DICOM {path}: {type(e).__name__}: {e}") from None
    if "PixelData" not in ds:
        raise DataError(f"DICOM {path} has no pixel data (expected an image, not a report or a structured set)")
    frames = int(ds.get("NumberOfFrames") or 1)
    samples = int(ds.get("SamplesPerPixel") or 1)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if frames != 1:
        raise DataError(f"DICOM {path} has {frames} frames: expected a single-frame image (export one frame)")
    if samples != 1 or photometric not in GRAYSCALE:
        raise DataError(f"DICOM {path} is a colour image ({photometric or 'no PhotometricInterpretation'}, "
                        f"{samples} samples per pixel): expected grayscale, MONOCHROME1 or MONOCHROME2")
    return ds


def decode(ds, path: Path) -> np.ndarray:
    """The stored pixel values; a compressed transfer syntax without an installed decoder is a DataError naming
    the file, the syntax and what to install."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    name = f"{syntax.name} ({syntax})" if syntax else "unknown"
    try:
        return ds.pixel_array
    except (RuntimeError, NotImplementedError) as e:
        detail = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        if syntax is not None and syntax.is_compressed and no_decoder(detail):
            raise DataError(f"cannot decode DICOM {path}: its transfer syntax {name} is compressed and no installed "
                            f"decoder reads it; install {DECODERS} (pydicom: {detail})") from None
        raise DataError(f"cannot decode DICOM {path} (transfer syntax {name}): {detail}") from None
    except Exception as e:  # noqa: BLE001 - pixel data that does not match its header, a broken stream...
        raise DataError(f"cannot decode DICOM {path} (transfer syntax {name}): {type(e).__name__}: {e}") from None


def no_decoder(message: str) -> bool:
    """Whether pydicom's error says that no decoder (plugin, handler) for the syntax is installed."""
    m = message.lower()
    return "missing" in m or "no handler" in m or "no pixel data handler" in m or "not available" in m


def voi_lut_item(ds):
    """The first VOI LUT of the file (it is preferred to a window, as pydicom's apply_voi_lut does), or None."""
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        return seq[0]
    return None


def little_endian(ds) -> bool:
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    return syntax is None or syntax.is_little_endian


def apply_voi_lut(a: np.ndarray, item, little: bool = True) -> np.ndarray:
    """A VOI LUT applied to the modality values: a value below the LUT's first mapped value takes its first entry,
    one past its last entry the last. (pydicom's apply_voi indexes in the LUT's own dtype, which wraps for an
    8-bit LUT of more than 256 entries.)"""
    first = int(item.LUTDescriptor[1])
    data = item.LUTData
    if isinstance(data, bytes):  # VR OW: 16-bit words in the file's byte order
        lut = np.frombuffer(data, dtype="<u2" if little else ">u2")
    else:
        lut = np.atleast_1d(np.asarray(data, dtype=np.int64))
    idx = np.clip(np.floor(a).astype(np.int64) - first, 0, len(lut) - 1)
    return lut[idx].astype(np.float64)


def output_range(ds) -> tuple[float, float]:
    """The range of the modality LUT's output: the stored range (BitsStored bits, signed when
    PixelRepresentation is 1) rescaled by slope and intercept, or 0 .. 2^n - 1 for an n-bit modality LUT. It is
    also the range pydicom's windowing maps a window onto. (lo, hi); lo > hi under a negative slope."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if int(ds.get("PixelRepresentation") or 0) == 1:
        lo, hi = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    else:
        lo, hi = 0.0, 2.0 ** bits - 1
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return lo, hi
