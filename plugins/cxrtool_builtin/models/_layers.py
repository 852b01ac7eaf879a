"""Small helpers shared by the model families (imports torch: load lazily)."""

from __future__ import annotations

from torch import nn


def conv_bn_relu(c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1) -> list[nn.Module]:
    """Conv (no bias) -> BatchNorm -> ReLU. The ReLU is not in place so any layer can be hooked."""
    return [
        nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]


def adapt_first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A fresh copy of ``conv`` taking ``in_channels`` inputs (``conv`` itself if it already does)."""
    if conv.in_channels == in_channels:
        return conv
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


def init_weights(model: nn.Module) -> None:
    """He init for convs, unit BatchNorm, small normal Linear (torchvision's VGG/ResNet scheme)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def float_option(name: str, value, low: float, high: float) -> float:
    """``value`` as a float in ``[low, high)``; a usage error otherwise (options may come as text)."""
    from cxrtool.errors import UsageError

    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"model option {name}={value!r} is not a number") from None
    if not low <= number < high:
        raise UsageError(f"model option {name}={value!r} must be in [{low}, {high})")
    return number


def int_option(name: str, value, low: int) -> int:
    """``value`` as an int >= ``low``; a usage error otherwise."""
    from cxrtool.errors import UsageError

    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise UsageError(f"model option {name}={value!r} is not an integer")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"model option {name}={value!r} is not an integer") from None
    if number < low:
        raise UsageError(f"model option {name}={value!r} must be >= {low}")
    return number


def bool_option(name: str, value) -> bool:
    """``value`` as a bool: accepts bools, 0/1 and the words true/false/yes/no/on/off."""
    from cxrtool.options import as_bool

    return as_bool(value, f"model option {name}")
