"""The preprocessing contract."""

from __future__ import annotations

import numpy as np
import pytest

from cxrtool.errors import UsageError
from cxrtool.imaging import Preprocessing, geometry, preprocess, to_tensor


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
