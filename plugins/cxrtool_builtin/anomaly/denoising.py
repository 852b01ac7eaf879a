"""``denoising``: a denoising U-Net autoencoder (Kascenas et al. 2022) trained on normal chest X-rays.

Training adds *coarse* noise to each normal image (Gaussian noise drawn on a ``noise_grid`` x
``noise_grid`` grid, bilinearly upsampled, standard deviation ``noise``) and teaches a U-Net to
return the clean image. The skip connections keep fine anatomy (rib edges, vessels) that a narrow
bottleneck cannot reproduce, while the noise teaches the network to remove blob-like intensity
changes it has not seen on normal images: at test time such blobs (opacities, nodules) are "denoised"
away and stand out in the per-pixel error. Everything after the reconstruction (error maps, image
score, ``standardize``, checkpoints) is shared with ``autoencoder``.

Defaults (``score=ssim``, ``reduce=mean``) were chosen on a validation set of Kermany training images,
where pneumonia is large and often diffuse; for small focal findings ``score=mse, reduce=max`` is
far better (phantom lesions: AUROC 0.99 vs 0.66, docs/anomaly.md).

Reference: A. Kascenas, N. Pugeault, A. Q. O'Neil, "Denoising Autoencoders for Unsupervised Anomaly
Detection in Brain MRI", MIDL 2022; among the strongest reconstruction methods of the MedIAnomaly
benchmark (Cai et al. 2024).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cxrtool.errors import UsageError
from cxrtool_builtin.anomaly.autoencoder import AutoencoderDetector


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1),
    )


class UNet(nn.Module):
    """A small U-Net: ``depth`` 2x down-samplings, ``width`` x 2**level channels; predicts a residual."""

    def __init__(self, size: int, depth: int = 3, width: int = 16) -> None:
        super().__init__()
        if size % 2**depth:
            raise UsageError(f"denoising: image size {size} must be a multiple of 2**depth = {2**depth}")
        self.size, self.depth, self.width = size, depth, width
        ch = [width * 2**i for i in range(depth + 1)]
        self.stem = _double_conv(1, ch[0])
        self.down = nn.ModuleList(_double_conv(ch[i], ch[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(nn.ConvTranspose2d(ch[i + 1], ch[i], 2, 2) for i in reversed(range(depth)))
        self.merge = nn.ModuleList(_double_conv(2 * ch[i], ch[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(ch[0], 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(z)]
        for block in self.down:
            skips.append(block(F.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        for up, merge in zip(self.up, self.merge):
            y = merge(torch.cat([up(y), skips.pop()], 1))
        return self.head(y)


class DenoisingDetector(AutoencoderDetector):
    name = "denoising"

    def __init__(self, depth=3, width=16, epochs=20, lr=5e-3, batch_size=8, weight_decay=1e-5, loss="mse",
                 score="ssim", reduce="mean", sigma=1.0, standardize=False, noise=0.2, noise_grid=16) -> None:
        super().__init__(latent=0, depth=depth, width=width, epochs=epochs, lr=lr, batch_size=batch_size,
                         weight_decay=weight_decay, loss=loss, score=score, reduce=reduce, sigma=sigma,
                         standardize=standardize, noise=noise, noise_grid=noise_grid)
        del self.options["latent"]
        if self.noise <= 0:
            raise UsageError("denoising: noise must be > 0 (without noise a U-Net learns the identity)")

    def describe(self) -> str:
        std = ", each pixel standardised by held-out normal errors" if self.standardize else ""
        return (f"denoising U-Net (depth {self.depth}, width {self.width}; coarse noise {self.noise:g} on a "
                f"{self.noise_grid}x{self.noise_grid} grid), score = {self.reduce} of the smoothed "
                f"{self.score_kind} reconstruction error{std}")

    def build_model(self, size: int) -> nn.Module:
        return UNet(size, self.depth, self.width)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return x01 + self.model(self._inputs(x01))  # the network predicts what to remove
