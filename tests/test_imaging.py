"""The preprocessing contract."""

from __future__ import annotations

import numpy as np
import pytest

from cxrtool.errors import UsageError
from cxrtool.imaging import Preprocessing, display_image, geometry, map_to_original, preprocess, to_tensor


def test_letterbox_keeps_aspect_and_pads_black():
    img = np.ones((50, 100), np.float32)  # wide
    out = preprocess(img, Preprocessing(size=40, resize="letterbox"))
    assert out.shape == (40, 40)
    assert (out[:9] == 0).all() and (out[-9:] == 0).all()  # top and bottom padding: 10 rows each
    assert (out[11:29] == 255).all()
    g = geometry((50, 100), Preprocessing(size=40))
    assert g["scale_x"] == pytest.approx(0.4) and g["offset_y"] == 10


def test_crop_keeps_aspect_and_cuts():
    img = np.zeros((50, 100), np.float32)
    img[:, :25] = 1.0  # left quarter bright: cut away by a centre crop
    out = preprocess(img, Preprocessing(size=40, resize="crop"))
    assert out.shape == (40, 40) and out.max() < 128


def test_stretch():
    out = preprocess(np.ones((20, 80), np.float32), Preprocessing(size=16, resize="stretch"))
    assert out.shape == (16, 16) and (out == 255).all()


@pytest.mark.parametrize("mode", ["hist", "clahe"])
def test_equalisation_spreads_a_narrow_histogram(mode):
    rng = np.random.default_rng(0)
    img = (0.4 + 0.1 * rng.random((64, 64))).astype(np.float32)
    plain = preprocess(img, Preprocessing(size=64))
    eq = preprocess(img, Preprocessing(size=64, equalize=mode))
    assert np.ptp(eq) > 2 * np.ptp(plain)


def test_to_tensor_normalises():
    pp = Preprocessing(size=8, mean=0.5, std=0.25)
    t = to_tensor(np.full((2, 8, 8), 255, np.uint8), pp)
    assert tuple(t.shape) == (2, 1, 8, 8) and float(t.max()) == pytest.approx(2.0)


@pytest.mark.parametrize("kw", [{"size": 4}, {"resize": "zoom"}, {"equalize": "magic"}, {"std": 0}])
def test_invalid_preprocessing(kw):
    with pytest.raises(UsageError):
        Preprocessing(**kw)


def test_roundtrip_dict():
    pp = Preprocessing(size=96, resize="crop", equalize="clahe")
    assert Preprocessing.from_dict(pp.to_dict()) == pp


def _ramp(h: int, w: int) -> np.ndarray:
    """A smooth image whose every position is distinguishable: value = f(row, col)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return (0.2 + 0.5 * xx / w + 0.3 * yy / h).astype(np.float32)


@pytest.mark.parametrize("resize", ["letterbox", "stretch", "crop"])
@pytest.mark.parametrize("shape", [(300, 200), (200, 300), (256, 256)])
def test_map_to_original_inverts_the_resize(resize, shape):
    """A map that *is* the preprocessed image, mapped back, is the original image again."""
    pp = Preprocessing(size=64, resize=resize)
    img = _ramp(*shape)
    back = map_to_original(preprocess(img, pp).astype(np.float32) / 255.0, shape, pp)
    assert back.shape == shape
    seen = np.isfinite(back)
    if resize == "crop":  # only the central square of the longer side was seen
        short = min(shape)
        assert abs(seen.sum() - short * short) <= 2 * short + 4
        assert seen[shape[0] // 2, shape[1] // 2] and (shape[0] == shape[1] or not seen.all())
    else:
        assert seen.all()
    err = np.abs(back[seen] - img[seen])
    assert np.median(err) < 0.01 and np.quantile(err, 0.99) < 0.05  # bilinear resampling twice, 8 bits
    with pytest.raises(UsageError):
        map_to_original(np.zeros((32, 32)), shape, pp)


def test_map_to_original_puts_a_hot_spot_where_it_was_in_the_original():
    pp = Preprocessing(size=64)  # letterbox: a 400 x 200 portrait image is padded left and right
    amap = np.zeros((64, 64), np.float32)
    g = geometry((400, 200), pp)
    # the input pixel of original (row 300, col 50)
    r, c = round(300 * g["scale_y"] + g["offset_y"]), round(50 * g["scale_x"] + g["offset_x"])
    amap[r, c] = 1.0
    back = map_to_original(amap, (400, 200), pp)
    pr, pc = np.unravel_index(np.argmax(back), back.shape)
    assert abs(pr - 300) <= 400 / 64 and abs(pc - 50) <= 200 / 32


def test_display_image_downscales_keeping_aspect(tmp_path):
    from PIL import Image

    Image.fromarray((_ramp(900, 600) * 255).astype(np.uint8)).save(tmp_path / "big.png")
    out = display_image(tmp_path / "big.png", max_side=300)
    assert out.dtype == np.uint8 and out.shape == (300, 200)
    assert display_image(tmp_path / "big.png", max_side=2000).shape == (900, 600)
