"""VGG-style models: ``vgg-small`` (seed report 000, Net2/Net3) and ``vgg16-bn`` (reports 001 and 004)."""

from __future__ import annotations

import torch
from torch import nn

from cxrtool_builtin.models._layers import bool_option, float_option, init_weights, int_option
from cxrtool_builtin.models._layout import VGG16_CFG


def _block(c_in: int, c_out: int, kernel_size: int, dropout: float) -> nn.Sequential:
    """Net2/Net3's unit: Conv2d -> BatchNorm2d -> ReLU -> Dropout2d."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
        nn.Dropout2d(dropout),
    )


class VGGSmall(nn.Module):
    """Seed report 000's Net2 (``first_pool=True``, dropout 0.3) / Net3 (``first_pool=False``, 0.1).

    Three wide blocks 1->256 (5x5) -> 128 -> 64 (3x3). The seed's fixed-size ending (a 20x20 conv
    to 2 channels, flattened into a linear layer) is replaced by a 3x3 conv to 16 channels and an
    adaptive 4x4 average pool, so the linear layer still mixes spatial positions (256 features)
    but any input size works.
    """

    def __init__(self, num_classes: int, in_channels: int = 1, dropout: float = 0.3, first_pool: bool = True):
        super().__init__()
        self.block1 = _block(in_channels, 256, 5, dropout)
        self.pool1 = nn.MaxPool2d(2) if first_pool else nn.Identity()
        self.block2 = _block(256, 128, 3, dropout)
        self.block3 = _block(128, 64, 3, dropout)
        self.pool2 = nn.MaxPool2d(2)
        self.lastcnn = nn.Sequential(nn.Conv2d(64, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(4)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(16 * 4 * 4, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.pool1(self.block1(x))))
        x = self.lastcnn(self.pool2(x))
        return self.classifier(self.flatten(self.avgpool(x)))


def vgg16_features(in_channels: int) -> nn.Sequential:
    """torchvision's ``vgg16_bn().features`` (same indices, so ImageNet weights load) with ReLUs not
    in place (hooks on any layer stay valid) and ``in_channels`` inputs."""
    layers: list[nn.Module] = []
    c = in_channels
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
            c = v
    return nn.Sequential(*layers)


class VGG16BN(nn.Module):
    """VGG-16 with batch norm; torchvision's trunk and 7x7 adaptive pool, seed report 004's head:
    Flatten -> Dropout -> Linear(25088, hidden) -> ReLU -> Dropout -> Linear(hidden, classes)."""

    def __init__(self, num_classes: int, in_channels: int = 1, dropout: float = 0.5, hidden: int = 256):
        super().__init__()
        self.features = vgg16_features(in_channels)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(512 * 7 * 7, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


def build_small(num_classes: int, in_channels: int = 1, *, dropout: float, first_pool: bool) -> nn.Module:
    return VGGSmall(
        num_classes,
        in_channels,
        dropout=float_option("dropout", dropout, 0.0, 1.0),
        first_pool=bool_option("first_pool", first_pool),
    )


def build_vgg16_bn(num_classes: int, in_channels: int = 1, *, dropout: float, hidden: int) -> nn.Module:
    return VGG16BN(
        num_classes,
        in_channels,
        dropout=float_option("dropout", dropout, 0.0, 1.0),
        hidden=int_option("hidden", hidden, 1),
    )
