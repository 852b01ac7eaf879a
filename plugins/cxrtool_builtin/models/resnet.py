"""torchvision ResNets with a 1-channel stem: ``resnet18/34/50`` and ``resnet34-gelu`` (seed report 003)."""

from __future__ import annotations

import torchvision.models as tvm
from torch import nn

from cxrtool_builtin.models._layers import adapt_first_conv

_DEPTHS = {18: tvm.resnet18, 34: tvm.resnet34, 50: tvm.resnet50}


def replace_relu(model: nn.Module, make: type[nn.Module] = nn.GELU) -> int:
    """Swap every ``nn.ReLU`` submodule for ``make()``; returns how many were replaced.

    torchvision's blocks call their one ``self.relu`` module after each conv, so this replaces every
    activation of the network.
    """
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, name, make())
                count += 1
    return count


def build(num_classes: int, in_channels: int = 1, *, depth: int, activation: str = "relu") -> nn.Module:
    """ResNet-``depth`` (weights=None) with ``conv1`` taking ``in_channels`` and ``fc`` -> ``num_classes``."""
    model = _DEPTHS[depth](weights=None, num_classes=num_classes)
    model.conv1 = adapt_first_conv(model.conv1, in_channels)
    if activation == "gelu":
        replace_relu(model, nn.GELU)
    elif activation != "relu":
        raise ValueError(f"unknown activation {activation!r}")
    return model
