"""Built-in image readers: DICOM (pydicom) first, Pillow last.

Both implement the ``read_image(path, max_size)`` hook and return a float32 greyscale array
``(H, W)`` in [0, 1] with bone bright (MONOCHROME2 convention), or None when the file is not theirs
so that another reader may claim it. A file a reader claims but cannot decode raises
:class:`~cxrtool.errors.ImageReadError` whose message starts with the path.

Intensity conventions (what [0, 1] means):

* 8-bit images (modes ``1``, ``L``, ``P``, ``RGB``, ...) are divided by 255, so absolute grey levels
  are kept and two exports of the same image compare equal.
* 16-bit and 32-bit integer images (``I;16``, ``I``) are min-max scaled per image. Radiographs
  stored in 16 bits use only 10-14 of them (and not from 0), so dividing by 65535 would squeeze the
  image into a dim band of ~[0, 0.06-0.25]; the per-image stretch gives every image the full range.
* Float images (``F``) are kept when already inside [0, 1], otherwise min-max scaled.
* DICOM is always min-max scaled after the modality LUT (rescale slope / intercept), the VOI LUT or
  window (when the file has one) and MONOCHROME1 inversion.
* Colour is reduced to luminance with the ITU-R 601 weights ``0.299 R + 0.587 G + 0.114 B``
  (what Pillow's ``convert("L")`` does, here without rounding to 8 bits).
* An alpha channel is composited on black (``luminance * alpha``): transparent pixels become 0, the
  value of air / the area outside the collimation in a radiograph, instead of whatever colour a
  fully transparent pixel happens to store.

Only numpy and Pillow are imported at module level; pydicom is imported on the first DICOM file.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cxrtool.errors import ImageReadError
from cxrtool.hookspecs import hookimpl

DICOM_SUFFIXES = (".dcm", ".dicom")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# -- shared helpers ------------------------------------------------------------------------------
def _minmax(arr: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] per image; a constant image becomes all zeros. Non-finite values become 0."""
    arr = np.asarray(arr, dtype=np.float64)
    finite = np.isfinite(arr)
    if not finite.all():
        if not finite.any():
            return np.zeros(arr.shape, dtype=np.float32)
        arr = np.where(finite, arr, np.nanmin(np.where(finite, arr, np.nan)))
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3+) -> (H, W) with ITU-R 601 weights, in the input's units."""
    return rgb[..., :3].astype(np.float32) @ _LUMA


def _reduce_factor(shape: tuple[int, int], max_size: int | None) -> int:
    """Largest integer factor that keeps both sides >= max_size (1 when no reduction helps)."""
    if not max_size or max_size <= 0:
        return 1
    return max(1, min(shape) // int(max_size))


def _reduce(arr: np.ndarray, max_size: int | None) -> np.ndarray:
    """Box-average a float image by an integer factor when it is at least twice ``max_size``."""
    factor = _reduce_factor(arr.shape, max_size)
    if factor < 2:
        return arr
    return np.asarray(Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32), "F").reduce(factor))


def _check_file(path: Path) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read: {exc}") from None
    if path.is_dir():
        raise ImageReadError(f"{path}: is a directory, not an image")
    if size == 0:
        raise ImageReadError(f"{path}: empty file")


# -- DICOM ---------------------------------------------------------------------------------------
def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def decode_dicom(path: Path, max_size: int | None = None) -> np.ndarray:
    """Decode a DICOM file to float32 (H, W) in [0, 1], bone bright. Raises ImageReadError."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

    try:
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:  # no preamble / DICM header: try as a raw data set
            ds = pydicom.dcmread(path, force=True)
    except Exception as exc:  # noqa: BLE001 - any parser failure is a bad file, said in one line
        raise ImageReadError(f"{path}: not a readable DICOM file: {type(exc).__name__}: {exc}") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageReadError(f"{path}: DICOM file has no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    try:
        # index=0: only the first frame of a multi-frame file is decoded
        arr = pixel_array(ds, index=0)
        if photometric == "PALETTE COLOR":
            arr = _luminance(apply_color_lut(arr, ds))
        elif arr.ndim == 3:  # colour (pydicom converts YBR to RGB)
            arr = _luminance(arr)
        else:
            arr = apply_modality_lut(arr, ds)
            if "VOILUTSequence" in ds or "WindowCenter" in ds:
                arr = apply_voi_lut(arr, ds, index=0)
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - missing decoder, corrupt / truncated pixel data, bad LUT, ...
        raise ImageReadError(f"{path}: cannot decode DICOM pixel data: {type(exc).__name__}: {exc}") from None
    if arr.ndim != 2:
        raise ImageReadError(f"{path}: unexpected DICOM pixel array shape {arr.shape}")
    img = _minmax(arr)
    if photometric == "MONOCHROME1":  # low values are bright: invert so bone is bright
        img = 1.0 - img
    return _reduce(img, max_size)


@hookimpl(tryfirst=True, specname="read_image")
def read_image_dicom(path, max_size):
    """DICOM reader: claims ``*.dcm`` / ``*.dicom`` and files with the ``DICM`` magic at byte 128."""
    path = Path(os.fspath(path))
    if not _is_dicom(path):
        return None
    _check_file(path)
    return decode_dicom(path, max_size)


# -- Pillow --------------------------------------------------------------------------------------
def _pil_to_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "1":
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    if mode == "L":
        return np.asarray(img, dtype=np.float32) / 255.0
    if mode.startswith("I;16") or mode == "I":
        return _minmax(np.asarray(img))
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0:
            return arr.copy()
        return _minmax(arr)
    if mode == "LA":
        la = np.asarray(img, dtype=np.float32) / 255.0
        return la[..., 0] * la[..., 1]
    if mode == "P" or mode == "PA":
        has_alpha = mode == "PA" or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
        mode = img.mode
    elif mode not in ("RGB", "RGBA"):  # CMYK, YCbCr, LAB, HSV, RGBX, ...
        img = img.convert("RGB")
        mode = "RGB"
    arr = np.asarray(img)
    lum = _luminance(arr) / 255.0
    if mode == "RGBA":
        lum = lum * (arr[..., 3].astype(np.float32) / 255.0)
    return np.clip(lum, 0.0, 1.0, out=lum)


def decode_pillow(path: Path, max_size: int | None = None) -> np.ndarray | None:
    """Decode with Pillow; None if Pillow does not recognise the file. Raises ImageReadError."""
    try:
        img = Image.open(path)
    except UnidentifiedImageError:
        return None
    except Exception as exc:  # noqa: BLE001 - e.g. DecompressionBombError, OSError, SyntaxError
        raise ImageReadError(f"{path}: cannot open: {type(exc).__name__}: {exc}") from None
    with img:
        try:
            if img.format == "JPEG" and img.mode in ("RGB", "L"):
                # decode luminance only and, with a size hint, at 1/2, 1/4 or 1/8 scale in the decoder
                # (both sides stay >= max_size)
                img.draft("L", (int(max_size), int(max_size)) if max_size else None)
            img.load()
            with contextlib.suppress(Exception):  # broken EXIF metadata: keep the pixels as stored
                img = ImageOps.exif_transpose(img)
            arr = _pil_to_array(img)
        except ImageReadError:
            raise
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt data, unsupported variant
            raise ImageReadError(
                f"{path}: cannot decode {img.format} image: {type(exc).__name__}: {exc}"
            ) from None
    if arr.ndim != 2 or arr.size == 0:
        raise ImageReadError(f"{path}: unexpected decoded shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


@hookimpl(trylast=True, specname="read_image")
def read_image_pillow(path, max_size):
    """Pillow reader for PNG / JPEG / TIFF / BMP / ...; None when Pillow cannot identify the file."""
    path = Path(os.fspath(path))
    _check_file(path)
    return decode_pillow(path, max_size)
