"""``autoencoder``: a convolutional autoencoder trained to reconstruct normal chest X-rays.

Encoder: ``depth`` blocks of conv4x4/stride 2 - BN - LeakyReLU (``width``, 2x``width``, ...
channels), flattened into a dense bottleneck of ``latent`` numbers; the decoder mirrors it with
transposed convolutions and ends in a sigmoid, reconstructing the image in [0, 1]. A small
bottleneck forces the network to learn what normal anatomy looks like rather than an identity map.

Anomaly map: the per-pixel reconstruction error, squared (``score=mse``) or ``1 - SSIM`` (local
structural similarity, ``score=ssim``), Gaussian-smoothed; image score: its mean (``reduce``), or
its maximum / the mean of its top p % of pixels. ``loss=mse+ssim`` adds an SSIM term to training.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from cxrtool.anomaly import Detector, FitContext
from cxrtool.errors import TrainingError, UsageError
from cxrtool.options import as_bool
from cxrtool_builtin.anomaly._ops import (
    blur,
    check_reduce,
    choice_opt,
    float_opt,
    int_opt,
    reduce_maps,
    ssim_map,
    to_unit,
)

LOSSES = ("mse", "mse+ssim")
SCORES = ("mse", "ssim")



class ConvAE(nn.Module):
    def __init__(self, size: int, depth: int = 4, width: int = 16, latent: int = 16) -> None:
        super().__init__()
        if size % (2**depth) or size // 2**depth < 2:
            raise UsageError(
                f"autoencoder: image size {size} must be a multiple of 2**depth = {2**depth} and leave at least "
                f"2x2 at the bottleneck (choose --size {max(2**(depth + 1), size - size % 2**depth)} or a smaller depth)"
            )
        self.size, self.depth, self.width, self.latent = size, depth, width, latent
        enc, c = [], 1
        for i in range(depth):
            w = width * 2**i
            enc.append(nn.Sequential(nn.Conv2d(c, w, 4, 2, 1, bias=False), nn.BatchNorm2d(w), nn.LeakyReLU(0.2)))
            c = w
        self.encoder = nn.Sequential(*enc)
        s = size // 2**depth
        self.shape = (c, s, s)
        if latent:  # a dense bottleneck of `latent` numbers
            self.to_latent = nn.Linear(c * s * s, latent)
            self.from_latent = nn.Sequential(nn.Linear(latent, c * s * s), nn.ReLU())
        else:  # latent=0: a spatial bottleneck (c x s x s), for denoising training
            self.to_latent = nn.Flatten()
            self.from_latent = nn.Identity()
        dec = []
        for i in reversed(range(depth)):
            w = width * 2 ** (i - 1) if i > 0 else width
            dec.append(nn.Sequential(nn.ConvTranspose2d(c, w, 4, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()))
            c = w
        self.decoder = nn.Sequential(*dec)
        self.head = nn.Conv2d(c, 1, 3, padding=1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_latent(self.encoder(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.from_latent(self.encode(x)).view(-1, *self.shape)
        return torch.sigmoid(self.head(self.decoder(h)))


class AutoencoderDetector(Detector):
    name = "autoencoder"
    holdout = 0.15  # share of the fit images kept aside for the per-pixel error statistics (standardize)

    def __init__(self, latent=16, depth=4, width=16, epochs=40, lr=2e-3, batch_size=32, weight_decay=1e-5,
                 loss="mse", score="ssim", reduce="top10", sigma=2.0, standardize=False, noise=0.0,
                 noise_grid=8) -> None:
        super().__init__(latent=latent, depth=depth, width=width, epochs=epochs, lr=lr, batch_size=batch_size,
                         weight_decay=weight_decay, loss=loss, score=score, reduce=reduce, sigma=sigma,
                         standardize=standardize, noise=noise, noise_grid=noise_grid)
        self.noise = float_opt("noise", noise, -1e-12)
        self.noise_grid = int_opt("noise_grid", noise_grid, 1)
        self.standardize = as_bool(standardize, "detector option standardize")
        self.latent = int_opt("latent", latent, 0)
        self.depth = int_opt("depth", depth, 1)
        self.width = int_opt("width", width, 1)
        self.epochs = int_opt("epochs", epochs, 1)
        self.batch_size = int_opt("batch_size", batch_size, 2)
        self.lr = float_opt("lr", lr, 0.0, 10.0)
        self.weight_decay = float_opt("weight_decay", weight_decay, -1e-12, 1.0)
        self.loss = choice_opt("loss", loss, LOSSES)
        self.score_kind = choice_opt("score", score, SCORES)
        self.reduce = check_reduce(reduce)
        self.sigma = float_opt("sigma", sigma, -1e-12)  # blur in pixels at 64 px; scales with the size
        self.model: nn.Module | None = None
        self.pixel_mean: torch.Tensor | None = None  # per-pixel error statistics of held-out normals
        self.pixel_std: torch.Tensor | None = None

    def describe(self) -> str:
        std = ", each pixel standardised by held-out normal errors" if self.standardize else ""
        noise = f", denoising (coarse noise {self.noise:g})" if self.noise else ""
        return (f"convolutional autoencoder (depth {self.depth}, width {self.width}, latent {self.latent or 'spatial'}"
                f"{noise}), score = {self.reduce} of the smoothed {self.score_kind} reconstruction error{std}")

    # -- internals ---------------------------------------------------------------------------------
    def _inputs(self, x01: torch.Tensor) -> torch.Tensor:
        pp = self.preprocessing
        return (x01 - pp.mean) / pp.std

    def _sigma_px(self, size: int) -> float:
        return self.sigma * size / 64.0

    def build_model(self, size: int) -> nn.Module:
        return ConvAE(size, self.depth, self.width, self.latent)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        """Reconstruction in [0, 1] of images in [0, 1] (N, 1, H, W)."""
        return self.model(self._inputs(x01))

    def reconstruct(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(targets, reconstructions) in [0, 1], both (N, 1, H, W)."""
        x = to_unit(images)
        self.model.eval()
        with torch.inference_mode():
            return x, self.forward(x)

    def _loss(self, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        loss = torch.mean((recon - x) ** 2)
        if self.loss == "mse+ssim":
            loss = loss + 0.1 * (1.0 - ssim_map(recon, x).mean())
        return loss

    # -- contract ----------------------------------------------------------------------------------
    def fit(self, images: np.ndarray, ctx: FitContext) -> dict[str, Any]:
        torch.manual_seed(ctx.seed)
        held = None
        if self.standardize:  # keep 15 % of the normal images aside for per-pixel error statistics
            order = np.random.default_rng([ctx.seed, 7]).permutation(len(images))
            k = max(2, int(round(self.holdout * len(images))))
            held, images = images[np.sort(order[:k])], images[np.sort(order[k:])]
        size = images.shape[-1]
        self.model = self.build_model(size)
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        steps = self.epochs * int(np.ceil(len(images) / self.batch_size))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=max(1, steps), pct_start=0.1)
        rng = np.random.default_rng(ctx.seed)
        gen = torch.Generator().manual_seed(ctx.seed)
        history = []
        for epoch in range(1, self.epochs + 1):
            self.model.train()
            t0 = time.perf_counter()
            order = rng.permutation(len(images))
            advance = ctx.bar(f"AE epoch {epoch}/{self.epochs}", len(order))
            total, seen = 0.0, 0
            for b in range(0, len(order), self.batch_size):
                idx = np.sort(order[b : b + self.batch_size])
                if len(idx) < 2:
                    continue
                x = to_unit(images[idx])
                inp = x
                if self.noise > 0:  # denoising: coarse noise in, the clean image out (Kascenas et al. 2022)
                    g = self.noise_grid
                    coarse = torch.randn(len(x), 1, g, g, generator=gen) * self.noise
                    inp = x + torch.nn.functional.interpolate(coarse, size=x.shape[-2:], mode="bilinear",
                                                              align_corners=False)
                loss = self._loss(self.forward(inp), x)
                if not torch.isfinite(loss):
                    raise TrainingError(f"autoencoder loss became {loss.item()} at epoch {epoch}; try a lower lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
                seen += len(idx)
                advance(len(idx))
            row = {"epoch": epoch, "train_loss": total / max(1, seen), "lr": opt.param_groups[0]["lr"],
                   "seconds": time.perf_counter() - t0}
            history.append(row)
            ctx.say(f"epoch {epoch:>3}  reconstruction loss {row['train_loss']:.5f}  {row['seconds']:.1f} s")
        self.model.eval()
        if held is not None:
            maps = torch.cat([self.error_maps(held[s : s + 64]) for s in range(0, len(held), 64)])
            self.pixel_mean = maps.mean(0)
            sd = maps.std(0)
            self.pixel_std = sd + 0.1 * sd.mean() + 1e-8
        return {"history": history, "final_loss": history[-1]["train_loss"],
                "parameters": sum(p.numel() for p in self.model.parameters())}

    def error_maps(self, images: np.ndarray) -> torch.Tensor:
        """Smoothed per-pixel reconstruction error (N, H, W)."""
        x, recon = self.reconstruct(images)
        with torch.inference_mode():
            if self.score_kind == "mse":
                err = (recon - x) ** 2
            else:
                err = (1.0 - ssim_map(recon, x)) / 2.0
            return blur(err, self._sigma_px(x.shape[-1]))[:, 0]

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        heat = self.error_maps(images)
        if self.standardize:
            heat = (heat - self.pixel_mean) / self.pixel_std
        return reduce_maps(heat, self.reduce), heat.numpy().astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        out = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.standardize:
            out.update(pixel_mean=self.pixel_mean, pixel_std=self.pixel_std)
        return out

    def extra_meta(self) -> dict[str, Any]:
        return {"size": self.model.size}

    def load_state(self, state: dict[str, Any], extra: dict[str, Any]) -> None:
        size = int(extra.get("size") or self.preprocessing.size)
        self.model = self.build_model(size)
        self.model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
        self.model.eval()
        if self.standardize:
            self.pixel_mean, self.pixel_std = state["pixel_mean"], state["pixel_std"]
