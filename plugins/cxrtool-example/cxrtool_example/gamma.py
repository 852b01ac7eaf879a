"""``gamma``: a random gamma curve per image, ``x -> x ** g`` with ``g`` log-uniform in [low, high].

Different detectors, exposures and vendor post-processing change the grey-level curve of a
radiograph; a random gamma teaches the model not to rely on it. Applied to each image of the batch
with probability ``p``; all randomness comes from the ``torch.Generator`` passed in (parameters are
drawn on the generator's device and moved to the batch's). Shape, dtype and device are kept; values
stay in [0, 1]; the input batch is not modified.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from cxrtool.errors import UsageError


def _number(key: str, value: Any, lo: float, hi: float) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"augmentation 'gamma': option {key} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not (math.isfinite(x) and lo <= x <= hi):
        raise UsageError(f"augmentation 'gamma': option {key}={value!r} is outside [{lo:g}, {hi:g}]")
    return x


def build(low: float = 0.7, high: float = 1.5, p: float = 0.8) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    low = _number("low", low, 0.05, 20.0)
    high = _number("high", high, 0.05, 20.0)
    p = _number("p", p, 0.0, 1.0)
    if low > high:
        raise UsageError(f"augmentation 'gamma': low={low:g} is greater than high={high:g}")
    log_lo, log_hi = math.log(low), math.log(high)

    def gamma(batch: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        n = batch.shape[0]
        if n == 0 or p == 0.0 or log_lo == log_hi == 0.0:
            return batch
        device = generator.device if generator is not None else batch.device
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float32)
        apply = torch.rand(n, generator=generator, device=device, dtype=torch.float32) < p
        g = torch.where(apply, torch.exp(log_lo + (log_hi - log_lo) * u), torch.ones_like(u))
        g = g.to(batch.device).view((n,) + (1,) * (batch.dim() - 1))
        return batch.float().clamp(0.0, 1.0).pow(g).to(batch.dtype)

    return gamma
