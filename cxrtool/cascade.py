"""A two-stage cascade trained and used as one model (seed report 000).

Stage 1 tells normal from abnormal; stage 2 tells the abnormal classes apart (e.g. bacterial vs
viral pneumonia). The combined output is the log of the joint class probabilities
``p(normal) = p1(normal)`` and ``p(c) = p1(abnormal) * p2(c)``, so a softmax over it gives
probabilities that sum to one and every command treats the cascade like any classifier.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Cascade(nn.Module):
    def __init__(self, stage1: nn.Module, stage2: nn.Module, negative_index: int = 0) -> None:
        super().__init__()
        self.stage1, self.stage2, self.negative_index = stage1, stage2, negative_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) -> (N, 1 + K) log-probabilities in the checkpoint's class order."""
        lp1 = F.log_softmax(self.stage1(x), dim=1)  # [normal, abnormal]
        lp2 = F.log_softmax(self.stage2(x), dim=1)  # abnormal classes
        abnormal = lp1[:, 1:2] + lp2
        parts = [abnormal[:, : self.negative_index], lp1[:, 0:1], abnormal[:, self.negative_index :]]
        return torch.cat(parts, dim=1)

    def training_loss(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Stage-1 cross-entropy on all images plus stage-2 cross-entropy on the abnormal ones."""
        is_abn = (y != self.negative_index).long()
        w1 = None
        if weight is not None:
            w1 = torch.stack([weight[self.negative_index], weight[torch.arange(len(weight)) != self.negative_index].mean()])
        loss = F.cross_entropy(self.stage1(x), is_abn, weight=w1)
        mask = is_abn.bool()
        if mask.any():
            y2 = y[mask] - (y[mask] > self.negative_index).long()
            w2 = None if weight is None else weight[torch.arange(len(weight)) != self.negative_index]
            loss = loss + F.cross_entropy(self.stage2(x[mask]), y2, weight=w2)
        return loss
