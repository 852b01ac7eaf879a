"""The built-in batch augmentations (plugins/cxrtool_builtin/augmentations.py)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cxrtool import plugins, registry
from cxrtool.augment import DEFAULT_AUGMENT, build_pipeline, parse_augment
from cxrtool.errors import UnknownNameError, UsageError
from cxrtool_builtin import augmentations as aug

NAMES = ["affine", "blur", "contrast", "hflip", "noise", "rotate", "scale", "translate"]
#: options that make every augmentation change the images clearly, so "differs" checks are meaningful
STRONG = {
    "rotate": {"degrees": 20.0},
    "translate": {"fraction": 0.1},
    "scale": {"range": 0.2},
    "affine": {"degrees": 20.0, "fraction": 0.1, "range": 0.2},
    "contrast": {"strength": 0.3},
    "hflip": {"p": 0.5},  # p=1 would give the same output for every seed
    "noise": {"sigma": 0.05},
    "blur": {"sigma": 2.0, "p": 1.0},
}


@pytest.fixture(autouse=True)
def only_augmentations(monkeypatch):
    """Load only the augmentations plugin (other built-ins may be work in progress)."""
    monkeypatch.setenv("CXRTOOL_LOAD_PLUGINS", "augmentations")
    monkeypatch.delenv("CXRTOOL_PLUGINS_DIR", raising=False)
    plugins.reset_manager()
    yield
    plugins.reset_manager()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(n: int = 6, h: int = 40, w: int = 56, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Smooth random images with some structure, in [0, 1]."""
    g = _gen(seed)
    coarse = torch.rand(n, 1, h // 8, w // 8, generator=g)
    x = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    x[:, :, h // 4 : h // 2, w // 4 : w // 2] = 1.0
    return x.clamp(0, 1).to(dtype)


def _blob(h: int, w: int, cy: float, cx: float, radius: float = 3.0) -> torch.Tensor:
    """(1, 1, H, W) Gaussian blob centred at pixel (cy, cx)."""
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    return torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))[None, None]


def _centroid(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mass centre (y, x) of (N, 1, H, W), in pixels."""
    _, _, h, w = img.shape
    m = img[:, 0]
    total = m.sum(dim=(1, 2))
    ys = (m.sum(dim=2) * torch.arange(h, dtype=m.dtype)).sum(dim=1) / total
    xs = (m.sum(dim=1) * torch.arange(w, dtype=m.dtype)).sum(dim=1) / total
    return ys, xs


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-6, rtol: float = 0.0) -> None:
    """Like torch.testing.assert_close (whose first call takes seconds to import its machinery)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"max abs difference {float((a - b).abs().max()):.3g}"


def _pipe(name: str, **options):
    return build_pipeline([(name, options)])


# -- registration --------------------------------------------------------------------------------
def test_all_registered():
    specs = registry.all_specs("augmentation")
    assert sorted(specs) == NAMES
    for name, spec in specs.items():
        assert spec.description
        assert registry.provider("augmentation", name) == "augmentations"
    assert specs["rotate"].options == {"degrees": 5.0}
    assert specs["translate"].options == {"fraction": 0.05}
    assert specs["scale"].options == {"range": 0.05}
    assert specs["contrast"].options == {"strength": 0.1}
    assert specs["hflip"].options == {"p": 0.5}
    assert specs["noise"].options == {"sigma": 0.02}
    assert specs["blur"].options == {"sigma": 1.0, "p": 0.5}


def test_hflip_is_opt_in():
    desc = registry.get("augmentation", "hflip").description
    assert "opt-in" in desc and "lateralised" in desc
    assert "hflip" not in parse_augment("default")[0] and all(
        n != "hflip" for n, _ in parse_augment("default")
    )
    assert "hflip" not in DEFAULT_AUGMENT


def test_module_import_does_not_import_torch():
    code = "import sys, cxrtool_builtin.augmentations; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# -- the contract, for every augmentation --------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_keeps_shape_dtype_range_and_is_seeded(name):
    x = _batch()
    before = x.clone()
    fn = _pipe(name, **STRONG[name])
    a = fn(x, _gen(1))
    assert torch.equal(x, before), "the input batch must not be modified in place"
    assert a.shape == x.shape and a.dtype == x.dtype and a.device == x.device
    assert torch.isfinite(a).all()
    assert a.min() >= 0.0 and a.max() <= 1.0
    b = fn(x, _gen(1))
    assert torch.equal(a, b), "same seed, same output"
    c = fn(x, _gen(2))
    assert not torch.allclose(a, c), "another seed, another output"
    assert not torch.allclose(a, x), "the strong setting changes the images"


@pytest.mark.parametrize("name", NAMES)
def test_default_options_and_other_dtypes_and_sizes(name):
    fn = _pipe(name)
    for x in (_batch(3, 33, 21, dtype=torch.float64), _batch(1, 16, 16), torch.zeros(0, 1, 8, 8)):
        y = fn(x, _gen(0))
        assert y.shape == x.shape and y.dtype == x.dtype
        if x.numel():
            assert y.min() >= 0.0 and y.max() <= 1.0


@pytest.mark.parametrize("name", ["rotate", "translate", "noise", "contrast", "blur"])
def test_parameters_differ_per_sample(name):
    x = _batch(1).repeat(4, 1, 1, 1)  # four identical images
    y = _pipe(name, **STRONG[name])(x, _gen(3))
    diffs = [float((y[0] - y[i]).abs().max()) for i in range(1, 4)]
    assert min(diffs) > 1e-3


def test_randomness_comes_only_from_the_generator():
    fn = build_pipeline(parse_augment(DEFAULT_AUGMENT + ",noise,blur,hflip"))
    x = _batch()
    torch.manual_seed(0)
    a = fn(x, _gen(5))
    torch.manual_seed(123)  # the global RNG must not matter
    b = fn(x, _gen(5))
    assert torch.equal(a, b)


def test_default_pipeline():
    fn = build_pipeline(parse_augment("default"))
    x = _batch(8, 64, 64)
    y = fn(x, _gen(0))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0
    assert torch.equal(y, fn(x, _gen(0)))


# -- option checking -----------------------------------------------------------------------------
def test_unknown_option_is_a_usage_error():
    with pytest.raises(UsageError, match="degrees"):
        build_pipeline(parse_augment("rotate:angle=10"))


@pytest.mark.parametrize(
    "text",
    [
        "rotate:degrees=-1",
        "rotate:degrees=500",
        "translate:fraction=0.9",
        "scale:range=1.5",
        "hflip:p=2",
        "blur:p=-0.1",
        "noise:sigma=abc",
        "contrast:strength=nan",
    ],
)
def test_bad_option_values_are_usage_errors(text):
    with pytest.raises(UsageError):
        build_pipeline(parse_augment(text))


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownNameError) as info:
        build_pipeline(parse_augment("rotate,twirl"))
    message = str(info.value)
    assert "twirl" in message
    for name in NAMES:
        assert name in message
    assert info.value.valid == NAMES


# -- geometry: real checks -----------------------------------------------------------------------
@pytest.mark.parametrize("angle", [90.0, 30.0, -45.0])
def test_rotation_by_known_angle_moves_mass(angle):
    h, w = 64, 96  # not square: a rotation must not shear
    cy, cx = (h - 1) / 2, (w - 1) / 2
    r = 20.0
    x = _blob(h, w, cy, cx + r)  # to the right of the centre
    y = aug.apply_affine(x, aug.rotation_forward(torch.tensor([angle])))
    ys, xs = _centroid(y)
    # counter-clockwise as displayed: y grows downwards, so up is -y
    expected_y, expected_x = cy - r * math.sin(math.radians(angle)), cx + r * math.cos(math.radians(angle))
    assert abs(float(ys[0]) - expected_y) < 0.3 and abs(float(xs[0]) - expected_x) < 0.3
    assert abs(float(y.sum()) - float(x.sum())) / float(x.sum()) < 0.02  # mass kept (blob stays inside)
    # the blob stays round (no shear from the non-square aspect ratio)
    m = y[0, 0]
    spread_y = ((m.sum(1) * (torch.arange(h) - ys[0]) ** 2).sum() / m.sum()).sqrt()
    spread_x = ((m.sum(0) * (torch.arange(w) - xs[0]) ** 2).sum() / m.sum()).sqrt()
    assert abs(float(spread_y) - float(spread_x)) < 0.1


def test_rotation_by_90_matches_rot90_exactly():
    x = _batch(2, 32, 32)
    y = aug.apply_affine(x, aug.rotation_forward(torch.tensor([90.0, -90.0])))
    _close(y[0], torch.rot90(x[0], 1, dims=(1, 2)), atol=1e-5)
    _close(y[1], torch.rot90(x[1], -1, dims=(1, 2)), atol=1e-5)


def test_registered_rotate_turns_each_image_by_its_own_angle_within_range():
    n, h, w, r = 16, 64, 64, 18.0
    cy, cx = (h - 1) / 2, (w - 1) / 2
    x = _blob(h, w, cy, cx + r).repeat(n, 1, 1, 1)
    fn = _pipe("rotate", degrees=40.0)
    y = fn(x, _gen(7))
    ys, xs = _centroid(y)
    angles = torch.rad2deg(torch.atan2(-(ys - cy), xs - cx))
    radii = torch.hypot(ys - cy, xs - cx)
    assert torch.allclose(radii, torch.full_like(radii, r), atol=0.3)
    assert float(angles.abs().max()) <= 40.0 + 0.5
    assert float(angles.std()) > 10.0  # uniform on [-40, 40] has std 23
    # and they are the angles drawn from the generator (same seed replays the same parameters)
    built = aug.build_rotate(degrees=40.0)
    fwd = built.sample_forward(n, _gen(7), h, w, torch.device("cpu"))
    drawn = torch.rad2deg(torch.atan2(-fwd[:, 1, 0], fwd[:, 0, 0]))
    assert torch.allclose(angles, drawn, atol=0.5)


def test_registered_translate_moves_within_fraction():
    n, h, w = 16, 48, 80
    x = _blob(h, w, (h - 1) / 2, (w - 1) / 2).repeat(n, 1, 1, 1)
    y = _pipe("translate", fraction=0.1)(x, _gen(4))
    ys, xs = _centroid(y)
    dy, dx = ys - (h - 1) / 2, xs - (w - 1) / 2
    assert float(dx.abs().max()) <= 0.1 * w + 0.2 and float(dy.abs().max()) <= 0.1 * h + 0.2
    fwd = aug.build_translate(fraction=0.1).sample_forward(n, _gen(4), h, w, torch.device("cpu"))
    assert torch.allclose(dx, fwd[:, 0, 2], atol=0.2) and torch.allclose(dy, fwd[:, 1, 2], atol=0.2)


def test_registered_scale_changes_area_by_factor_squared():
    n, h, w = 8, 64, 64
    x = torch.zeros(n, 1, h, w)
    x[:, :, 16:48, 16:48] = 1.0  # 32 x 32 square at the centre
    y = _pipe("scale", range=0.3)(x, _gen(9))
    factors = aug.build_scale(range=0.3).sample_forward(n, _gen(9), h, w, torch.device("cpu"))[:, 0, 0]
    assert float(factors.min()) >= 0.7 and float(factors.max()) <= 1.3
    area = y.sum(dim=(1, 2, 3))
    _close(area, 32 * 32 * factors**2, atol=0.0, rtol=0.03)


def test_fused_affine_equals_the_three_in_a_row():
    x = _batch(6, 64, 64)
    fused = _pipe("affine", degrees=10.0, fraction=0.05, range=0.1)(x, _gen(11))
    seq = build_pipeline(
        [("scale", {"range": 0.1}), ("rotate", {"degrees": 10.0}), ("translate", {"fraction": 0.05})]
    )(x, _gen(11))
    inner = (slice(None), slice(None), slice(12, -12), slice(12, -12))  # away from the zero-filled edges
    assert float((fused[inner] - seq[inner]).abs().mean()) < 0.01  # same parameters, one resampling less


def test_affine_grid_matches_torch():
    theta = torch.tensor([[[0.9, -0.2, 0.1], [0.3, 1.1, -0.05]], [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    for h, w in [(5, 7), (64, 48)]:
        ours = aug.affine_grid(theta, h, w)
        ref = F.affine_grid(theta, [2, 1, h, w], align_corners=False)
        _close(ours, ref, atol=1e-6)


# -- intensity -----------------------------------------------------------------------------------
def test_contrast_keeps_order_within_each_image():
    ramp = torch.linspace(0, 1, 64).expand(4, 1, 16, 64).contiguous()
    y = _pipe("contrast", strength=0.5)(ramp, _gen(2))
    assert (y[..., 1:] - y[..., :-1] >= -1e-6).all()  # monotone: anatomy keeps its grey-level order
    assert not torch.allclose(y, ramp)


def test_noise_is_zero_mean_with_bounded_std():
    x = torch.full((32, 1, 32, 32), 0.5)
    y = _pipe("noise", sigma=0.05)(x, _gen(3))
    residual = y - x
    assert abs(float(residual.mean())) < 0.002
    stds = residual.std(dim=(1, 2, 3))
    assert float(stds.max()) < 0.055 and float(stds.min()) < 0.025  # per-image std uniform in [0, sigma]


def test_blur_removes_fine_detail_and_p0_is_identity():
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    checker = ((yy + xx) % 2).float().expand(4, 1, 32, 32).contiguous()
    blurred = _pipe("blur", sigma=2.0, p=1.0)(checker, _gen(1))
    assert (blurred.std(dim=(1, 2, 3)) < checker.std(dim=(1, 2, 3))).all()
    assert torch.allclose(blurred.mean(dim=(1, 2, 3)), checker.mean(dim=(1, 2, 3)), atol=0.02)
    assert torch.equal(_pipe("blur", p=0.0)(checker, _gen(1)), checker)


def test_hflip_p1_mirrors_and_p0_is_identity():
    x = _batch()
    _close(_pipe("hflip", p=1.0)(x, _gen(0)), x.flip(-1), atol=0.0)
    assert torch.equal(_pipe("hflip", p=0.0)(x, _gen(0)), x)
