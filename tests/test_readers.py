"""The built-in image readers (plugins/cxrtool_builtin/readers.py), directly and through the hook."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrtool import plugins
from cxrtool.errors import ImageReadError
from cxrtool_builtin import readers


@pytest.fixture
def read(monkeypatch):
    """``read_image_hook`` with only the readers plugin loaded (others may be work in progress)."""
    monkeypatch.setenv("CXRTOOL_LOAD_PLUGINS", "readers")
    monkeypatch.delenv("CXRTOOL_PLUGINS_DIR", raising=False)
    plugins.reset_manager()
    assert plugins.get_manager().info["readers"].ok
    yield plugins.read_image_hook
    plugins.reset_manager()


def _check(arr: np.ndarray, shape: tuple[int, int]) -> None:
    assert isinstance(arr, np.ndarray)
    assert arr.dtype == np.float32
    assert arr.shape == shape
    assert np.isfinite(arr).all()
    assert arr.min() >= 0.0 and arr.max() <= 1.0


def _gradient(h: int = 48, w: int = 64) -> np.ndarray:
    """uint8 (H, W): horizontal ramp 0..255 plus a bright square (so orientation is visible)."""
    img = np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1))
    img[4:12, 4:12] = 255
    return img


# -- Pillow formats ------------------------------------------------------------------------------
def test_png_8bit_is_divided_by_255(tmp_path, read):
    arr = _gradient()
    arr[0, 0], arr[0, 1] = 10, 200  # no min-max stretch for 8-bit: absolute values are kept
    arr[:, -1] = 200
    arr[0, -1] = 10
    path = tmp_path / "a.png"
    Image.fromarray(arr).save(path)
    for out in (readers.decode_pillow(path), read(path, None), read(str(path), None)):
        _check(out, arr.shape)
        np.testing.assert_allclose(out, arr / 255.0, atol=1e-6)


def test_png_16bit_is_min_max_scaled(tmp_path, read):
    raw = np.linspace(1000, 4095, 50 * 60).reshape(50, 60).astype(np.uint16)  # a 12-bit image
    img = Image.fromarray(raw)
    assert img.mode == "I;16"
    path = tmp_path / "b16.png"
    img.save(path)
    assert Image.open(path).mode == "I;16"
    out = read(path, None)
    _check(out, raw.shape)
    assert out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(out, (raw - 1000.0) / 3095.0, atol=1e-6)


def test_rgb_jpeg_gives_luminance(tmp_path, read):
    h, w = 64, 80
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, : w // 2] = (200, 40, 10)
    rgb[:, w // 2 :] = (10, 120, 240)
    path = tmp_path / "c.jpg"
    Image.fromarray(rgb).save(path, quality=95)
    out = read(path, None)
    _check(out, (h, w))
    left = (0.299 * 200 + 0.587 * 40 + 0.114 * 10) / 255
    right = (0.299 * 10 + 0.587 * 120 + 0.114 * 240) / 255
    assert abs(float(np.median(out[:, : w // 2 - 4])) - left) < 0.02
    assert abs(float(np.median(out[:, w // 2 + 4 :])) - right) < 0.02


def test_rgb_png_matches_pillow_l(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    path = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(path)
    out = readers.decode_pillow(path)
    pil_l = np.asarray(Image.fromarray(rgb).convert("L"), np.float32) / 255
    _check(out, (32, 40))
    assert np.abs(out - pil_l).max() <= 1.0 / 255 + 1e-6  # same weights, without the rounding


def test_rgba_png_is_composited_on_black(tmp_path, read):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, :10, 3] = 255
    rgba[:, 10:20, 3] = 0
    rgba[:, 20:, 3] = 128
    path = tmp_path / "d.png"
    Image.fromarray(rgba, "RGBA").save(path)
    out = read(path, None)
    _check(out, (20, 30))
    np.testing.assert_allclose(out[:, :10], 200 / 255, atol=1e-5)
    np.testing.assert_allclose(out[:, 10:20], 0.0, atol=1e-6)
    np.testing.assert_allclose(out[:, 20:], 200 / 255 * 128 / 255, atol=1e-5)


def test_la_png_is_composited_on_black(tmp_path):
    la = np.stack([np.full((8, 8), 100, np.uint8), np.full((8, 8), 51, np.uint8)], axis=-1)
    path = tmp_path / "la.png"
    Image.fromarray(la, "LA").save(path)
    np.testing.assert_allclose(readers.decode_pillow(path), 100 / 255 * 51 / 255, atol=1e-6)


@pytest.mark.parametrize("mode", ["1", "P"])
def test_bilevel_and_palette(tmp_path, mode):
    arr = _gradient()
    img = Image.fromarray(arr).convert(mode)
    path = tmp_path / f"m{mode}.png"
    img.save(path)
    out = readers.decode_pillow(path)
    _check(out, arr.shape)
    expected = np.asarray(img.convert("L"), np.float32) / 255
    np.testing.assert_allclose(out, expected, atol=1.0 / 255 + 1e-6)


def test_tiff_8bit_16bit_and_float(tmp_path, read):
    arr = _gradient()
    Image.fromarray(arr).save(tmp_path / "a.tif")
    np.testing.assert_allclose(read(tmp_path / "a.tif", None), arr / 255, atol=1e-6)

    raw16 = (arr.astype(np.uint16) * 4 + 100).astype(np.uint16)
    Image.fromarray(raw16).save(tmp_path / "b.tif")
    out16 = read(tmp_path / "b.tif", None)
    _check(out16, arr.shape)
    np.testing.assert_allclose(out16, (raw16 - raw16.min()) / float(raw16.max() - raw16.min()), atol=1e-6)

    f_in_range = (arr / 255.0 * 0.5).astype(np.float32)  # already in [0, 1]: kept as is
    Image.fromarray(f_in_range, "F").save(tmp_path / "c.tif")
    np.testing.assert_allclose(read(tmp_path / "c.tif", None), f_in_range, atol=1e-7)

    f_out_of_range = arr.astype(np.float32) * 10 - 300  # not in [0, 1]: min-max scaled
    Image.fromarray(f_out_of_range, "F").save(tmp_path / "d.tif")
    np.testing.assert_allclose(read(tmp_path / "d.tif", None), arr / 255.0, atol=1e-6)


def test_int32_png_is_min_max_scaled(tmp_path):
    raw = np.arange(-500, 1500, 2, dtype=np.int32).reshape(25, 40)
    img = Image.fromarray(raw, "I")
    path = tmp_path / "i.tif"
    img.save(path)
    out = readers.decode_pillow(path)
    np.testing.assert_allclose(out, (raw + 500) / 1998.0, atol=1e-6)


def test_bmp(tmp_path, read):
    arr = _gradient()
    Image.fromarray(arr).save(tmp_path / "a.bmp")
    np.testing.assert_allclose(read(tmp_path / "a.bmp", None), arr / 255, atol=1e-6)


def test_constant_16bit_image_is_zeros_not_nan(tmp_path):
    Image.fromarray(np.full((10, 10), 777, np.uint16)).save(tmp_path / "flat.png")
    out = readers.decode_pillow(tmp_path / "flat.png")
    _check(out, (10, 10))
    assert (out == 0).all()


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied(tmp_path, read, suffix):
    arr = _gradient(48, 64)  # bright square near the top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / f"rot{suffix}"
    Image.fromarray(arr).save(path, exif=exif)
    out = read(path, None)
    _check(out, (64, 48))
    # after a 90-degree clockwise turn the top-left square sits at the top-right
    assert out[4:12, -12:-4].mean() > 0.9
    assert out[4:12, 4:12].mean() < 0.5


def test_jpeg_draft_decodes_at_reduced_scale(tmp_path, read):
    h, w = 600, 800
    yy, xx = np.mgrid[0:h, 0:w]
    arr = (127 + 100 * np.sin(xx / 40.0) * np.cos(yy / 55.0)).astype(np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(arr).convert("RGB").save(path, quality=95)
    full = read(path, None)
    small = read(path, 200)
    _check(full, (h, w))
    assert small.shape == (300, 400)  # 1/2 scale: the largest DCT reduction keeping both sides >= 200
    assert min(small.shape) >= 200
    ref = np.asarray(Image.fromarray(full, "F").resize(small.shape[::-1], Image.BOX))
    assert np.abs(small - ref).mean() < 0.01


# -- DICOM ---------------------------------------------------------------------------------------
def _write_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    preamble: bool = True,
) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    frames = pixels[None] if pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] == 3) else pixels
    if pixels.ndim == 3 and pixels.shape[-1] != 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = frames.shape[1], frames.shape[2]
    if photometric == "RGB":
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
    else:
        ds.SamplesPerPixel = 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = photometric
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = np.ascontiguousarray(
        pixels.astype(np.uint8 if photometric == "RGB" else np.uint16)
    ).tobytes()
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, implicit_vr=False, little_endian=True)
    return path


def _raw12(h: int = 40, w: int = 50) -> np.ndarray:
    raw = np.tile(np.linspace(0, 4095, w), (h, 1)).round().astype(np.uint16)
    raw[:8, :8] = 4095
    return raw


def test_dicom_monochrome2_rescale(tmp_path, read):
    raw = _raw12()
    path = _write_dicom(tmp_path / "m2.dcm", raw, slope=2.0, intercept=-1024.0)
    for out in (read(path, None), readers.decode_dicom(path)):
        _check(out, raw.shape)
        # a positive linear rescale followed by the min-max stretch gives the raw ramp
        np.testing.assert_allclose(out, raw / 4095.0, atol=1e-6)


def test_dicom_monochrome1_is_inverted(tmp_path, read):
    raw = _raw12()
    m2 = read(_write_dicom(tmp_path / "m2.dcm", raw, "MONOCHROME2", 2.0, -1024.0), None)
    m1 = read(_write_dicom(tmp_path / "m1.dcm", raw, "MONOCHROME1", 2.0, -1024.0), None)
    _check(m1, raw.shape)
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    assert m2[:8, :8].min() == 1.0 and m1[:8, :8].max() == 0.0  # high stored values: bright only in M2


def test_dicom_window_is_applied_in_rescaled_units(tmp_path):
    raw = _raw12()
    slope, intercept, centre, width = 1.0, -1024.0, 0.0, 401.0
    path = _write_dicom(tmp_path / "w.dcm", raw, slope=slope, intercept=intercept, window=(centre, width))
    out = readers.decode_dicom(path)
    _check(out, raw.shape)
    hu = raw * slope + intercept
    # DICOM linear VOI function, then the min-max stretch (the ramp goes past both window edges)
    expected = np.clip((hu - (centre - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(out, expected, atol=2e-3)
    # the grey (not clipped) pixels are the stored values 824..1224, i.e. HU -200..200; without the
    # rescale the window would pick stored values 0..200 instead
    inside = (out > 0) & (out < 1)
    assert inside.any() and raw[inside].min() >= 820 and raw[inside].max() <= 1230


def test_dicom_multiframe_gives_first_frame(tmp_path):
    raw = _raw12()
    frames = np.stack([raw, 4095 - raw, raw // 2])
    out = readers.decode_dicom(_write_dicom(tmp_path / "mf.dcm", frames))
    np.testing.assert_allclose(out, raw / 4095.0, atol=1e-6)


def test_dicom_rgb_gives_luminance(tmp_path):
    rgb = np.zeros((16, 20, 3), np.uint8)
    rgb[:, :10] = (200, 40, 10)
    rgb[:, 10:] = (10, 120, 240)
    out = readers.decode_dicom(_write_dicom(tmp_path / "rgb.dcm", rgb, "RGB"))
    _check(out, (16, 20))
    lum = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(out, (lum - lum.min()) / (lum.max() - lum.min()), atol=1e-5)


def test_dicom_claimed_by_magic_without_extension(tmp_path, read):
    raw = _raw12()
    path = _write_dicom(tmp_path / "IM0001", raw)
    np.testing.assert_allclose(read(path, None), raw / 4095.0, atol=1e-6)


def test_dicom_without_preamble_by_extension(tmp_path):
    raw = _raw12()
    path = _write_dicom(tmp_path / "raw.dcm", raw, preamble=False)
    assert path.read_bytes()[128:132] != b"DICM"
    np.testing.assert_allclose(readers.decode_dicom(path), raw / 4095.0, atol=1e-6)


def test_dicom_max_size_reduces_keeping_both_sides(tmp_path, read):
    raw = np.tile(np.linspace(0, 4095, 300), (200, 1)).round().astype(np.uint16)
    path = _write_dicom(tmp_path / "big.dcm", raw)
    out = read(path, 60)
    _check(out, (67, 100))  # factor 3 = 200 // 60: both sides stay >= 60
    assert read(path, 150).shape == raw.shape  # less than 2x larger: untouched


def test_importing_readers_loads_neither_torch_nor_pydicom():
    code = "import sys, cxrtool_builtin.readers; print(sorted({'torch', 'pydicom'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- errors and non-images -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["empty.png", "empty.jpg", "empty.dcm"])
def test_zero_byte_file(tmp_path, read, name):
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty file") as info:
        read(path, None)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path, read):
    with pytest.raises(ImageReadError, match="no such file"):
        read(tmp_path / "nope.png", None)


def test_truncated_jpeg(tmp_path, read):
    rng = np.random.default_rng(1)
    path = tmp_path / "trunc.jpg"
    Image.fromarray(rng.integers(0, 256, (200, 240), dtype=np.uint8)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    for max_size in (None, 64):
        with pytest.raises(ImageReadError) as info:
            read(path, max_size)
        assert str(info.value).startswith(str(path))


def test_text_file_with_png_extension_is_not_claimed(tmp_path, read):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n" * 20)
    assert readers.decode_pillow(path) is None
    assert readers.read_image_dicom(path, None) is None
    assert read(path, None) is None  # the core turns this into "not an image cxrtool can read"


def test_text_file_with_dcm_extension_raises(tmp_path, read):
    path = tmp_path / "notes.dcm"
    path.write_text("this is not a DICOM file\n" * 20)
    with pytest.raises(ImageReadError) as info:
        read(path, None)
    assert str(info.value).startswith(str(path))


def test_readers_hook_order(read):
    impls = plugins.get_manager().pm.hook.read_image.get_hookimpls()
    names = [i.function.__name__ for i in impls if i.plugin_name == "readers"]
    # pluggy calls the list from the end: DICOM (tryfirst) first, Pillow (trylast) last
    assert names == ["read_image_pillow", "read_image_dicom"]


# -- real data -----------------------------------------------------------------------------------
@pytest.mark.realdata
@pytest.mark.parametrize(
    "name, shape",
    [
        ("nih-00000001_000-cardiomegaly.png", (512, 512)),
        ("nih-00027426_000-no-finding.png", (512, 512)),
        ("tbx11k-h0001-health.png", (512, 512)),
        ("tbx11k-tb0005-tb.png", (512, 512)),
        ("siim-monochrome2.dcm", (1024, 1024)),
        ("siim-monochrome1.dcm", (1024, 1024)),
    ],
)
def test_real_samples_decode(shared_data, read, name, shape):
    out = read(shared_data / "samples" / name, None)
    _check(out, shape)
    assert out.std() > 0.1  # a real radiograph, not a flat or nearly black image


@pytest.mark.realdata
def test_real_monochrome1_is_inverted(shared_data, read):
    """The two SIIM files hold identical pixel bytes; only PhotometricInterpretation differs.

    So handling MONOCHROME1 correctly means its decoded image is the negative of the MONOCHROME2
    one: inverting it gives back the same image.
    """
    import pydicom

    m1_path = shared_data / "samples" / "siim-monochrome1.dcm"
    m2_path = shared_data / "samples" / "siim-monochrome2.dcm"
    assert np.array_equal(pydicom.dcmread(m1_path).pixel_array, pydicom.dcmread(m2_path).pixel_array)
    m1, m2 = read(m1_path, None), read(m2_path, None)
    corr = np.corrcoef((1.0 - m1).ravel(), m2.ravel())[0, 1]
    assert corr > 0.99
    np.testing.assert_allclose(1.0 - m1, m2, atol=1e-6)


@pytest.mark.realdata
def test_real_kermany_draft_matches_full_decode(shared_data, read):
    path = shared_data / "kermany-fullres" / "val" / "NORMAL" / "NORMAL2-IM-1440-0001.jpeg"
    if not path.exists():
        path = min((shared_data / "kermany-fullres").rglob("*.jpeg"))
    full = read(path, None)
    small = read(path, 224)
    assert min(small.shape) >= 224
    assert small.shape[0] * 2 <= full.shape[0]  # really decoded at a reduced scale
    ref = np.asarray(Image.fromarray(full, "F").resize(small.shape[::-1], Image.BOX))
    assert np.abs(small - ref).mean() < 0.01
    assert np.corrcoef(small.ravel(), ref.ravel())[0, 1] > 0.99
