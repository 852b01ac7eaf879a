"""Built-in batch augmentations for chest X-rays.

Every augmentation works on a whole batch ``(N, 1, H, W)`` of float images in [0, 1] and draws its
per-sample parameters only from the ``torch.Generator`` it is given, so a seeded generator makes a run
repeatable. Output keeps the input's shape, dtype and device. Parameters are drawn on the generator's
device and moved to the batch's device (pass a generator on the batch's device to avoid copying noise
images from the CPU to the GPU).

Geometric changes (``rotate``, ``translate``, ``scale`` and the fused ``affine``) build one 2x3 matrix
per sample and warp the batch with a single affine grid + ``grid_sample`` (bilinear); the grid is
built by broadcasting (:func:`affine_grid`), equal to ``F.affine_grid`` but ~10x faster on the CPU. Pixels that come
from outside the image are filled with 0 (``padding_mode="zeros"``): in [0, 1] before normalisation 0 is
black, the colour of the letterbox / collimation borders many radiographs already have, whereas
``"border"`` smears the edge rows into streaks, structure that does not exist in any real image and that
a network could learn. With the default magnitudes only thin corner slivers are affected.

Each built geometric function also has a ``sample_forward(n, generator, height, width, device)``
attribute returning the per-sample forward transforms (``(N, 3, 3)``, pixel units, origin at the image
centre, y down). :func:`fuse_geometric` composes several of them into one warp; ``affine`` is that
fusion of rotate + translate + scale, one resampling instead of three.

``torch`` is imported inside the build functions only, so listing augmentations stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from cxrtool.augment import AugmentationSpec
from cxrtool.errors import UsageError
from cxrtool.hookspecs import hookimpl

#: how pixels from outside the source image are filled by the geometric augmentations (see above)
PADDING_MODE = "zeros"


# -- option checking -----------------------------------------------------------------------------
def _number(aug: str, key: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> float:
    """``value`` as a float in [lo, hi] (or (lo, hi] with lo_open), else a UsageError naming the option."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"augmentation {aug!r}: option {key} must be a number, got {value!r}") from None
    ok = math.isfinite(x) and (x > lo if lo_open else x >= lo) and x <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        raise UsageError(f"augmentation {aug!r}: option {key}={value!r} is outside {bracket}{lo:g}, {hi:g}]")
    return x


# -- random helpers (all randomness comes from ``generator``) ------------------------------------
def _uniform(n: int, generator, lo: float, hi: float, device=None):
    """``n`` values uniform in [lo, hi) drawn from ``generator`` (float32, on ``device``)."""
    import torch

    gen_device = generator.device if generator is not None else device
    u = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float32)
    return (lo + (hi - lo) * u).to(device)


def _bernoulli(n: int, generator, p: float, device=None):
    return _uniform(n, generator, 0.0, 1.0, device) < p


# -- geometry ------------------------------------------------------------------------------------
def _eye(n: int, device):
    import torch

    return torch.eye(3, dtype=torch.float32, device=device).repeat(n, 1, 1)


def rotation_forward(angles_deg, device=None):
    """Forward transforms rotating content counter-clockwise as displayed by ``angles_deg`` (N,)."""
    import torch

    a = torch.as_tensor(angles_deg, dtype=torch.float32, device=device) * (math.pi / 180.0)
    m = _eye(a.shape[0], a.device)
    c, s = torch.cos(a), torch.sin(a)
    # pixel coordinates with y pointing down: a point on the right (1, 0) goes to (cos, -sin), i.e. up
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = c, s, -s, c
    return m


def translation_forward(tx_px, ty_px, device=None):
    """Forward transforms moving content by (tx, ty) pixels (x right, y down)."""
    import torch

    tx = torch.as_tensor(tx_px, dtype=torch.float32, device=device)
    m = _eye(tx.shape[0], tx.device)
    m[:, 0, 2] = tx
    m[:, 1, 2] = torch.as_tensor(ty_px, dtype=torch.float32, device=tx.device)
    return m


def scaling_forward(factors, device=None):
    """Forward transforms magnifying content by ``factors`` (N,) about the image centre."""
    import torch

    f = torch.as_tensor(factors, dtype=torch.float32, device=device)
    m = _eye(f.shape[0], f.device)
    m[:, 0, 0] = f
    m[:, 1, 1] = f
    return m


def apply_affine(batch, forward):
    """Warp ``batch`` (N, C, H, W) by per-sample forward transforms (N, 3, 3) with one grid_sample.

    ``forward`` maps source to destination pixel coordinates (origin at the image centre, y down);
    working in pixels rather than in [-1, 1] keeps rotations of non-square images free of shear.
    """
    import torch
    import torch.nn.functional as F

    _, _, h, w = batch.shape
    forward = forward.to(device=batch.device, dtype=torch.float32)
    s = torch.diag(torch.tensor([w / 2.0, h / 2.0, 1.0], device=batch.device))
    s_inv = torch.diag(torch.tensor([2.0 / w, 2.0 / h, 1.0], device=batch.device))
    # affine_grid wants, for every output location, where to sample in the input (normalised coords)
    theta = (s_inv @ torch.linalg.inv(forward) @ s)[:, :2, :]
    x = batch if batch.dtype in (torch.float32, torch.float64) else batch.float()
    grid = affine_grid(theta.to(x.dtype), h, w)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode=PADDING_MODE, align_corners=False)
    return out.to(batch.dtype)


def affine_grid(theta, height: int, width: int):
    """Same as ``F.affine_grid(theta, (N, C, H, W), align_corners=False)``, built by broadcasting.

    On the CPU ``F.affine_grid`` runs a batched matmul over a base grid and takes ~10x longer than
    the two broadcast multiply-adds here (it dominated the cost of a geometric augmentation).
    """
    import torch

    n = theta.shape[0]
    dev, dt = theta.device, theta.dtype
    xs = (torch.arange(width, device=dev, dtype=dt) * 2 + 1) / width - 1  # pixel centres in [-1, 1]
    ys = (torch.arange(height, device=dev, dtype=dt) * 2 + 1) / height - 1
    grid = torch.empty(n, height, width, 2, device=dev, dtype=dt)
    for k in (0, 1):
        row = theta[:, k, 1, None] * ys + theta[:, k, 2, None]  # (N, H)
        grid[..., k] = row[:, :, None] + theta[:, k, 0, None, None] * xs  # (N, H, W)
    return grid


def _geometric(sample_forward: Callable) -> Callable:
    """Wrap ``sample_forward(n, generator, h, w, device)`` into a batch augmentation."""

    def fn(batch, generator):
        n, _, h, w = batch.shape
        if n == 0:
            return batch
        return apply_affine(batch, sample_forward(n, generator, h, w, batch.device))

    fn.sample_forward = sample_forward
    return fn


def fuse_geometric(fns: list[Callable]) -> Callable:
    """One augmentation applying several geometric ones (in list order) with a single resampling.

    Parameters are drawn in the same order as when the functions run one after another, so the fused
    and the unfused pipelines see the same random numbers; only the interpolation differs (one
    bilinear resampling instead of several, i.e. less blur).
    """

    def sample_forward(n, generator, h, w, device):
        total = _eye(n, device)
        for f in fns:
            total = f.sample_forward(n, generator, h, w, device).to(device) @ total
        return total

    return _geometric(sample_forward)


def build_rotate(degrees: float = 5.0):
    degrees = _number("rotate", "degrees", degrees, 0.0, 180.0)

    def sample_forward(n, generator, h, w, device):
        return rotation_forward(_uniform(n, generator, -degrees, degrees, device))

    return _geometric(sample_forward)


def build_translate(fraction: float = 0.05):
    fraction = _number("translate", "fraction", fraction, 0.0, 0.5)

    def sample_forward(n, generator, h, w, device):
        tx = _uniform(n, generator, -fraction, fraction, device) * w
        ty = _uniform(n, generator, -fraction, fraction, device) * h
        return translation_forward(tx, ty)

    return _geometric(sample_forward)


def build_scale(range: float = 0.05):  # the option is called "range" on the command line
    r = _number("scale", "range", range, 0.0, 0.9)

    def sample_forward(n, generator, h, w, device):
        return scaling_forward(_uniform(n, generator, 1.0 - r, 1.0 + r, device))

    return _geometric(sample_forward)


def build_affine(degrees: float = 5.0, fraction: float = 0.05, range: float = 0.05):
    return fuse_geometric(
        [build_scale(range=range), build_rotate(degrees=degrees), build_translate(fraction=fraction)]
    )


# -- intensity -----------------------------------------------------------------------------------
def build_contrast(strength: float = 0.1):
    """Per sample: gamma in [e^-s, e^s], contrast x(1 +- s) about the image mean, brightness +- s/2."""
    s = _number("contrast", "strength", strength, 0.0, 1.0)

    def fn(batch, generator):
        import torch

        n = batch.shape[0]
        if n == 0 or s == 0:
            return batch
        dev = batch.device
        shape = (n,) + (1,) * (batch.dim() - 1)
        gamma = torch.exp(_uniform(n, generator, -s, s, dev)).view(shape)
        contrast = _uniform(n, generator, 1.0 - s, 1.0 + s, dev).view(shape)
        brightness = _uniform(n, generator, -s / 2, s / 2, dev).view(shape)
        x = batch.float().clamp(0.0, 1.0).pow_(gamma)
        mean = x.mean(dim=tuple(range(1, batch.dim())), keepdim=True)
        # (x - mean) * contrast + mean + brightness, in place
        x.mul_(contrast).add_(mean * (1.0 - contrast) + brightness)
        return x.clamp_(0.0, 1.0).to(batch.dtype)

    return fn


def build_noise(sigma: float = 0.02):
    """Additive Gaussian noise, per-sample standard deviation uniform in [0, sigma]; clipped to [0, 1]."""
    sigma = _number("noise", "sigma", sigma, 0.0, 1.0)

    def fn(batch, generator):
        import torch

        n = batch.shape[0]
        if n == 0 or sigma == 0:
            return batch
        dev = batch.device
        std = _uniform(n, generator, 0.0, sigma, dev).view((n,) + (1,) * (batch.dim() - 1))
        gen_device = generator.device if generator is not None else dev
        noise = torch.randn(batch.shape, generator=generator, device=gen_device, dtype=torch.float32).to(dev)
        return (batch.float() + std * noise).clamp_(0.0, 1.0).to(batch.dtype)

    return fn


def build_blur(sigma: float = 1.0, p: float = 0.5):
    """With probability p per sample, Gaussian blur with std uniform in [sigma/2, sigma] pixels.

    ``p`` decides whether an image is blurred, ``sigma`` how much; the lower bound keeps a "blurred"
    image from getting a no-op kernel.
    """
    sigma = _number("blur", "sigma", sigma, 0.0, 20.0)
    p = _number("blur", "p", p, 0.0, 1.0)

    def fn(batch, generator):
        import torch
        import torch.nn.functional as F

        n, c, h, w = batch.shape
        if n == 0 or sigma == 0 or p == 0:
            return batch
        dev = batch.device
        apply = _bernoulli(n, generator, p, dev)
        std = _uniform(n, generator, sigma / 2, sigma, dev).clamp_(min=1e-3)
        radius = max(1, math.ceil(3 * sigma))
        offsets = torch.arange(-radius, radius + 1, device=dev, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (offsets[None, :] / std[:, None]) ** 2)
        kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (N, K)
        kernel = kernel.repeat_interleave(c, dim=0)  # one kernel per (sample, channel)
        x = batch.float().reshape(1, n * c, h, w)
        # separable: rows then columns, one grouped convolution each; edges replicate
        x = F.conv2d(
            F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=n * c
        )
        x = F.conv2d(
            F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel[:, None, :, None], groups=n * c
        )
        x = x.reshape(n, c, h, w).clamp_(0.0, 1.0).to(batch.dtype)
        return torch.where(apply.view(n, 1, 1, 1), x, batch)

    return fn


def build_hflip(p: float = 0.5):
    p = _number("hflip", "p", p, 0.0, 1.0)

    def fn(batch, generator):
        import torch

        n = batch.shape[0]
        if n == 0 or p == 0:
            return batch
        flip = _bernoulli(n, generator, p, batch.device).view((n,) + (1,) * (batch.dim() - 1))
        return torch.where(flip, batch.flip(-1), batch)

    return fn


SPECS = (
    AugmentationSpec(
        "rotate",
        build_rotate,
        "rotate each image by a random angle in [-degrees, degrees] about its centre (bilinear, zero fill)",
        {"degrees": 5.0},
    ),
    AugmentationSpec(
        "translate",
        build_translate,
        "shift each image by up to +-fraction of its width and height (zero fill)",
        {"fraction": 0.05},
    ),
    AugmentationSpec(
        "scale",
        build_scale,
        "zoom each image by a random factor in [1-range, 1+range] about its centre (zero fill)",
        {"range": 0.05},
    ),
    AugmentationSpec(
        "affine",
        build_affine,
        "scale, rotate and translate in one resampling (less blur and faster than the three in a row)",
        {"degrees": 5.0, "fraction": 0.05, "range": 0.05},
    ),
    AugmentationSpec(
        "contrast",
        build_contrast,
        "random gamma (e^+-strength), contrast (1+-strength) and brightness (+-strength/2), clipped to [0, 1]",
        {"strength": 0.1},
    ),
    AugmentationSpec(
        "hflip",
        build_hflip,
        "mirror left-right with probability p; opt-in only, never in 'default': chest anatomy is "
        "lateralised (heart on the left), a flipped image looks like situs inversus",
        {"p": 0.5},
    ),
    AugmentationSpec(
        "noise",
        build_noise,
        "add Gaussian noise with a per-image standard deviation up to sigma, clipped to [0, 1]",
        {"sigma": 0.02},
    ),
    AugmentationSpec(
        "blur",
        build_blur,
        "with probability p, Gaussian blur with a per-image std in [sigma/2, sigma] pixels",
        {"sigma": 1.0, "p": 0.5},
    ),
)


@hookimpl
def register_augmentations(register):
    for spec in SPECS:
        register(spec)
