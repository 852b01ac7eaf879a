"""``compact``: a small VGG-style CNN that trains in reasonable time on a laptop CPU at 128 px.

Five stages of two conv3x3-BN-ReLU layers, widths w, 2w, 4w, 8w, 16w. The first conv has stride 2
and stages 2-5 start with a 2x2 max-pool, so the last stage sees the input downsampled 32x (4x4 at
128 px, like a ResNet). Global average pooling, dropout and a linear layer make the head, so any
input size >= 32 px works.
"""

from __future__ import annotations

import torch
from torch import nn

from cxrtool_builtin.models._layers import conv_bn_relu, float_option, init_weights, int_option


class CompactCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 16, dropout: float = 0.2):
        super().__init__()
        widths = [width * 2**i for i in range(5)]
        c_in = in_channels
        for i, w in enumerate(widths, start=1):
            layers = [] if i == 1 else [nn.MaxPool2d(2)]
            layers += conv_bn_relu(c_in, w, stride=2 if i == 1 else 1) + conv_bn_relu(w, w)
            self.add_module(f"stage{i}", nn.Sequential(*layers))
            c_in = w
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c_in, num_classes)
        init_weights(self)
        nn.init.normal_(self.fc.weight, 0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage5(self.stage4(self.stage3(self.stage2(self.stage1(x)))))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


def build(num_classes: int, in_channels: int = 1, *, width: int, dropout: float) -> nn.Module:
    return CompactCNN(
        num_classes,
        in_channels,
        width=int_option("width", width, 1),
        dropout=float_option("dropout", dropout, 0.0, 1.0),
    )
