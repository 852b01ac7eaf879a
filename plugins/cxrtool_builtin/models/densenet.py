"""torchvision DenseNet-121 with a 1-channel stem: ``densenet121``."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.densenet import DenseNet

from cxrtool_builtin.models._layers import adapt_first_conv


class DenseNet121(DenseNet):
    """torchvision's DenseNet-121 whose final ReLU and pooling are modules (``relu``, ``avgpool``)
    instead of functional calls, so the pooled features can be hooked as the embedding and no
    in-place op touches a hookable output. Parameter names are torchvision's."""

    def __init__(self, num_classes: int, in_channels: int = 1):
        super().__init__(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, num_classes=num_classes)
        self.features.conv0 = adapt_first_conv(self.features.conv0, in_channels)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.relu(self.features(x)))
        return self.classifier(torch.flatten(x, 1))


def build(num_classes: int, in_channels: int = 1) -> nn.Module:
    return DenseNet121(num_classes, in_channels)
