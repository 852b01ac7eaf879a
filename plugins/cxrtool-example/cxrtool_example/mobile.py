"""``mobile-cxr``: a small depthwise-separable CNN (MobileNet-style) for 1-channel chest X-rays.

A 3x3 stride-2 stem, then four stages of two depthwise-separable blocks (3x3 depthwise conv - BN -
ReLU - 1x1 pointwise conv - BN - ReLU); each stage halves the resolution and doubles the width
(w, 2w, 4w, 8w, 16w channels), so the last stage sees the input downsampled 32x. Global average
pooling, dropout and a linear layer make the head, so any input size >= 32 px works.

ReLUs are not in place, so any stage can be hooked (Grad-CAM, embeddings).
"""

from __future__ import annotations

import torch
from torch import nn

from cxrtool.errors import UsageError


def _int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise UsageError(f"mobile-cxr: option {name}={value!r} is not an integer")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"mobile-cxr: option {name}={value!r} is not an integer") from None
    if number < low:
        raise UsageError(f"mobile-cxr: option {name}={value!r} must be >= {low}")
    return number


def _fraction(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"mobile-cxr: option {name}={value!r} is not a number") from None
    if isinstance(value, bool) or not 0.0 <= number < 1.0:
        raise UsageError(f"mobile-cxr: option {name}={value!r} must be in [0, 1)")
    return number


def separable(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """Depthwise 3x3 (one filter per channel) then pointwise 1x1 (mixes channels), each with BN + ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False),
        nn.BatchNorm2d(c_in),
        nn.ReLU(),
        nn.Conv2d(c_in, c_out, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class MobileCXR(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        c = width
        for i in range(1, 5):
            self.add_module(f"stage{i}", nn.Sequential(separable(c, 2 * c, stride=2), separable(2 * c, 2 * c)))
            c *= 2
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.fc.weight, 0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage4(self.stage3(self.stage2(self.stage1(self.stem(x)))))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


def build(num_classes: int, in_channels: int = 1, width: int = 16, dropout: float = 0.1) -> nn.Module:
    """``ModelSpec.build``: options are validated here (bad values are usage errors)."""
    return MobileCXR(_int("num_classes", num_classes, 1), _int("in_channels", in_channels, 1),
                     width=_int("width", width, 1), dropout=_fraction("dropout", dropout))
