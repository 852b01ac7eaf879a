"""Small tensor helpers shared by the detectors: Gaussian blur, SSIM map, map -> image score."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from cxrtool.errors import UsageError

REDUCTIONS = ("mean", "max", "top1", "top5", "top10")


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, 1, H, W) with reflected borders; sigma <= 0: unchanged."""
    if sigma <= 0:
        return x
    k = gaussian_kernel(sigma).to(x.dtype)
    r = (len(k) - 1) // 2
    r = min(r, x.shape[-1] - 1, x.shape[-2] - 1)
    if r < 1:
        return x
    k = k[len(k) // 2 - r : len(k) // 2 + r + 1]
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))


def ssim_map(x: torch.Tensor, y: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """Local SSIM (Wang et al. 2004) of two (N, 1, H, W) images in [0, 1]: (N, 1, H, W) in [-1, 1]."""
    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x, sigma), blur(y, sigma)
    vx = blur(x * x, sigma) - mx * mx
    vy = blur(y * y, sigma) - my * my
    cxy = blur(x * y, sigma) - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def check_reduce(how: str) -> str:
    if how not in REDUCTIONS:
        raise UsageError(f"detector option reduce={how!r}; valid: {', '.join(REDUCTIONS)}")
    return how


def reduce_maps(maps: torch.Tensor, how: str) -> np.ndarray:
    """(N, H, W) -> (N,) image scores: mean, max, or the mean of the top p % of pixels (topP)."""
    flat = maps.reshape(len(maps), -1)
    if how == "mean":
        out = flat.mean(1)
    elif how == "max":
        out = flat.max(1).values
    else:
        k = max(1, int(round(flat.shape[1] * int(how[3:]) / 100.0)))
        out = flat.topk(k, dim=1).values.mean(1)
    return out.double().numpy()


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).float().div_(255.0)


def int_opt(name: str, value, low: int) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"detector option {name}={value!r} is not an integer") from None
    if v < low or float(value) != v:
        raise UsageError(f"detector option {name}={value!r} must be an integer >= {low}")
    return v


def float_opt(name: str, value, low: float, high: float = math.inf) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"detector option {name}={value!r} is not a number") from None
    if not (low < v <= high):
        raise UsageError(f"detector option {name}={value!r} must be in ({low}, {high}]")
    return v


def choice_opt(name: str, value, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise UsageError(f"detector option {name}={value!r}; valid: {', '.join(allowed)}")
    return value
